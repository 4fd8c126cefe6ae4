"""How a refinement's cell side and steps pay, per quality level: what ``training.fit_refine`` chose from.

    python -m benchmarks.refine_steps --model corsa3.8 --split val --out benchmarks/results/refine_steps_val.json
    python -m benchmarks.refine_steps --model corsa3.8 --split test --grids 8 16 32 --steps 32 \\
        --out benchmarks/results/refine_grids_test.json

For each scene of the split and each level of an unrefined model (with class tables), the date is coded as
a product (``stream_format.encode_date``), decoded once, and refined with every cell side (``--grids``,
px) and step (``--steps``, DN): the product's bytes grow by the refinement streams', its PSNR is that of
the refined decoding. Gain over the best of JPEG 2000 / JPEG XL at the product's CF on the same scene
(``benchmarks.rd_rate``'s comparison; the classical sweeps of the split's scenes are cached in --curves),
as the mean over L2A sources, small patches left out. Step 0: no refinement.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from corsa.codec.models import VariableRateCodec
from corsa.codec.refine_coder import RefineCoder, laplace_tables
from corsa.core.metrics import compression_factor, is_small, psnr
from corsa.core.scene import to_uint16
from corsa.formats import stream_format
from corsa.formats.datasets import load_split

from . import baseline_curves, rd_rate
from .rd import SPLIT_FILE


def measure(codec: VariableRateCodec, scenes: list, grids: list[int], steps: list[int]) -> dict[tuple[int, int], list[dict]]:
    """{(grid, step): rows as benchmarks.rd_rate's} of every scene and level."""
    from training.fit_refine import SCALES

    tables = laplace_tables(SCALES)
    rows: dict[tuple[int, int], list[dict]] = {(g, s): [] for g in grids for s in steps}
    for i, scene in enumerate(scenes, 1):
        t = time.time()
        valid = ~scene.nodata_mask
        for q in codec.qualities:
            level, ints = codec.level(q), codec.encode(scene.data, q)
            base = len(stream_format.encode_date(codec.coder, ints, level, q, scene.nodata_mask, None, None, "undated",
                                                 codec.model_id, codec.card["files"]["decoder"]["sha256"]))
            rec = codec.synthesis(ints, q, scene.data.shape[1:])
            for (grid, step), out in rows.items():
                extra, refined = 0, rec
                if step:
                    refiner = RefineCoder(np.full(len(codec.qualities), step), grid, tables)
                    cells = stream_format.refinement_cells(refiner, level, scene.data, rec, valid)
                    extra = sum(len(refiner.encode(*c)) + 1 for c in cells)     # + its length varint
                    refined = stream_format.refine(rec.copy(), cells, refiner, level, valid)
                decoded = to_uint16(refined)
                decoded[:, scene.nodata_mask] = 0
                out.append({"scene": scene.name, "source": rd_rate.source_of(scene), "small": is_small(scene.data),
                            "l1c": scene.extra.get("level") == "L1C", "pixels": scene.pixels, "quality": q,
                            "bytes": base + extra, "cf": compression_factor(scene.pixels, base + extra),
                            "psnr": psnr(scene.data, decoded)})
        print(f"[{i}/{len(scenes)}] {scene.name}: {time.time() - t:.1f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an unrefined model with class tables")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--grids", type=int, nargs="+", default=[16])
    p.add_argument("--steps", type=int, nargs="+", default=[0, 16, 24, 32, 48, 64, 96])
    p.add_argument("--curves", type=Path, help="classical sweeps of the split's scenes (default: the test split's "
                                               "cache, or benchmarks/results/baseline_curves_val.json)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/refine_steps_val.json"))
    args = p.parse_args(argv)
    t0 = time.time()
    scenes = load_split(SPLIT_FILE, args.split)
    curves = baseline_curves.fill(scenes, args.curves or baseline_curves.split_cache(args.split))
    codec = VariableRateCodec(args.model, threads=1)
    table = []
    for (grid, step), rows in measure(codec, scenes, args.grids, args.steps).items():
        rd_rate.compare(rows, curves)
        levels = rd_rate.summarise_levels(rows, codec.qualities)
        table.append({"grid_px": grid, "step_dn": step,
                      "gain_db": [round(lv["l2a_sources"]["gain_mean"], 3) for lv in levels],
                      "cf": [round(lv["l2a_sources"]["cf"], 1) for lv in levels],
                      "below": [lv["l2a_scenes"]["below"] for lv in levels]})
    best = {q: max(table, key=lambda r: r["gain_db"][i]) for i, q in enumerate(codec.qualities)}
    result = {"model": codec.model_id, "split": args.split, "scenes": len(scenes), "table": table,
              "best": {str(q): {"grid_px": r["grid_px"], "step_dn": r["step_dn"]} for q, r in best.items()},
              "seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for r in table:
        print(f"grid {r['grid_px']:3d} px, step {r['step_dn']:3d} DN: gain " + " ".join(f"{g:+.2f}" for g in r["gain_db"])
              + "  CF " + " ".join(f"{c:.1f}" for c in r["cf"]))
    print("best per level:", {q: (b["grid_px"], b["step_dn"]) for q, b in result["best"].items()})
    return result


if __name__ == "__main__":
    main()
