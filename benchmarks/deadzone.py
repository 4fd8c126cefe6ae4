"""How a quantiser's dead zone pays, per quality level: what a model card's "quantise" holds.

    python -m benchmarks.deadzone --model corsa3.9 --split val --deadzones 0 0.05 0.1 0.15 0.2 --card \\
        --out benchmarks/results/deadzone_val.json
    python -m benchmarks.deadzone --model corsa3.9 --split test --deadzones 0 0.05 0.1 0.15 \\
        --out benchmarks/results/deadzone_test.json

For each scene of the split, each level and each dead zone d, the latent times the level's gain is
pulled d towards 0 before rounding (``corsa_udf.quantise``), the date coded as a product (refined
where the model refines, ``stream_format.encode_refined``) and decoded: gain over the best of
JPEG 2000 / JPEG XL at the product's CF on the same scene (``benchmarks.rd_rate``'s comparison), as
the mean over L2A sources, small patches left out. The decoder is untouched: only the encoder's
integers change. ``--card`` records in the model's card the one dead zone (for every level) with the
best worst-level shortfall from each level's best on the split.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import corsa_udf
from corsa.codec.models import VariableRateCodec
from corsa.core.machine import cpu_name
from corsa.core.metrics import compression_factor, is_small, psnr
from corsa.core.scene import to_uint16
from corsa.formats import stream_format
from corsa.formats.datasets import load_split

from . import baseline_curves, rd_rate
from .rd import SPLIT_FILE


def measure(codec: VariableRateCodec, scenes: list, deadzones: list[float]) -> dict[float, list[dict]]:
    """{dead zone: rows as benchmarks.rd_rate's} of every scene and level."""
    rows: dict[float, list[dict]] = {d: [] for d in deadzones}
    for i, s in enumerate(scenes, 1):
        t = time.time()
        latent, valid = codec.latent(s.data), ~s.nodata_mask
        for q in codec.qualities:
            level = codec.level(q)
            scaled = latent * codec._tables[0][level][:, None, None]
            for d in deadzones:
                ints = corsa_udf.quantise(scaled, d)
                data, rec, cells = stream_format.encode_refined(codec, s.data, ints, q, s.nodata_mask, None, None, "undated")
                if cells is not None:
                    stream_format.refine(rec, cells, codec.refiner, level, valid)
                decoded = to_uint16(rec)
                decoded[:, s.nodata_mask] = 0
                rows[d].append({"scene": s.name, "source": rd_rate.source_of(s), "small": is_small(s.data),
                                "l1c": s.extra.get("level") == "L1C", "pixels": s.pixels, "quality": q,
                                "bytes": len(data), "cf": compression_factor(s.pixels, len(data)),
                                "psnr": psnr(s.data, decoded)})
        print(f"[{i}/{len(scenes)}] {s.name}: {time.time() - t:.1f} s", flush=True)
    return rows


def record(codec: VariableRateCodec, table: list[dict], split: str, command: str) -> float:
    """The dead zone whose largest shortfall from each level's best gain is smallest, in the card."""
    gains = np.array([r["gain_db"] for r in table])
    chosen = table[int(np.argmin((gains.max(0) - gains).max(1)))]["deadzone"]
    path = codec.path / "model_card.json"
    card = json.loads(path.read_text())
    card["quantise"] = {"deadzone": chosen, "what": "the encoder pulls each scaled latent value this far towards 0 "
                        "before rounding (corsa_udf.quantise); the decoder is unchanged",
                        "chosen": f"{split} split, one value for every level (benchmarks.deadzone)", "command": command,
                        "cpu": cpu_name()}
    path.write_text(json.dumps(card, indent=1) + "\n")
    return chosen


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--deadzones", type=float, nargs="+", default=[0, 0.05, 0.1, 0.15, 0.2])
    p.add_argument("--card", action="store_true", help="record the chosen dead zone in the model's card")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/deadzone_val.json"))
    args = p.parse_args(argv)
    t0 = time.time()
    scenes = load_split(SPLIT_FILE, args.split)
    curves = baseline_curves.fill(scenes, baseline_curves.split_cache(args.split))
    codec = VariableRateCodec(args.model, threads=1)
    table = []
    for d, rows in measure(codec, scenes, args.deadzones).items():
        rd_rate.compare(rows, curves)
        levels = rd_rate.summarise_levels(rows, codec.qualities)
        table.append({"deadzone": d, "gain_db": [round(lv["l2a_sources"]["gain_mean"], 3) for lv in levels],
                      "cf": [round(lv["l2a_sources"]["cf"], 1) for lv in levels],
                      "psnr_db": [round(lv["l2a_sources"]["psnr"], 2) for lv in levels],
                      "below": [lv["l2a_scenes"]["below"] for lv in levels]})
    result = {"model": codec.model_id, "split": args.split, "scenes": len(scenes), "table": table,
              "seconds": round(time.time() - t0, 1), "cpu": cpu_name()}
    if args.card:
        command = "python -m benchmarks.deadzone " + " ".join(sys.argv[1:] if argv is None else argv)
        result["recorded"] = record(codec, table, args.split, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for r in table:
        print(f"dead zone {r['deadzone']:.2f}: gain " + " ".join(f"{g:+.2f}" for g in r["gain_db"])
              + "  CF " + " ".join(f"{c:.1f}" for c in r["cf"]))
    return result


if __name__ == "__main__":
    main()
