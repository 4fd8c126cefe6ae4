"""What a compress batch job downloads, run through ``corsa.openeo.jobs`` on the embedded engine (the same
calls as on a back end), on the full-resolution 1068 px Major-TOM scene.

    python -m benchmarks.job_files --out benchmarks/results/job_files_corsa3.9.json
    python -m benchmarks.job_files --model corsa2 --out benchmarks/results/job_files.json

For corsa512 and for a variable-rate model (--model, default the services' default) at every quality
level: the CF of the job's files (each stored layer on its own grid, DEFLATE GeoTIFF as the engine's
generic save_result and geopyspark back ends write them; job.json excluded), the CF of the product
`corsa pack` makes of them (refined or not), and whether `corsa decompress` of the job's files gives
the same image as `corsa decompress` of the product; and, for comparison, the replicated 10 m
compressed cube saved as it is.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine

from corsa.app import cli
from corsa.openeo import jobs
from corsa.codec.models import DEFAULT_MODEL, VariableRateCodec
from corsa.formats import stream_format
from corsa.formats.datasets import LOADERS, default_data_root
from corsa.openeo.local import EngineConnection
from corsa.core.metrics import compression_factor, psnr
from corsa.core.scene import BANDS


def _scene_file(folder: Path) -> tuple[Path, np.ndarray]:
    (scene,) = LOADERS["majortom"](default_data_root())
    path = folder / "majortom.tif"
    with rasterio.open(path, "w", driver="GTiff", width=scene.data.shape[2], height=scene.data.shape[1],
                       count=len(BANDS), dtype="uint16", transform=Affine(*scene.transform), crs=scene.crs) as dst:
        dst.write(scene.data)
        dst.descriptions = BANDS
        dst.update_tags(TIFFTAG_DATETIME="2022:07:06 10:00:00")
    return path, scene.data


def _decoded(folder: Path) -> np.ndarray:
    (path,) = folder.glob("*.tif")
    with rasterio.open(path) as src:
        return src.read()


def measure(tmp: Path, scene: Path, data: np.ndarray, model: str, quality: int | None) -> dict:
    label = f"{model}" + (f"-q{quality}" if quality else "")
    connection = EngineConnection({"SENTINEL2_L2A": scene}, workdir=tmp / f"work-{label}")
    job = jobs.follow(jobs.start(jobs.submit(jobs.compress(connection, None, None, model=model, quality=quality),
                                             label)), poll_seconds=0)
    files = jobs.download(job, tmp / f"files-{label}")
    pixels = data.shape[1] * data.shape[2]
    job_bytes = sum(p.stat().st_size for p in files)
    assert cli.main(["pack", str(tmp / f"files-{label}"), "-o", str(tmp / f"product-{label}")]) == 0
    product_bytes = sum(p.stat().st_size for p in (tmp / f"product-{label}").iterdir())
    assert cli.main(["decompress", str(tmp / f"files-{label}"), "-o", str(tmp / f"dec-files-{label}")]) == 0
    assert cli.main(["decompress", str(tmp / f"product-{label}"), "-o", str(tmp / f"dec-product-{label}")]) == 0
    a, b = _decoded(tmp / f"dec-files-{label}"), _decoded(tmp / f"dec-product-{label}")
    products = sorted((tmp / f"product-{label}").glob(f"*{stream_format.SUFFIX}"))
    refined = bool(products) and stream_format.read_header(products[0].read_bytes(), products[0].name)["refine_lengths"] is not None
    return {"model": model, "quality": quality, "files": sorted(p.name for p in files), "refined": refined,
            "job_bytes": job_bytes,
            "job_cf": round(compression_factor(pixels, job_bytes), 2), "product_bytes": product_bytes,
            "product_cf": round(compression_factor(pixels, product_bytes), 2),
            "decodes_equal": bool(np.array_equal(a, b)), "psnr_db": round(psnr(data, a), 2)}


def replicated(tmp: Path, scene: Path, data: np.ndarray, model: str, quality: int | None) -> dict:
    """The files of saving the compressed cube as it is (what a back end made of the services before
    issue 13: every layer replicated on the 10 m grid), with the same writer."""
    label = f"replicated-{model}-{quality}"
    connection = EngineConnection({"SENTINEL2_L2A": scene}, workdir=tmp / f"work-{label}")
    cube = jobs.compressed(connection, None, None, model=model, quality=quality)
    files = jobs.download(jobs.follow(jobs.start(jobs.submit(cube, label)), poll_seconds=0), tmp / label)
    size = sum(p.stat().st_size for p in files)
    return {"model": model, "quality": quality, "replicated_bytes": size,
            "replicated_cf": round(compression_factor(data.shape[1] * data.shape[2], size), 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/job_files.json"))
    p.add_argument("--model", default=DEFAULT_MODEL, help="the variable-rate model (default: the services' default)")
    p.add_argument("--qualities", default="all", help="its levels: 'all' or a comma list")
    args = p.parse_args(argv)
    levels = VariableRateCodec(args.model).qualities if args.qualities == "all" else \
        [int(q) for q in args.qualities.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scene, data = _scene_file(Path(tmp))
        for model, quality in [("corsa512", None)] + [(args.model, q) for q in levels]:
            rows.append(measure(Path(tmp), scene, data, model, quality))
            print(json.dumps(rows[-1]), flush=True)
        before = [replicated(Path(tmp), scene, data, "corsa512", None), replicated(Path(tmp), scene, data, args.model, 4)]
        print(json.dumps(before), flush=True)
    out = {"scene": f"majortom {data.shape[2]} x {data.shape[1]} px", "rows": rows, "replicated_cube": before}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
