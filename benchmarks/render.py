"""Rendering off the stored dates and grid (`corsa decompress --date / --scale`), against the simple
alternatives, on the test split.

    python -m benchmarks.render --model corsa3.1 --out benchmarks/results/render_corsa3.1.json

Any date: a clear date of a test series (scene classes under 0.5% cloud) with dates before and after
it is left out; the other dates are compressed as a series (--quality); the left-out date is rendered
with --date and compared (PSNR, all 10 bands) with its true reflectances, beside linear interpolation
in time of the two neighbouring decoded dates and the time head alone (``corsa_udf.head_blend``,
without the fall-back to linear interpolation that --date adds). ``--split val``: the validation
split's series, on which the fall-back's radius was chosen.

Any scale: each test scene averaged to pixels 2, 4 and 6 times larger (box average of whole blocks;
6 lies outside the 1.25-4 the space head trained on), written as a GeoTIFF on that coarse grid,
compressed, and rendered back to the original grid with --scale; PSNR against the original, beside
GDAL's cubic upsampling (rasterio reproject, Resampling.cubic) of the plain decode.

Throughput: the Major-TOM scene (1068 px) decoded, then rendered at x1 and x2 with the space head;
output Mpx per second on the machine's cores (best of 2); and x2 from the product, decode included,
through the CLI and through the service corsa_openeo_render on the engine (--engine; one run each).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import corsa_udf
import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import reproject

from corsa.app import cli
from corsa.blocks import blockwise
from corsa.codec.models import VariableRateCodec
from corsa.formats.datasets import LOADERS, cloud_fraction, default_data_root, load_split, revisit_series
from corsa.core.metrics import psnr
from corsa.blocks.render import render_file, scaled

from .fill import SPLIT_FILE, _read
from .series import write_inputs
from corsa.core.machine import cpu_name
from . import report


def _compress(src: Path, out: Path, model: str, quality: int) -> None:
    assert cli.main(["compress", str(src), "-o", str(out), "--model", model, "--quality", str(quality)]) == 0


def any_date(model: str, quality: int, tmp: Path, split: str = "test") -> list[dict]:
    codec = VariableRateCodec(model)
    head = blockwise._sessions(codec, "between") if "between" in codec.card["files"] else None
    rows = []
    for n, run in enumerate(revisit_series(load_split(SPLIT_FILE, split))):
        for t in range(1, len(run) - 1):
            if cloud_fraction(run[t]) >= 0.005 or not run[t].date:
                continue
            case = tmp / f"d{n}_{t}"
            stored = [s for i, s in enumerate(run) if i != t]
            write_inputs([(s.date, s) for s in stored], case / "in")
            _compress(case / "in", case / "prod", model, quality)
            assert cli.main(["decompress", str(case / "prod"), "-o", str(case / "r.tif"), "--date", run[t].date]) == 0
            assert cli.main(["decompress", str(case / "prod"), "-o", str(case / "all")]) == 0
            dec = np.stack([_read(case / "all" / f"corsa_decoded_{s.date}.tif") for s in stored]).astype(np.float32)
            days = [float(np.datetime64(s.date, "D").astype(np.int64)) for s in stored]
            day = float(np.datetime64(run[t].date, "D").astype(np.int64))
            b, a = dec[t - 1], dec[t]
            db, da = day - days[t - 1], days[t] - day
            truth = run[t].data
            rows.append({"group": run[t].group, "location": run[t].location, "date": run[t].date,
                         "days_before": int(db), "days_after": int(da), "psnr_rendered": psnr(truth, _read(case / "r.tif")),
                         "psnr_linear": psnr(truth, np.rint((b * da + a * db) / (da + db))),
                         "psnr_nearer": psnr(truth, b if db <= da else a)})
            if head is not None:     # the time head alone, without the fall-back to linear interpolation
                gaps = (dec == 0).all(1)
                rows[-1]["psnr_head_alone"] = psnr(truth, np.rint(corsa_udf.head_blend(head, dec, gaps, days, day)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _coarse_file(data: np.ndarray, transform: Affine, crs, factor: int, path: Path) -> np.ndarray:
    """``data`` cropped to whole blocks of ``factor`` px and box-averaged, written to ``path``;
    returns the cropped original."""
    h, w = data.shape[1] // factor * factor, data.shape[2] // factor * factor
    fine = data[:, :h, :w]
    low = np.rint(fine.reshape(fine.shape[0], h // factor, factor, w // factor, factor).astype(np.float64).mean((2, 4)))
    with rasterio.open(path, "w", driver="GTiff", width=w // factor, height=h // factor, count=fine.shape[0],
                       dtype="uint16", crs=crs, transform=transform * Affine.scale(factor)) as dst:
        dst.write(low.astype(np.uint16))
    return fine


def any_scale(model: str, quality: int, tmp: Path, factors: tuple[int, ...], split: str = "test") -> list[dict]:
    rows = []
    scenes = [s for s in load_split(SPLIT_FILE, split) if s.transform and min(s.data.shape[1:]) >= 96]
    for n, s in enumerate(scenes):
        for f in factors:
            case = tmp / f"s{n}_{f}"
            case.mkdir(parents=True)
            fine = _coarse_file(s.data, Affine(*s.transform), s.crs, f, case / "coarse.tif")
            if (fine == 0).all(0).any():
                continue                # nodata in the scene: averaging would mix it in
            _compress(case / "coarse.tif", case / "prod", model, quality)
            assert cli.main(["decompress", str(case / "prod"), "-o", str(case / "r.tif"), "--scale", str(f)]) == 0
            assert cli.main(["decompress", str(case / "prod"), "-o", str(case / "plain.tif")]) == 0
            with rasterio.open(case / "plain.tif") as src, rasterio.open(case / "r.tif") as ref:
                cubic = np.zeros((src.count,) + ref.shape, np.float32)
                reproject(src.read().astype(np.float32), cubic, src_transform=src.transform, src_crs=src.crs,
                          dst_transform=ref.transform, dst_crs=ref.crs, resampling=Resampling.cubic)
                rendered = ref.read()
            rows.append({"group": s.group, "scene": s.name, "factor": f, "psnr_rendered": psnr(fine, rendered),
                         "psnr_cubic": psnr(fine, np.clip(np.rint(cubic), 0, 65535))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def throughput(model: str, quality: int, tmp: Path) -> dict:
    scene = next(LOADERS["majortom"](default_data_root()))
    write_inputs([(scene.date or "2020-01-01", scene)], tmp / "mt")
    _compress(tmp / "mt", tmp / "mt_prod", model, quality)
    assert cli.main(["decompress", str(tmp / "mt_prod"), "-o", str(tmp / "mt.tif")]) == 0
    codec = VariableRateCodec(model)
    out = {}
    for s in (1, 2):
        best = np.inf
        for _ in range(2):
            t = time.perf_counter()
            render_file(tmp / "mt.tif", codec, scaled(tmp / "mt.tif", s), tmp / f"mt_x{s}.tif")
            best = min(best, time.perf_counter() - t)
        with rasterio.open(tmp / f"mt_x{s}.tif") as f:
            px = f.width * f.height
        out[f"x{s}"] = {"output_mpx": px / 1e6, "seconds": best, "mpx_per_s": px / 1e6 / best}
    # From the product, decode included: the CLI's block-by-block path and the service
    # (corsa_openeo_render on the engine: 512 px chunks with the head's overlap).
    for name, extra in (("cli", []), ("service", ["--engine"])):
        t = time.perf_counter()
        assert cli.main(["decompress", str(tmp / "mt_prod"), "-o", str(tmp / f"mt_{name}.tif"), "--scale", "2"] + extra) == 0
        seconds = time.perf_counter() - t
        out[f"x2_from_product_{name}"] = {"seconds": seconds, "mpx_per_s": out["x2"]["output_mpx"] / seconds}
    return out


def _means(rows: list[dict], keys: tuple[str, ...], by: str) -> dict:
    groups = sorted({r[by] for r in rows})
    return {g: {k: float(np.mean([r[k] for r in rows if r[by] == g])) for k in keys} | {"cases": sum(r[by] == g for r in rows)}
            for g in groups}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa3.1")
    p.add_argument("--quality", type=int, default=4)
    p.add_argument("--factors", default="2,4,6")
    p.add_argument("--split", default="test", help="the split whose scenes and series are rendered (test; val chose settings)")
    p.add_argument("--parts", default="date,scale,speed", help="any of date, scale, speed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/render.json"))
    args = p.parse_args(argv)
    factors = tuple(int(f) for f in args.factors.split(","))
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dates = any_date(args.model, args.quality, tmp, args.split) if "date" in parts else []
        scales = any_scale(args.model, args.quality, tmp, factors, args.split) if "scale" in parts else []
        speed = throughput(args.model, args.quality, tmp) if "speed" in parts else {}
    summary = {"throughput": speed}
    if dates:
        keys = ("psnr_rendered", "psnr_linear", "psnr_nearer") + (("psnr_head_alone",) if "psnr_head_alone" in dates[0] else ())
        summary["any_date"] = {"mean": {k: float(np.mean([r[k] for r in dates])) for k in keys} | {"cases": len(dates)},
                               "by_group": _means(dates, keys, "group")}
    if scales:
        keys = ("psnr_rendered", "psnr_cubic")
        summary["any_scale"] = {
            f"x{f}": {"mean": {k: float(np.mean([r[k] for r in scales if r["factor"] == f])) for k in keys}
                      | {"cases": sum(r["factor"] == f for r in scales)},
                      "by_group": _means([r for r in scales if r["factor"] == f], keys, "group")} for f in factors}
    result = {"model": args.model, "quality": args.quality, "split": args.split, "cpu": cpu_name(), "summary": summary, "any_date": dates,
              "any_scale": scales}
    return report.save(result, args.out, summary)


if __name__ == "__main__":
    main()
