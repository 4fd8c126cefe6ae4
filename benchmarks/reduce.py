"""Reducing a product to a lower quality without the source, against compressing the source at that quality.

    python -m benchmarks.reduce --model corsa3.9 --out benchmarks/results/reduce_corsa3.9.json
    python -m benchmarks.reduce --model corsa2 --out benchmarks/results/reduce.json

For every test-split scene: the integers at the best quality, brought down to each lower level by
``VariableRateCodec.requantise`` (what `corsa reduce` does), against the source's own integers at
that level. A refined model's reduced date is refined against the stored date's decoding (the
scene it no longer has), its direct one against the scene. Reported per target level: share of
integers that differ, product bytes and PSNR of both (and of the reduced integers unrefined), as
means over the L2A scenes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from corsa.formats import stream_format
from corsa.codec.models import VariableRateCodec
from corsa.formats.datasets import load_split
from corsa.core.metrics import psnr
from corsa.core.scene import to_uint16

from .rd import SPLIT_FILE


def _product(codec: VariableRateCodec, ints: np.ndarray, quality: int, nodata: np.ndarray,
             truth: np.ndarray) -> tuple[int, np.ndarray, int, np.ndarray]:
    """A date's product bytes and decoding (refined against ``truth`` where ``quality`` is), and the same
    unrefined: (bytes, decoding, unrefined bytes, unrefined decoding)."""
    level, valid = codec.level(quality), ~nodata
    rec = codec.synthesis(ints, quality, nodata.shape)
    cells = stream_format.refinement_cells(codec.refiner, level, truth, rec, valid) if codec.refines(quality) else None
    def size(refinement: list[bytes] | None) -> int:
        return len(stream_format.encode_date(codec.coder, ints, level, quality, nodata, None, None, "undated",
                                             codec.model_id, codec.card["files"]["decoder"]["sha256"],
                                             refinement=refinement))

    plain = to_uint16(rec)
    plain[:, nodata] = 0
    if cells is None:
        unrefined = size(None)
        return unrefined, plain, unrefined, plain
    out = to_uint16(stream_format.refine(rec.copy(), cells, codec.refiner, level, valid))
    out[:, nodata] = 0
    return size([codec.refiner.encode(*c) for c in cells]), out, size(None), plain


def run(model: str) -> dict:
    codec = VariableRateCodec(model)
    scenes = [s for s in load_split(SPLIT_FILE, "test") if s.extra.get("level") != "L1C"]
    top = codec.qualities[-1]
    rows = {q: [] for q in codec.qualities[:-1]}
    for s in scenes:
        latent, nodata = codec.latent(s.data), s.nodata_mask
        best = codec.quantise(latent, top)
        # what a reduced product still has of the scene: the stored product's decoding
        stored = _product(codec, best, top, nodata, s.data)[1]
        for q in rows:
            direct, reduced = codec.quantise(latent, q), codec.requantise(best, top, q)
            d_bytes, d_dec, _, _ = _product(codec, direct, q, nodata, s.data)
            r_bytes, r_dec, u_bytes, u_dec = _product(codec, reduced, q, nodata, stored)
            rows[q].append({"differ": float(np.mean(direct != reduced)), "bytes": [d_bytes, r_bytes, u_bytes],
                            "psnr": [psnr(s.data, d_dec), psnr(s.data, r_dec), psnr(s.data, u_dec)]})
    out = {"model": codec.model_id, "from_quality": top, "scenes": len(scenes), "refined": codec.refiner is not None,
           "levels": {}}
    for q, r in rows.items():
        b = np.array([x["bytes"] for x in r], float)
        p = np.array([x["psnr"] for x in r])
        out["levels"][q] = {"ints_differing": float(np.mean([x["differ"] for x in r])),
                            "bytes_ratio_reduced_over_direct": float(b[:, 1].sum() / b[:, 0].sum()),
                            "bytes_ratio_unrefined_over_direct": float(b[:, 2].sum() / b[:, 0].sum()),
                            "psnr_direct_db": float(p[:, 0].mean()), "psnr_reduced_db": float(p[:, 1].mean()),
                            "psnr_reduced_unrefined_db": float(p[:, 2].mean())}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa2.1")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/reduce.json"))
    args = p.parse_args(argv)
    result = run(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    lines = [f"{result['model']}, reduced from quality {result['from_quality']} ({result['scenes']} L2A test scenes)", "",
             "| to quality | integers differing | bytes reduced / direct (unrefined) | PSNR direct | PSNR reduced "
             "(unrefined) |", "|---|---|---|---|---|"]
    for q, r in result["levels"].items():
        lines.append(f"| {q} | {100 * r['ints_differing']:.2f}% | {r['bytes_ratio_reduced_over_direct']:.3f} "
                     f"({r['bytes_ratio_unrefined_over_direct']:.3f}) | {r['psnr_direct_db']:.2f} | "
                     f"{r['psnr_reduced_db']:.2f} ({r['psnr_reduced_unrefined_db']:.2f}) |")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
