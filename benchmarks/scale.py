"""Scale: compress and decompress growing mosaics of real scenes through the CLI, with time and
memory of each run (a fresh process each), up to a full 100 km tile (10980 x 10980 px) and a time
series of that tile.

    python -m benchmarks.scale --sizes 2745 5490 --out benchmarks/results/scale.jsonl
    python -m benchmarks.scale --sizes 10980 --dates 3 --out benchmarks/results/scale.jsonl
    python -m benchmarks.scale --model corsa2 --sizes 2745 5490 10980 --out benchmarks/results/scale_corsa2.jsonl

The mosaic repeats the Major-TOM scene (1068 x 1068 px) with alternating flips, so every chunk
holds real Sentinel-2 texture; date k of a series turns the scene by k quarter turns, so each date
puts other pixels in each chunk. Mosaics are written once per size to a scratch folder. Each row
is appended to ``--out`` (JSON lines) as soon as it is measured, so a long run keeps what it did.
Memory: the peak RSS of the run (the child's VmHWM, benchmarks/memory.py) and the largest RSS
seen in each quarter of its wall time (sampled from outside every 0.5 s), which shows whether
memory keeps growing.
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

from corsa.formats.datasets import LOADERS, default_data_root
from corsa.core.scene import BANDS

FIRST_DATE = np.datetime64("2022-07-06")


def write_mosaic(path: Path, size: int, date_index: int = 0) -> None:
    (scene,) = LOADERS["majortom"](default_data_root())
    tile = np.rot90(scene.data, date_index, axes=(1, 2))
    n = tile.shape[1]
    date = str(FIRST_DATE + np.timedelta64(5 * date_index, "D")).replace("-", ":")
    profile = {"driver": "GTiff", "width": size, "height": size, "count": len(BANDS), "dtype": "uint16",
               "crs": scene.crs, "transform": Affine(*scene.transform), "tiled": True, "blockxsize": 512,
               "blockysize": 512, "compress": "zstd", "predictor": 2}
    with rasterio.open(path, "w", **profile) as dst:
        for i, b in enumerate(BANDS, 1):
            dst.set_band_description(i, b)
        dst.update_tags(TIFFTAG_DATETIME=f"{date} 10:00:00")
        for y in range(0, size, n):
            for x in range(0, size, n):
                block = tile[:, :, ::-1] if (x // n) % 2 else tile
                block = block[:, ::-1] if (y // n) % 2 else block
                h, w = min(n, size - y), min(n, size - x)
                dst.write(np.ascontiguousarray(block[:, :h, :w]), window=Window(x, y, w, h))


PEAK_WRAPPER = ("import sys; from benchmarks.memory import peak_rss_mb; from corsa.app.cli import main; "
                "rc = main(sys.argv[1:]); print('peak_rss_mb', peak_rss_mb()); sys.exit(rc)")


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(line for line in f if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):  # the process has just ended
        return 0.0


def timed(args: list[str]) -> dict:
    """Wall time, peak RSS and the RSS seen per quarter of the run, of one CLI run in a fresh process."""
    # Output goes to files, not pipes: nobody reads a pipe while we sample, and a full pipe would
    # block the progress bar's thread and with it the run.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", PEAK_WRAPPER, *args], stdout=out, stderr=err, text=True)
        samples = []
        while proc.poll() is None:
            samples.append((time.perf_counter() - t, _rss_mb(proc.pid)))
            time.sleep(0.5)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise RuntimeError(f"corsa {' '.join(args)} failed: {stderr[-2000:]}")
    lines = stdout.strip().splitlines()
    peak_mb = float(next(line.split()[1] for line in lines if line.startswith("peak_rss_mb")))
    summary = [line for line in lines if not line.startswith("peak_rss_mb")][-1]
    quarters = [round(max((m for s, m in samples if q * wall / 4 <= s < (q + 1) * wall / 4), default=0))
                for q in range(4)]
    return {"seconds": round(wall, 1), "peak_rss_mb": round(peak_mb, 1),
            "rss_mb_by_quarter": quarters, "summary": summary}


def measure(size: int, dates: int, scratch: Path, model: str | None = None) -> dict:
    """Mosaics of ``dates`` dates -> product -> decoded GeoTIFFs, each step timed in its own process."""
    src, prod, dec = scratch / f"in{size}", scratch / f"p{size}", scratch / f"d{size}"
    src.mkdir()
    for k in range(dates):
        write_mosaic(src / f"date{k}.tif", size, k)
    row = {"size_px": size, "dates": dates, "megapixels": dates * size * size / 1e6, "model": model or "corsa512",
           "compress": timed(["compress", str(src if dates > 1 else src / "date0.tif"), "-o", str(prod)]
                             + (["--model", model] if model else [])),
           "decompress": timed(["decompress", str(prod), "-o", str(dec)])}
    row["product_bytes"] = sum(f.stat().st_size for f in prod.iterdir())
    row["cf"] = 88 * dates * size * size / (8 * row["product_bytes"])
    for folder in (src, dec):
        for f in folder.iterdir():
            f.unlink()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2745, 5490, 10980])
    p.add_argument("--dates", type=int, default=1, help="dates per mosaic (a time series of the same area)")
    p.add_argument("--model", help="model for compress (default: the CLI's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.jsonl"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sorted(args.sizes):
            row = measure(size, args.dates, Path(tmp), args.model)
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
