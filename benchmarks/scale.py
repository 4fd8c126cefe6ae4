"""Scale: compress and decompress growing mosaics of real scenes through the CLI, with time and
peak memory of each run (a fresh process each), up to a full 100 km tile (10980 x 10980 px).

    python -m benchmarks.scale --sizes 2745 5490 10980 --out benchmarks/results/scale.json

The mosaic repeats the Major-TOM scene (1068 x 1068 px) with alternating flips, so every chunk
holds real Sentinel-2 texture; it is written once per size to a scratch folder.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

from corsa.datasets import LOADERS, default_data_root
from corsa.scene import BANDS


def write_mosaic(path: Path, size: int) -> None:
    (scene,) = LOADERS["majortom"](default_data_root())
    tile = scene.data
    n = tile.shape[1]
    profile = {"driver": "GTiff", "width": size, "height": size, "count": len(BANDS), "dtype": "uint16",
               "crs": scene.crs, "transform": Affine(*scene.transform), "tiled": True, "blockxsize": 512,
               "blockysize": 512, "compress": "zstd", "predictor": 2}
    with rasterio.open(path, "w", **profile) as dst:
        for i, b in enumerate(BANDS, 1):
            dst.set_band_description(i, b)
        dst.update_tags(TIFFTAG_DATETIME="2022:07:06 10:00:00")
        for y in range(0, size, n):
            for x in range(0, size, n):
                block = tile[:, :, ::-1] if (x // n) % 2 else tile
                block = block[:, ::-1] if (y // n) % 2 else block
                h, w = min(n, size - y), min(n, size - x)
                dst.write(np.ascontiguousarray(block[:, :h, :w]), window=Window(x, y, w, h))


PEAK_WRAPPER = ("import resource, sys; from corsa.cli import main; rc = main(sys.argv[1:]); "
                "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def timed(args: list[str]) -> dict:
    """Wall time and peak RSS of one CLI run in a fresh process."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        raise RuntimeError(f"corsa {' '.join(args)} failed: {out.stderr[-2000:]}")
    lines = out.stdout.strip().splitlines()
    peak_kb = int(next(line.split()[1] for line in lines if line.startswith("peak_rss_kb")))
    summary = [line for line in lines if not line.startswith("peak_rss_kb")][-1]
    return {"seconds": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024, 1), "summary": summary}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2745, 5490, 10980])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sorted(args.sizes):
            src, prod, dec = Path(tmp) / f"m{size}.tif", Path(tmp) / f"p{size}", Path(tmp) / f"d{size}.tif"
            write_mosaic(src, size)
            row = {"size_px": size, "megapixels": size * size / 1e6,
                   "compress": timed(["compress", str(src), "-o", str(prod)]),
                   "decompress": timed(["decompress", str(prod), "-o", str(dec)])}
            row["product_bytes"] = sum(f.stat().st_size for f in prod.iterdir())
            row["cf"] = 88 * size * size / (8 * row["product_bytes"])
            print(json.dumps(row), flush=True)
            rows.append(row)
            for f in (src, dec):
                f.unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
