"""Rate-distortion of our models against JPEG 2000 and JPEG XL on the test split, in one run.

    python -m benchmarks.rd --models corsa512 --out benchmarks/results/rd.json

Follows shared/EVAL_PROTOCOL.md: CF against 88 bit per 10 m pixel, PSNR with peak 10000 over the
10 bands (mean over scenes), baselines bisected per scene to the CF our codec reaches on that same
scene (so every row compares at equal size), plus CF 32.74 and the stretch point CF 98.
Also: per-band RMSE, codebook usage, encoder/decoder throughput (1 and 2 threads) and peak memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from rasterio.transform import Affine

from corsa.formats import codebook_product
from corsa.codec.codebook import CodebookCodec
from corsa.formats.datasets import LOADERS, default_data_root, load_split
from corsa.codec.index_coder import EntropyModel, pack_fixed
from corsa.core.metrics import band_rmse, compression_factor, psnr
from corsa.core.scene import BANDS, RAW_BITS_PER_PIXEL

from .baselines import CODECS, at_cf

SPLIT_FILE = Path(__file__).resolve().parents[1] / "training" / "split.json"


def split_cf(pixels: list[int], sizes: list[int]) -> float:
    """CF of a whole split: all raw bits over all compressed bits."""
    return compression_factor(int(np.sum(pixels)), int(np.sum(sizes)))


def run_model(name: str, scenes: list) -> dict:
    codec = CodebookCodec(name)
    entropy = EntropyModel.load(codec.path)
    rows, used0, used1 = [], np.zeros(codec.card["codebooks"]["k0"], int), np.zeros(codec.card["codebooks"]["k1"], int)
    for s in scenes:
        idx0, idx1 = codec.encode(s.data)
        rec = codec.decode(idx0, idx1, shape=s.data.shape[1:])
        rec[:, s.nodata_mask] = 0
        fixed = pack_fixed(idx0, idx1, codec.card["codebooks"]["k0"], codec.card["codebooks"]["k1"])
        stream = entropy.encode(idx0, idx1)
        back0, back1 = entropy.decode(stream, idx0.shape)
        if not (np.array_equal(back0, idx0) and np.array_equal(back1, idx1)):
            raise AssertionError(f"entropy coding of {s.name} is not lossless")
        with tempfile.TemporaryDirectory() as tmp:
            codebook_product.write_date(Path(tmp), "d", idx0, idx1, s.nodata_mask, Affine(*s.transform) if s.transform else None,
                               s.crs, codec.model_id, codec.card["files"]["decoder"]["sha256"])
            product_bytes = codebook_product.product_bytes(Path(tmp), "d")
        used0 += np.bincount(idx0.ravel(), minlength=used0.size)
        used1 += np.bincount(idx1.ravel(), minlength=used1.size)
        rows.append({"scene": s.name, "pixels": s.pixels, "psnr": psnr(s.data, rec),
                     "rmse": band_rmse(s.data, rec).tolist(), "fixed_bytes": len(fixed),
                     "entropy_bytes": len(stream), "product_bytes": product_bytes})
    return {"rows": rows, "usage0": used0, "usage1": used1}


def usage_summary(counts: np.ndarray) -> dict:
    p = counts[counts > 0] / counts.sum()
    return {"used": int((counts > 0).sum()), "size": int(counts.size),
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def _baseline_job(args: tuple) -> dict:
    data, codec_name, target = args
    res = at_cf(data, CODECS[codec_name], target)
    if res is None:
        return {"codec": codec_name, "target": target, "reached": False}
    res.pop("decoded")
    return {**res, "target": target, "reached": True}


def run_baselines(scenes: list, targets: list[list[float]], workers: int) -> dict:
    """targets[i][j]: the CF to reach on scene j for target set i."""
    jobs = [(s.data, c, float(t[j])) for t in targets for c in CODECS for j, s in enumerate(scenes)]
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_baseline_job, jobs, chunksize=1))
    out, k = {}, 0
    for ti in range(len(targets)):
        for c in CODECS:
            out.setdefault(ti, {})[c] = results[k:k + len(scenes)]
            k += len(scenes)
    return out


def throughput(model: str, threads: int, size: int = 1024, repeats: int = 3) -> dict:
    """Megapixels (10 m) per second for encode and decode of a real crop (Major-TOM scene)."""
    (scene,) = LOADERS["majortom"](default_data_root())
    data = scene.data[:, :size, :size]
    codec = CodebookCodec(model, threads=threads)
    codec.decode(*codec.encode(data[:, :64, :64]))  # create sessions outside the timing
    t_enc, t_dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        idx0, idx1 = codec.encode(data)
        t_enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        codec.decode(idx0, idx1, shape=data.shape[1:])
        t_dec.append(time.perf_counter() - t)
    mp = size * size / 1e6
    return {"threads": threads, "tile": size, "encode_mp_s": mp / min(t_enc), "decode_mp_s": mp / min(t_dec)}


def peak_memory(model: str, size: int = 1024) -> float:
    """Peak resident memory (MB) of a fresh process that encodes and decodes a size x size crop."""
    code = ("from benchmarks.memory import peak_rss_mb; from benchmarks.rd import throughput; "
            f"throughput({model!r}, 2, {size}, 1); print(peak_rss_mb())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def summarise(scenes: list, ours: dict, base: dict, target_names: list[str]) -> dict:
    pixels = [s.pixels for s in scenes]
    summary = {}
    for name, res in ours.items():
        rows = res["rows"]
        summary[name] = {
            "psnr_mean": float(np.mean([r["psnr"] for r in rows])),
            "psnr_min": float(np.min([r["psnr"] for r in rows])),
            "cf_fixed": split_cf(pixels, [r["fixed_bytes"] for r in rows]),
            "cf_entropy": split_cf(pixels, [r["entropy_bytes"] for r in rows]),
            "cf_product": split_cf(pixels, [r["product_bytes"] for r in rows]),
            "rmse_per_band": dict(zip(BANDS, np.sqrt(np.mean([np.square(r["rmse"]) for r in rows], 0)).round(1).tolist())),
            "usage0": usage_summary(res["usage0"]), "usage1": usage_summary(res["usage1"]),
        }
    for ti, per_codec in base.items():
        for c, rows in per_codec.items():
            ok = [r for r in rows if r["reached"]]
            summary[f"{c}@{target_names[ti]}"] = {
                "psnr_mean": float(np.mean([r["psnr"] for r in ok])) if ok else None,
                "cf": split_cf([p for p, r in zip(pixels, rows) if r["reached"]], [r["bytes"] for r in ok]) if ok else None,
                "scenes_reached": len(ok), "scenes": len(rows),
                "layout_20m_share": float(np.mean([r["layout"] == "20m" for r in ok])) if ok else None,
            }
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["corsa512"])
    p.add_argument("--stretch-cf", type=float, default=98.0)
    p.add_argument("--limit", type=int, default=0, help="only the first N test scenes (a quick look)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/rd.json"))
    args = p.parse_args(argv)
    t0 = time.time()
    scenes = load_split(SPLIT_FILE, "test")
    if args.limit:
        scenes = scenes[: args.limit]
    ours = {Path(m).name: run_model(m, scenes) for m in args.models}
    first = ours[Path(args.models[0]).name]["rows"]
    targets = [[RAW_BITS_PER_PIXEL / 2.6875] * len(scenes),
               [compression_factor(r["pixels"], r["entropy_bytes"]) for r in first],
               [args.stretch_cf] * len(scenes)]
    names = ["cf32.7", f"{Path(args.models[0]).name}-entropy-cf", f"cf{args.stretch_cf:g}"]
    base = run_baselines(scenes, targets, args.workers)
    result = {"scenes": [s.name for s in scenes], "summary": summarise(scenes, ours, base, names),
              "ours": {m: {"rows": r["rows"]} for m, r in ours.items()},
              "baselines": {names[ti]: v for ti, v in base.items()}}
    if not args.no_speed:
        result["speed"] = {Path(m).name: {"throughput": [throughput(m, t) for t in (1, 2)],
                                          "peak_rss_mb_1024px": peak_memory(m)} for m in args.models}
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(render_markdown(result))
    print(render_markdown(result))
    return result


def render_markdown(result: dict) -> str:
    """The tables BENCHMARKS.md quotes."""
    summ = result["summary"]
    lines = ["| codec | CF | mean PSNR (dB) | worst scene (dB) | scenes |", "|---|---|---|---|---|"]
    n = len(result["scenes"])
    for name, r in summ.items():
        if "cf_fixed" in r:
            lines.append(f"| {name}, fixed-width indices | {r['cf_fixed']:.1f} | {r['psnr_mean']:.2f} | {r['psnr_min']:.2f} | {n} |")
            lines.append(f"| {name}, range-coded indices | {r['cf_entropy']:.1f} | {r['psnr_mean']:.2f} | {r['psnr_min']:.2f} | {n} |")
            lines.append(f"| {name}, GeoTIFF product files | {r['cf_product']:.1f} | {r['psnr_mean']:.2f} | {r['psnr_min']:.2f} | {n} |")
    for name, r in summ.items():
        if "cf_fixed" not in r and r["psnr_mean"] is not None:
            lines.append(f"| {name} | {r['cf']:.1f} | {r['psnr_mean']:.2f} | | {r['scenes_reached']}/{r['scenes']} |")
    lines += ["", "| model | " + " | ".join(BANDS) + " | level-0 codes used (perplexity) | level-1 codes used (perplexity) |",
              "|---|" + "---|" * (len(BANDS) + 2)]
    for name, r in summ.items():
        if "cf_fixed" in r:
            u0, u1 = r["usage0"], r["usage1"]
            lines.append(f"| {name} RMSE (DN) | " + " | ".join(f"{v:.0f}" for v in r["rmse_per_band"].values())
                         + f" | {u0['used']}/{u0['size']} ({u0['perplexity']:.0f}) | {u1['used']}/{u1['size']} ({u1['perplexity']:.0f}) |")
    for name, res in result["ours"].items():
        worst = sorted(res["rows"], key=lambda r: r["psnr"])[:5]
        lines += ["", f"{name}, the five worst test scenes: "
                  + "; ".join(f"{r['scene']} {r['psnr']:.1f} dB" for r in worst)]
    for name, sp in (result.get("speed") or {}).items():
        lines += ["", f"{name}: peak RSS {sp['peak_rss_mb_1024px']:.0f} MB (encode + decode of a 1024 x 1024 px crop)", "",
                  "| threads | encode (MP/s) | decode (MP/s) |", "|---|---|---|"]
        lines += [f"| {t['threads']} | {t['encode_mp_s']:.2f} | {t['decode_mp_s']:.2f} |" for t in sp["throughput"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
