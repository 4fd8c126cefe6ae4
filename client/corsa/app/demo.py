"""The main job on the embedded engine: compress a real scene into the product, decompress it,
print CF and PSNR, write a quicklook PNG (input left, reconstruction right).

    python -m corsa.app.demo [INPUT.tif] [-o out/]

Without INPUT: the Major-TOM scene of shared/data/s2 (1068 x 1068 px, 10 m) when it is there,
otherwise a 1024 x 1024 px crop of the same place from Earth Search's public STAC API.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import rasterio

from corsa.app import cli
from corsa.codec.models import DEFAULT_MODEL
from corsa.formats.load import read_geotiff
from corsa.core.metrics import compression_factor, psnr
from corsa.app.sample import default_scene, quicklook, write_input


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", type=Path)
    p.add_argument("-o", "--out", type=Path, default=Path("out"))
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name under models_onnx/ (default {DEFAULT_MODEL})")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.input:
        scene, src = read_geotiff(args.input), args.input
    else:
        scene = default_scene()
        src = write_input(scene, args.out / f"{scene.name}.tif")
    prod, decoded_path = args.out / f"{scene.name}_product", args.out / f"{scene.name}_decoded.tif"
    t0 = time.perf_counter()
    # the demo rewrites its own product on a second run
    if cli.main(["compress", str(src), "-o", str(prod), "--model", str(args.model), "--overwrite"]) != 0:
        raise SystemExit(2)
    t1 = time.perf_counter()
    if cli.main(["decompress", str(prod), "-o", str(decoded_path)]) != 0:
        raise SystemExit(2)
    t2 = time.perf_counter()
    with rasterio.open(decoded_path) as dec:
        decoded = dec.read()
    # CF from the bytes of the product's data files (its STAC documents aside)
    size = sum(p.stat().st_size for p in prod.iterdir() if p.suffix != ".json")
    png = quicklook(scene.data, decoded, args.out / f"{scene.name}_quicklook.png")
    result = {"scene": scene.name, "model": str(args.model), "pixels": scene.pixels, "product_bytes": size,
              "cf": compression_factor(scene.pixels, size),
              "psnr_db": psnr(scene.data, decoded), "compress_s": t1 - t0, "decompress_s": t2 - t1}
    print(f"{scene.name}: {scene.data.shape[2]}x{scene.data.shape[1]} px, model {args.model} -> product {prod} "
          f"({size:,} bytes, CF {result['cf']:.1f}), PSNR {result['psnr_db']:.2f} dB, "
          f"compress {result['compress_s']:.1f} s, decompress {result['decompress_s']:.1f} s; quicklook {png}")
    return result


if __name__ == "__main__":
    main()
