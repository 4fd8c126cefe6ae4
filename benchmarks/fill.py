"""Gap filling (`corsa decompress --fill`) against linear interpolation in time and the nearest date,
on cloud-shaped gaps placed on clear dates of the test split's WorldStrat series.

    python -m benchmarks.fill --model corsa3 --out benchmarks/results/fill.json

A case: a date of a test series with a date before and after it and no cloud of its own (scene
classes), a real cloud mask (WorldStrat scene classes 3, 8, 9, 10 of a test or validation area's
cloudy date, so never one the network trained with) turned and cropped onto it; those pixels become
nodata in the input. The series is compressed (corsa3, --quality), then decoded twice: with --fill
(the gap predicted from the compressed data), and plainly (the neighbours decoded). PSNR over the gap
pixels against the true reflectances for: the fill; linear interpolation in time of the two
neighbouring decoded dates; the nearer decoded date copied; and, for reference, the plain decode of
the same date compressed without the gap. With --split val the same on the validation areas, where
the fill's sizes (``corsa_udf.FILL_*``) were chosen, never on the test split.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import corsa_udf
import numpy as np
import rasterio

from corsa.app import cli
from corsa.formats.datasets import cloud_fraction, cloud_masks, default_data_root, load_split, revisit_series
from corsa.core.metrics import psnr

from .series import write_inputs
from corsa.core.machine import cpu_name

SPLIT_FILE = Path(__file__).resolve().parents[1] / "training" / "split.json"


def _placed(masks: list[np.ndarray], rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A cloud mask turned and put on a scene of ``shape`` (cropped, or padded with clear sky), one
    that covers 10-60% of it (the first of 200 draws that does, else the last)."""
    for _ in range(200):
        m = np.rot90(masks[rng.integers(len(masks))], rng.integers(4))
        out = np.zeros(shape, bool)
        h, w = min(shape[0], m.shape[0]), min(shape[1], m.shape[1])
        out[:h, :w] = m[:h, :w]
        if 0.1 < out.mean() < 0.6:
            break
    return out


def _clear(scene) -> bool:
    return cloud_fraction(scene) < 0.005 and not (scene.data == 0).all(0).any()


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as f:
        return f.read().astype(np.float64)


def fill_settings() -> dict:
    return {k: getattr(corsa_udf, k) for k in dir(corsa_udf) if k.startswith("FILL_")}


def run(model: str, quality: int, per_area: int, seed: int, split_name: str = "test") -> dict:
    rng = np.random.default_rng(seed)
    split = json.loads(SPLIT_FILE.read_text())
    masks = cloud_masks(default_data_root(), set(split["test"]) | set(split["val"]), 0.1, 0.7)
    runs = [r for r in revisit_series(load_split(SPLIT_FILE, split_name)) if r[0].group == "worldstrat"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n, run_ in enumerate(runs):
            targets = [t for t in range(1, len(run_) - 1) if _clear(run_[t])][:per_area]
            for t in targets:
                s = run_[t]
                h, w = s.data.shape[1:]
                m = _placed(masks, rng, (h, w))
                gapped = [(x.date, x) for x in run_]
                holed = s.data.copy()
                holed[:, m] = 0
                case = tmp / f"c{n}_{t}"
                src = case / "in"
                write_inputs([(d, x if i != t else dataclasses.replace(x, data=holed))
                               for i, (d, x) in enumerate(gapped)], src)
                clean = case / "clean"
                write_inputs(gapped, clean)
                for folder, name in ((src, "prod"), (clean, "prod_clean")):
                    assert cli.main(["compress", str(folder), "-o", str(case / name), "--model", model,
                                     "--quality", str(quality)]) == 0
                assert cli.main(["decompress", str(case / "prod"), "-o", str(case / "filled.tif"), "--date", s.date,
                                 "--fill"]) == 0
                assert cli.main(["decompress", str(case / "prod"), "-o", str(case / "plain")]) == 0
                assert cli.main(["decompress", str(case / "prod_clean"), "-o", str(case / "ref.tif"), "--date",
                                 s.date]) == 0
                before, after = run_[t - 1], run_[t + 1]
                db = int((np.datetime64(s.date) - np.datetime64(before.date)).astype(int))
                da = int((np.datetime64(after.date) - np.datetime64(s.date)).astype(int))
                dec_b = _read(case / "plain" / f"corsa_decoded_{before.date}.tif")
                dec_a = _read(case / "plain" / f"corsa_decoded_{after.date}.tif")
                linear = (dec_b * da + dec_a * db) / (da + db)
                nearest = dec_b if db <= da else dec_a
                filled, ref = _read(case / "filled.tif"), _read(case / "ref.tif")
                plain_t = _read(case / "plain" / f"corsa_decoded_{s.date}.tif")
                gap = m & ~(s.data == 0).all(0) & ~(before.data == 0).all(0) & ~(after.data == 0).all(0)
                truth = s.data[:, gap]
                row = {"location": s.location, "date": s.date, "gap_fraction": float(m.mean()),
                       "days_before": db, "days_after": da,
                       "psnr_fill": psnr(truth, filled[:, gap]), "psnr_linear": psnr(truth, linear[:, gap]),
                       "psnr_nearest": psnr(truth, nearest[:, gap]), "psnr_decoded_without_gap": psnr(truth, ref[:, gap]),
                       "outside_gap_unchanged": bool(np.array_equal(filled[:, ~m], plain_t[:, ~m]))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    keys = ("psnr_fill", "psnr_linear", "psnr_nearest", "psnr_decoded_without_gap")
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    summary["gain_over_linear_db"] = summary["psnr_fill"] - summary["psnr_linear"]
    summary["gain_over_nearest_db"] = summary["psnr_fill"] - summary["psnr_nearest"]
    summary["cases"] = len(rows)
    summary["outside_gap_unchanged"] = all(r["outside_gap_unchanged"] for r in rows)
    return {"model": model, "quality": quality, "split": split_name, "fill": fill_settings(), "cpu": cpu_name(),
            "rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa3")
    p.add_argument("--quality", type=int, default=4)
    p.add_argument("--per-area", type=int, default=3, help="clear dates per test area that get a gap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", help="test, or val (where the fill's sizes are chosen)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fill.json"))
    args = p.parse_args(argv)
    result = run(args.model, args.quality, args.per_area, args.seed, args.split)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
