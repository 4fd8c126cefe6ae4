"""Two models' rate-distortion at equal CF, from their ``benchmarks.rd_rate`` results: at each CF of
the first model's levels, the second's PSNR and gain over the classical codecs interpolated on its
curve (mean over L2A sources, linear in log CF). What an ablation of one model against another reports.

    python -m benchmarks.compare_rd benchmarks/results/rd_rate_corsa3.1.json benchmarks/results/rd_rate_corsa4a.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def at_equal_cf(first: dict, second: dict) -> list[dict]:
    rows = []
    curve = sorted((lv["l2a_sources"]["cf"], lv["l2a_sources"]["psnr"], lv["l2a_sources"]["gain_mean"])
                   for lv in second["levels"])
    x = np.log([c[0] for c in curve])
    for lv in first["levels"]:
        m = lv["l2a_sources"]
        psnr, gain = (float(np.interp(np.log(m["cf"]), x, [c[k] for c in curve])) for k in (1, 2))
        inside = x[0] <= np.log(m["cf"]) <= x[-1]
        rows.append({"quality": lv["quality"], "cf": round(m["cf"], 1), "psnr": [round(m["psnr"], 2), round(psnr, 2)],
                     "gain": [round(m["gain_mean"], 2), round(gain, 2)], "inside_second_range": bool(inside)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    args = p.parse_args(argv)
    first, second = (json.loads(f.read_text()) for f in (args.first, args.second))
    rows = at_equal_cf(first, second)
    a, b = first["model"], second["model"]
    print(f"| {a} quality | CF | PSNR {a} / {b} | difference | gain {a} / {b} | difference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quality']} | {r['cf']} | {r['psnr'][0]:.2f} / {r['psnr'][1]:.2f} | {r['psnr'][1] - r['psnr'][0]:+.2f} | "
              f"{r['gain'][0]:+.2f} / {r['gain'][1]:+.2f} | {r['gain'][1] - r['gain'][0]:+.2f} |")
    return rows


if __name__ == "__main__":
    main()
