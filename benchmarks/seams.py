"""Seams at chunk borders: PSNR per band in a strip along the engine's chunk borders against the
interior, for a scene compressed and decompressed through the CLI (512 px chunks, each with only
its network's reach of context).

    python -m benchmarks.seams      # the Major-TOM scene (1068 x 1068 px); writes benchmarks/results/seams.json

A seam would show as a border strip clearly below the interior.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import rasterio

from corsa.app import cli
from corsa.formats.datasets import LOADERS, default_data_root
from corsa.app.sample import write_input
from corsa.core.metrics import band_psnr, psnr
from corsa.openeo.windows import CHUNK
from corsa.core.scene import BANDS


def border_mask(shape: tuple[int, int], chunk: int = CHUNK, width: int = 8) -> np.ndarray:
    """True within ``width`` px either side of every chunk border of a (y, x) grid."""
    border = np.zeros(shape, bool)
    for b in range(chunk, max(shape), chunk):
        border[b - width:b + width, :] = True
        border[:, b - width:b + width] = True
    return border


def seam_figures(reference: np.ndarray, decoded: np.ndarray, border: np.ndarray) -> dict:
    """PSNR (dB, all bands) and per-band PSNR of the border strip and of the interior."""
    out = {}
    for part, sel in (("border", border), ("interior", ~border)):
        ref, dec = reference[:, sel].astype(np.float32), decoded[:, sel].astype(np.float32)
        out[part] = {"pixels": int(sel.sum()), "psnr_db": psnr(ref, dec),
                     "band_psnr_db": dict(zip(BANDS, band_psnr(ref, dec).tolist()))}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=8, help="px either side of a chunk border")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/seams.json"))
    args = p.parse_args(argv)
    scene = next(LOADERS["majortom"](default_data_root()))
    with tempfile.TemporaryDirectory() as tmp:
        src = write_input(scene, Path(tmp) / "in.tif")
        for cmd in (["compress", str(src), "-o", f"{tmp}/prod"], ["decompress", f"{tmp}/prod", "-o", f"{tmp}/out.tif"]):
            if cli.main(cmd) != 0:
                raise SystemExit(f"corsa {cmd[0]} failed")
        with rasterio.open(f"{tmp}/out.tif") as dst:
            decoded = dst.read()
    figures = {"scene": scene.name, "shape": list(scene.data.shape[1:]), "chunk": CHUNK, "width": args.width,
               **seam_figures(scene.data, decoded, border_mask(scene.data.shape[1:], CHUNK, args.width))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    print("| strip | pixels | PSNR (dB) | " + " | ".join(BANDS) + " |")
    print("|---" * (3 + len(BANDS)) + "|")
    for part in ("border", "interior"):
        f = figures[part]
        print(f"| {part} | {f['pixels']:,} | {f['psnr_db']:.2f} | "
              + " | ".join(f"{v:.2f}" for v in f["band_psnr_db"].values()) + " |")
    return figures


if __name__ == "__main__":
    main()
