"""Compress a real scene, decompress it, print CF and PSNR, write a quicklook PNG.

    python -m corsa.demo [INPUT.tif] [-o out/]

Without INPUT, the Major-TOM scene of shared/data/s2 is used (1068 x 1068 px, 10 m).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import rasterio

from .codec import DEFAULT_MODEL, OnnxCodec
from .datasets import LOADERS, default_data_root
from .entropy import EntropyModel
from .load import read_geotiff
from .metrics import compression_factor, psnr
from .scene import BANDS, Scene


def quicklook(scene: np.ndarray, decoded: np.ndarray, path: Path, top: float = 3000.0) -> Path:
    """True-colour input (left) and reconstruction (right) as one PNG."""
    rgb = [BANDS.index(b) for b in ("B04", "B03", "B02")]
    pair = np.concatenate([scene[rgb], np.zeros((3, scene.shape[1], 8)), decoded[rgb]], axis=2)
    img = (np.clip(pair / top, 0, 1) ** (1 / 1.6) * 255).astype(np.uint8)
    tmp = path.with_suffix(".part.png")
    with rasterio.open(tmp, "w", driver="PNG", width=img.shape[2], height=img.shape[1], count=3,
                       dtype="uint8") as dst:
        dst.write(img)
    tmp.replace(path)
    for aux in path.parent.glob(tmp.name + ".aux.xml"):
        aux.unlink()
    return path


def default_scene() -> Scene:
    root = default_data_root()
    if not root.is_dir():
        raise SystemExit(f"no input given and the shared data is not at {root}: pass a GeoTIFF path")
    return next(LOADERS["majortom"](root))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", type=Path)
    p.add_argument("-o", "--out", type=Path, default=Path("out"))
    p.add_argument("--model", default=DEFAULT_MODEL)
    args = p.parse_args(argv)
    scene = read_geotiff(args.input) if args.input else default_scene()
    args.out.mkdir(parents=True, exist_ok=True)
    codec = OnnxCodec(args.model)
    entropy = EntropyModel.load(codec.path)
    t0 = time.perf_counter()
    idx0, idx1 = codec.encode(scene.data)
    stream = entropy.encode(idx0, idx1)
    t1 = time.perf_counter()
    back0, back1 = entropy.decode(stream, idx0.shape)
    decoded = codec.decode(back0, back1, shape=scene.data.shape[1:])
    decoded[:, scene.nodata_mask] = 0
    t2 = time.perf_counter()
    stream_path = args.out / f"{scene.name}.crse"
    stream_path.with_suffix(".part").write_bytes(stream)
    stream_path.with_suffix(".part").replace(stream_path)
    png = quicklook(scene.data, decoded, args.out / f"{scene.name}_quicklook.png")
    result = {"scene": scene.name, "pixels": scene.pixels, "bytes": len(stream),
              "cf": compression_factor(scene.pixels, len(stream)), "psnr_db": psnr(scene.data, decoded),
              "encode_s": t1 - t0, "decode_s": t2 - t1}
    print(f"{scene.name}: {scene.data.shape[2]}x{scene.data.shape[1]} px -> {len(stream):,} bytes "
          f"({stream_path}), CF {result['cf']:.1f}, PSNR {result['psnr_db']:.2f} dB, "
          f"encode {result['encode_s']:.1f} s, decode {result['decode_s']:.1f} s; quicklook {png}")
    return result


if __name__ == "__main__":
    main()
