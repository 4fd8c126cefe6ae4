"""Time series coded with their history (corsa.formats.series) against their dates coded alone, on the
test split's series, through `corsa compress` / `corsa decompress`.

    python -m benchmarks.series --model corsa3 --out benchmarks/results/series.json

Per series and quality level: the bytes of the product files with every date coded alone
(--key-every 1) and as a series (the default key dates), their ratio (the target is at least 1.5,
mean over the WorldStrat test areas), and whether every date decodes to the same pixels (it must:
only the entropy coding differs). SSL4EO-S12's four seasons carry no dates: they get one every
91 days. Random access: decoding the last date of the longest series alone (--date) against
decoding that date from the product of dates coded alone, in this process, best of 3.
With ffmpeg (libx265) installed, at one quality level (--x265), HEVC as TerraCodec compares: each band a 12-bit monochrome video
of the series' dates (DN divided by the whole factor that fits them in 12 bits), its CRF bisected to the series product's size, PSNR as ours.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine

from corsa.app import cli
from corsa.formats import stream_format
from corsa.formats.datasets import load_split, revisit_series
from corsa.core.metrics import compression_factor, psnr
from corsa.core.scene import BANDS, Scene

from corsa.core.machine import cpu_name

SPLIT_FILE = Path(__file__).resolve().parents[1] / "training" / "split.json"


def _dated(run: list[Scene]) -> list[tuple[str, Scene]]:
    if all(s.date for s in run):
        return [(s.date, s) for s in run]
    start = np.datetime64("2021-01-15")
    return [(str(start + 91 * int(s.extra.get("t", i))), s) for i, s in enumerate(run)]


def write_inputs(run: list[tuple[str, Scene]], folder: Path) -> None:
    folder.mkdir(parents=True)
    for date, s in run:
        with rasterio.open(folder / f"{date}.tif", "w", driver="GTiff", width=s.data.shape[2], height=s.data.shape[1],
                           count=len(BANDS), dtype="uint16", crs=s.crs,
                           transform=Affine(*s.transform) if s.transform else Affine.identity()) as dst:
            dst.write(s.data)
            for i, b in enumerate(BANDS, 1):
                dst.set_band_description(i, b)
            dst.update_tags(TIFFTAG_DATETIME=f"{date.replace('-', ':')} 10:00:00")


def _decode_all(folder: Path, out: Path) -> dict[str, np.ndarray]:
    assert cli.main(["decompress", str(folder), "-o", str(out)]) == 0
    found = {}
    for p in sorted(out.glob("*.tif")):           # the decoded dates (a STAC document lies beside them)
        with rasterio.open(p) as f:
            found[p.name] = f.read()
    return found


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob(f"*{stream_format.SUFFIX}"))


def x265_psnr_at(run: list[tuple[str, Scene]], target_bytes: int, tmp: Path) -> dict | None:
    """HEVC (libx265, 12-bit monochrome, one video per band) at the size of ``target_bytes``."""
    if shutil.which("ffmpeg") is None:
        return None
    frames = np.stack([s.data for _, s in run]).astype(np.uint16)           # (t, band, y, x)
    # 12 bits hold DN up to 4095: brighter scenes are divided by the smallest whole factor that fits them
    # (clipping instead would cap HEVC's PSNR near 35 dB on some of these series)
    scale = max(1, -(-int(frames.max()) // 4095))
    h, w = frames.shape[2:]
    h2, w2 = h + h % 2, w + w % 2

    def code(crf: float) -> tuple[int, np.ndarray]:
        size, out = 0, np.zeros_like(frames)
        for b in range(frames.shape[1]):
            raw = np.pad(np.rint(frames[:, b] / scale), ((0, 0), (0, h2 - h), (0, w2 - w)), mode="edge")
            src, enc, dec = tmp / "band.raw", tmp / "band.hevc", tmp / "back.raw"
            src.write_bytes(raw.astype("<u2").tobytes())
            common = ["ffmpeg", "-v", "error", "-y"]
            subprocess.run(common + ["-f", "rawvideo", "-pix_fmt", "gray12le", "-s", f"{w2}x{h2}", "-i", str(src),
                                     "-c:v", "libx265", "-preset", "medium", "-x265-params", f"crf={crf}:log-level=error",
                                     "-f", "hevc", str(enc)], check=True)
            size += enc.stat().st_size
            subprocess.run(common + ["-i", str(enc), "-f", "rawvideo", "-pix_fmt", "gray12le", str(dec)], check=True)
            back = np.frombuffer(dec.read_bytes(), "<u2").reshape(-1, h2, w2)[:, :h, :w]
            out[:, b] = np.minimum(back.astype(np.int64) * scale, 65535)
        return size, out

    lo, hi = 0.0, 51.0
    best = None
    for _ in range(7):
        mid = (lo + hi) / 2
        size, out = code(mid)
        if size <= target_bytes:
            best, hi = (mid, size, out), mid
        else:
            lo = mid
    if best is None:
        return None
    crf, size, out = best
    return {"crf": crf, "bytes": size, "dn_divided_by": scale,
            "psnr_db": float(np.mean([psnr(s.data, o) for (_, s), o in zip(run, out)]))}


def run(model: str, qualities: list[int], x265: int | None) -> dict:
    runs = [_dated(r) for r in revisit_series(load_split(SPLIT_FILE, "test"))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n, r in enumerate(runs):
            src = tmp / f"in{n}"
            write_inputs(r, src)
            pixels = sum(s.pixels for _, s in r)
            for q in qualities:
                out = {}
                for name, extra in (("alone", ["--key-every", "1"]), ("series", [])):
                    folder = tmp / f"{name}{n}_{q}"
                    assert cli.main(["compress", str(src), "-o", str(folder), "--model", model, "--quality", str(q),
                                     *extra]) == 0
                    out[name] = folder
                a, b = _decode_all(out["alone"], tmp / f"da{n}_{q}"), _decode_all(out["series"], tmp / f"ds{n}_{q}")
                same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
                quality_db = float(np.mean([psnr(s.data, a[f"corsa_decoded_{d}.tif"]) for d, s in r]))
                row = {"group": r[0][1].group, "location": r[0][1].location, "dates": len(r), "quality": q,
                       "bytes_alone": _bytes(out["alone"]), "bytes_series": _bytes(out["series"]),
                       "cf_alone": compression_factor(pixels, _bytes(out["alone"])),
                       "cf_series": compression_factor(pixels, _bytes(out["series"])),
                       "psnr_db": quality_db, "decodes_identical": same}
                row["ratio"] = row["bytes_alone"] / row["bytes_series"]
                if x265 == q:
                    row["x265"] = x265_psnr_at(r, row["bytes_series"], tmp)
                rows.append(row)
                print(json.dumps(row), flush=True)
        access = _random_access(runs, tmp, model, qualities[len(qualities) // 2])
    summary = {}
    for q in qualities:
        ws = [r for r in rows if r["quality"] == q and r["group"] == "worldstrat"]
        summary[q] = {"worldstrat_mean_ratio": float(np.mean([r["ratio"] for r in ws])),
                      "worldstrat_total_ratio": sum(r["bytes_alone"] for r in ws) / sum(r["bytes_series"] for r in ws),
                      "all_decodes_identical": all(r["decodes_identical"] for r in rows if r["quality"] == q)}
    return {"model": model, "cpu": cpu_name(), "rows": rows, "summary": summary, "random_access": access}


def _random_access(runs: list, tmp: Path, model: str, q: int) -> dict:
    n = max(range(len(runs)), key=lambda i: len(runs[i]))
    last = runs[n][-1][0]
    times = {}
    for name in ("alone", "series"):
        folder = tmp / f"{name}{n}_{q}"
        best = float("inf")
        for k in range(3):
            t = time.perf_counter()
            assert cli.main(["decompress", str(folder), "-o", str(tmp / f"ra_{name}{k}.tif"), "--date", last]) == 0
            best = min(best, time.perf_counter() - t)
        times[name] = best
    return {"location": runs[n][0][1].location, "dates": len(runs[n]), "date": last, "quality": q,
            "decode_one_date_s": times, "ratio_series_to_alone": times["series"] / times["alone"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa3")
    p.add_argument("--qualities", type=int, nargs="+", default=[1, 4, 7, 9])
    p.add_argument("--x265", type=int, default=4, help="the quality level compared with HEVC (0: none)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/series.json"))
    args = p.parse_args(argv)
    result = run(args.model, args.qualities, args.x265)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1), json.dumps(result["random_access"], indent=1))
    return result


if __name__ == "__main__":
    main()
