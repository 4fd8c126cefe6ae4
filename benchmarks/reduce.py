"""Reducing a product to a lower quality without the source, against compressing the source at that quality.

    python -m benchmarks.reduce --model corsa2 --out benchmarks/results/reduce.json

For every test-split scene: the integers at the best quality, brought down to each lower level by
``VariableRateCodec.requantise`` (what `corsa reduce` does), against the source's own integers at
that level. Reported per target level: share of integers that differ, product bytes (format 3)
and PSNR of both, as means over the L2A scenes.
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

from .rd import SPLIT_FILE


def _bytes(codec: VariableRateCodec, ints: np.ndarray, quality: int, nodata: np.ndarray) -> int:
    return len(stream_format.encode_date(codec.coder, ints, codec.level(quality), quality, nodata, None, None, "undated",
                                    codec.model_id, codec.card["files"]["decoder"]["sha256"]))


def run(model: str) -> dict:
    codec = VariableRateCodec(model)
    scenes = [s for s in load_split(SPLIT_FILE, "test") if s.extra.get("level") != "L1C"]
    top = codec.qualities[-1]
    rows = {q: [] for q in codec.qualities[:-1]}
    for s in scenes:
        latent = codec.latent(s.data)
        best = codec.quantise(latent, top)
        for q in rows:
            direct, reduced = codec.quantise(latent, q), codec.requantise(best, top, q)
            scores = []
            for ints in (direct, reduced):
                rec = codec.decode(ints, q, s.data.shape[1:])
                rec[:, s.nodata_mask] = 0
                scores.append(psnr(s.data, rec))
            rows[q].append({"differ": float(np.mean(direct != reduced)),
                            "bytes": [_bytes(codec, i, q, s.nodata_mask) for i in (direct, reduced)],
                            "psnr": scores})
    out = {"model": codec.model_id, "from_quality": top, "scenes": len(scenes), "levels": {}}
    for q, r in rows.items():
        b = np.array([x["bytes"] for x in r], float)
        p = np.array([x["psnr"] for x in r])
        out["levels"][q] = {"ints_differing": float(np.mean([x["differ"] for x in r])),
                            "bytes_ratio_reduced_over_direct": float(b[:, 1].sum() / b[:, 0].sum()),
                            "psnr_direct_db": float(p[:, 0].mean()), "psnr_reduced_db": float(p[:, 1].mean())}
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
             "| to quality | integers differing | bytes reduced / direct | PSNR direct (dB) | PSNR reduced (dB) |",
             "|---|---|---|---|---|"]
    for q, r in result["levels"].items():
        lines.append(f"| {q} | {100 * r['ints_differing']:.2f}% | {r['bytes_ratio_reduced_over_direct']:.3f} | "
                     f"{r['psnr_direct_db']:.2f} | {r['psnr_reduced_db']:.2f} |")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
