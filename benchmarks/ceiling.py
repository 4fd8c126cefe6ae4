"""Ablation (issue 28, the top levels): what caps a model's PSNR at high quality.

    python -m benchmarks.ceiling --model corsa4.1 --levels 1 6 9 12 --out benchmarks/results/ceiling_corsa4.1.json

Three figures on the split's scenes of 130 px or more (every ``--every``-th), the network alone (float decoder,
no refinement, no loop filter):

- per level, the plain decode of the stored integers beside the decode of the latent *unrounded* (``latent x gain
  x inverse gain``): what the networks give with no quantisation at all, the autoencoder's ceiling;
- a linear transform of the latent's width: the principal components of 4 x 4 px blocks of all 10 bands
  (160 values; fitted on every 7th training scene), all but the latent's width of them dropped;
- ``--klt-cf``: that transform as a codec, all 160 components quantised with one step and counted at their
  empirical entropy per component on the scene (an ideal adaptive coder's size, no side information), against the
  best of JPEG 2000 / JPEG XL at the same CF on the test split: how a linear transform's gain moves with the rate.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from corsa.codec.models import VariableRateCodec
from corsa.core.machine import cpu_name
from corsa.core.metrics import compression_factor, is_small, psnr
from corsa.core.scene import to_uint16
from corsa.formats.datasets import load_split

from .baselines import CODECS, at_cf
from .rd import SPLIT_FILE
from .rd_rate import source_of

BLOCK = 4


def _blocks(a: np.ndarray) -> np.ndarray:
    """(bands, H, W) -> (cells, bands x 4 x 4), edges repeated to whole blocks."""
    a = np.pad(a, ((0, 0), (0, -a.shape[1] % BLOCK), (0, -a.shape[2] % BLOCK)), mode="edge").astype(np.float64)
    c, h, w = a.shape
    return a.reshape(c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(1, 3, 0, 2, 4).reshape(-1, c * BLOCK * BLOCK)


def _image(cells: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    hp, wp = -(-h // BLOCK) * BLOCK, -(-w // BLOCK) * BLOCK
    img = cells.reshape(hp // BLOCK, wp // BLOCK, c, BLOCK, BLOCK).transpose(2, 0, 3, 1, 4).reshape(c, hp, wp)
    return to_uint16(img[:, :h, :w])


def components(every: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Mean and principal axes (columns, largest variance first) of the training split's 4 x 4 px blocks."""
    x = np.concatenate([_blocks(s.data) for s in load_split(SPLIT_FILE, "train")[::every]])
    x = x[(x != 0).any(1)]
    mean = x.mean(0)
    _, axes = np.linalg.eigh(np.cov((x - mean).T))
    return mean, axes[:, ::-1]


def autoencoder_ceiling(model: str, levels: list[int], scenes: list) -> dict:
    codec = VariableRateCodec(model, threads=2, kernels="fp32")
    latents = [codec.latent(s.data) for s in scenes]
    out = {}
    for q in levels:
        gain = codec._tables[0][codec.level(q)][:, None, None]
        # decode() dequantises what it is given: the latent times the gain, rounded or not
        rounded = [psnr(s.data, codec.decode(codec.quantise(y, q), q, s.data.shape[1:])) for s, y in zip(scenes, latents)]
        unrounded = [psnr(s.data, codec.decode(y * gain, q, s.data.shape[1:])) for s, y in zip(scenes, latents)]
        out[q] = {"rounded_db": float(np.mean(rounded)), "unrounded_db": float(np.mean(unrounded))}
        print(f"level {q}: integers {out[q]['rounded_db']:.2f} dB, latent unrounded {out[q]['unrounded_db']:.2f} dB",
              flush=True)
    return {"channels": codec.channels, "levels": out}


def linear_ceiling(mean: np.ndarray, axes: np.ndarray, keep: list[int], scenes: list) -> dict:
    out = {}
    for k in keep:
        p = axes[:, :k]
        out[k] = float(np.mean([psnr(s.data, _image((_blocks(s.data) - mean) @ p @ p.T + mean, s.data.shape))
                                for s in scenes]))
        print(f"principal components, {k} of {axes.shape[1]} kept: {out[k]:.2f} dB", flush=True)
    return out


def _entropy_bits(q: np.ndarray) -> float:
    _, counts = np.unique(q, return_counts=True)
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def klt_code(data: np.ndarray, mean: np.ndarray, axes: np.ndarray, step: float) -> tuple[float, float]:
    """(CF, PSNR) of the scene coded as 4 x 4 block components quantised with ``step``, at their entropy."""
    q = np.round((_blocks(data) - mean) @ axes / step)
    bits = sum(_entropy_bits(q[:, j]) for j in range(q.shape[1]))
    return compression_factor(data.shape[1] * data.shape[2], bits / 8), psnr(data, _image(q * step @ axes.T + mean,
                                                                                          data.shape))


def klt_against_classical(mean: np.ndarray, axes: np.ndarray, cfs: list[float], scenes: list) -> list[dict]:
    rows = []
    for s in scenes:
        for target in cfs:
            lo, hi = 1.0, 4000.0                       # step in DN: CF rises with it
            for _ in range(14):
                mid = float(np.sqrt(lo * hi))
                lo, hi = (mid, hi) if klt_code(s.data, mean, axes, mid)[0] < target else (lo, mid)
            cf, ours = klt_code(s.data, mean, axes, hi)
            best = max((at_cf(s.data, CODECS[c], cf) for c in ("jpeg2000", "jpegxl")), key=lambda r: r["psnr"])
            rows.append({"scene": s.name, "source": source_of(s), "target_cf": target, "cf": cf, "psnr": ours,
                         "classical_psnr": best["psnr"], "gain": ours - best["psnr"]})
            print(f"{rows[-1]['source']} {s.name[:30]} CF {cf:.1f}: {ours:.2f} dB, classical {best['psnr']:.2f} "
                  f"({rows[-1]['gain']:+.2f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa4.1")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 6, 9, 12])
    p.add_argument("--split", default="val")
    p.add_argument("--every", type=int, default=3, help="every n-th scene of the split (130 px or more)")
    p.add_argument("--keep", type=int, nargs="+", default=[64, 96, 120])
    p.add_argument("--klt-cf", type=float, nargs="*", default=[30.0, 15.0, 10.5])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    scenes = [s for s in load_split(SPLIT_FILE, args.split) if not is_small(s.data)][::args.every]
    mean, axes = components()
    result = {"model": args.model, "split": args.split, "scenes": len(scenes), "cpu": cpu_name(),
              "autoencoder": autoencoder_ceiling(args.model, args.levels, scenes),
              "principal_components_db": linear_ceiling(mean, axes, args.keep, scenes)}
    if args.klt_cf:
        test = [s for s in load_split(SPLIT_FILE, "test") if not is_small(s.data) and s.extra.get("level") != "L1C"]
        rows = klt_against_classical(mean, axes, args.klt_cf, test[::4])
        by_source: dict = {}
        for r in rows:
            by_source.setdefault(r["target_cf"], {}).setdefault(r["source"], []).append(r["gain"])
        result["klt"] = {"rows": rows, "mean_over_sources": {
            cf: float(np.mean([np.mean(g) for g in src.values()])) for cf, src in by_source.items()},
            "per_source": {cf: {k: float(np.mean(g)) for k, g in src.items()} for cf, src in by_source.items()}}
        print("block components against the best classical codec, mean over sources:",
              {cf: round(g, 2) for cf, g in result["klt"]["mean_over_sources"].items()})
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
