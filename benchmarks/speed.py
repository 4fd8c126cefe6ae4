"""Speed against JPEG 2000, in one run on one scene of at least 2000 x 2000 px (2 threads).

    python -m benchmarks.speed --model corsa2 --out benchmarks/results/speed.json

The scene is the Major-TOM scene mirrored into a 2136 x 2136 px mosaic (benchmarks.scale). Ours:
`corsa compress` / `corsa decompress` as fresh processes (start-up, reading and writing included)
the codec alone (network + entropy coding, in memory), and the product's date read whole into memory
through xarray (``engine="corsa"``: blocks decoded side by side as the CLI's). JPEG 2000: OpenJPEG through imagecodecs,
each of the 10 bands on the 10 m grid with 2 threads, its quality knob bisected to the CF of our
product, encode and decode timed in memory. Best of --repeats runs each; the ratios are what
BENCHMARKS.md reports (absolute times drift on this shared machine).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
import rasterio
import xarray as xr

from corsa.core.machine import cpu_name
from corsa.formats import results, series, stream_format
from corsa.codec.models import VariableRateCodec
from corsa.core.metrics import compression_factor, psnr

from .baselines import CODECS, code_scene
from .scale import write_mosaic
from . import report

SIZE = 2136
THREADS = 2


def _best(f, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return min(times), out


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "corsa.app.cli", *args], check=True, capture_output=True)


def jpeg2000_at(data: np.ndarray, target_cf: float) -> float:
    """OpenJPEG's quality knob (PSNR level) giving the largest CF at or above ``target_cf``."""
    codec, n = CODECS["jpeg2000"], data.shape[1] * data.shape[2]
    lo, hi = codec.lo, codec.hi
    for _ in range(10):
        mid = (lo + hi) / 2
        size, _ = code_scene(data, codec, mid, "10m")
        lo, hi = (mid, hi) if compression_factor(n, size) >= target_cf else (lo, mid)
    return lo


def gdal_to_cog(src: Path, tmp: Path, target_cf: float, repeats: int) -> tuple[float, float]:
    """GDAL's side of "product to COG": ``src`` written as one 10-band JPEG 2000 file by GDAL's
    JP2OpenJPEG, its QUALITY (a size percentage) bisected to the CF nearest ``target_cf``, then
    converted to a COG with the options ``corsa decompress`` writes by a fresh ``rio convert``
    process; (CF of the file, best time)."""
    jp2 = tmp / "mosaic.jp2"
    with rasterio.open(src) as f:
        data, pixels = f.read(), f.width * f.height
        profile = {**f.profile, "driver": "JP2OpenJPEG", "REVERSIBLE": "NO", "NUM_THREADS": str(THREADS)}
    for key in ("tiled", "blockxsize", "blockysize", "compress", "interleave"):
        profile.pop(key, None)

    def cf_at(log_quality: float) -> float:
        with rasterio.open(jp2, "w", **profile, QUALITY=f"{10 ** log_quality:.5f}") as dst:
            dst.write(data)
        return compression_factor(pixels, jp2.stat().st_size)
    lo, hi = -2.0, 1.0                       # QUALITY 0.01 % .. 10 %: CF falls as QUALITY rises
    for _ in range(8):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cf_at(mid) >= target_cf else (lo, mid)
    cf = cf_at(lo)
    options = [x for k, v in results.COG_OPTIONS.items() for x in ("--co", f"{k}={v}")]
    out = tmp / "gdal_cog.tif"
    env = {**os.environ, "GDAL_NUM_THREADS": str(THREADS)}

    def convert():
        out.unlink(missing_ok=True)
        subprocess.run([str(Path(sys.executable).with_name("rio")), "convert", str(jp2), str(out), "--driver", "COG",
                        *options], check=True, capture_output=True, env=env)
    t, _ = _best(convert, repeats)
    return cf, t


def _xarray_date(product: Path) -> np.ndarray:
    """The product's date as a user reads it whole into memory (``xr.open_dataset(..., engine="corsa")``),
    its blocks entropy-decoded afresh (the reader keeps recent blocks' integers)."""
    series.forget_blocks()
    with xr.open_dataset(product, engine="corsa", mask_and_scale=False) as ds:
        return ds.reflectance.values


def run(model: str, quality: int | None, repeats: int) -> dict:
    codec = VariableRateCodec(model, threads=THREADS)
    quality = quality or codec.default_quality
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "mosaic.tif"
        write_mosaic(src, SIZE)
        with rasterio.open(src) as f:
            data = f.read()
        mp = data.shape[1] * data.shape[2] / 1e6
        t_cli_c, _ = _best(lambda: _cli("compress", str(src), "-o", str(tmp / "prod"), "--model", model,
                                        "--quality", str(quality), "--overwrite"), repeats)
        (path,) = (tmp / "prod").glob(f"*{stream_format.SUFFIX}")
        ours_cf = compression_factor(data.shape[1] * data.shape[2], path.stat().st_size)
        t_cli_d, _ = _best(lambda: _cli("decompress", str(tmp / "prod"), "-o", str(tmp / "out.tif")), repeats)
        with rasterio.open(tmp / "out.tif") as f:
            ours_psnr = psnr(data, f.read())
        base = codec.base(quality)      # the codec alone: a layered level's base (the CLI and xarray add its layer)
        level = codec.level(base)
        codec.encode(data[:, :64, :64], base)
        t_enc, ints = _best(lambda: codec.encode(data, base), repeats)
        t_ec, blob = _best(lambda: stream_format.encode_date(codec.coder, ints, level, base, np.zeros(data.shape[1:], bool),
                                                        None, None, "undated", codec.model_id,
                                                        codec.card["files"]["decoder"]["sha256"]), repeats)
        (tmp / "blob").mkdir()
        stream_format.write_date(tmp / "blob", blob, "undated")
        t_ed, _ = _best(lambda: stream_format.read_date(tmp / "blob", "undated", codec.coder, codec.level), repeats)
        t_dec, _ = _best(lambda: codec.decode(ints, base, data.shape[1:]), repeats)
        t_xr, _ = _best(lambda: _xarray_date(tmp / "prod"), repeats)
        gdal_cf, t_gdal_cog = gdal_to_cog(src, tmp, ours_cf, repeats)
    knob = jpeg2000_at(data, ours_cf)
    streams = [imagecodecs.jpeg2k_encode(b, level=knob, codecformat=imagecodecs.JPEG2K.CODEC.J2K,
                                         numthreads=THREADS) for b in data]
    j2k_cf = compression_factor(data.shape[1] * data.shape[2], sum(len(s) for s in streams))
    t_j2k_e, _ = _best(lambda: [imagecodecs.jpeg2k_encode(b, level=knob, codecformat=imagecodecs.JPEG2K.CODEC.J2K,
                                                          numthreads=THREADS) for b in data], repeats)
    t_j2k_d, dec = _best(lambda: [imagecodecs.jpeg2k_decode(s, numthreads=THREADS) for s in streams], repeats)
    result = {
        "scene_px": [int(data.shape[1]), int(data.shape[2])], "model": codec.model_id, "quality": quality,
        "codec_alone_quality": base,
        "cpu": cpu_name(), "threads": THREADS, "repeats": repeats,
        "ours": {"cf": ours_cf, "psnr_db": ours_psnr, "cli_compress_s": t_cli_c, "cli_decompress_s": t_cli_d,
                 "encode_network_s": t_enc, "entropy_encode_s": t_ec, "entropy_decode_s": t_ed,
                 "decode_network_s": t_dec, "xarray_date_s": t_xr},
        "jpeg2000": {"cf": j2k_cf, "psnr_db": psnr(data, np.stack(dec)), "encode_s": t_j2k_e, "decode_s": t_j2k_d},
        "gdal_jp2_to_cog": {"cf": gdal_cf, "seconds": t_gdal_cog},
    }
    result["ratios"] = {
        "cli_compress_vs_j2k_encode": t_j2k_e / t_cli_c,
        "cli_decompress_vs_j2k_decode": t_j2k_d / t_cli_d,
        "cli_decompress_vs_gdal_jp2_to_cog": t_gdal_cog / t_cli_d,
        "codec_compress_vs_j2k_encode": t_j2k_e / (t_enc + t_ec),
        "codec_decompress_vs_j2k_decode": t_j2k_d / (t_ed + t_dec),
        "xarray_date_vs_j2k_decode": t_j2k_d / t_xr,
    }
    result["megapixels"] = mp
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa2.1")
    p.add_argument("--quality", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    result = run(args.model, args.quality, args.repeats)
    return report.save(result, args.out)


if __name__ == "__main__":
    main()
