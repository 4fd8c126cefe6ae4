"""Ablation (issue 28, levels to CF 10): a residual layer on top of a level's product.

    python -m benchmarks.residual_layer --model corsa3.12 --levels 7 9 --steps 128 96 64 48 32 --out benchmarks/results/residual_layer.json
    python -m benchmarks.residual_layer --coder jpeg2000 --model corsa4.1 --levels 9 10 --steps 62 65 68 --lam 1000 --out benchmarks/results/residual_jpeg2000.json

The decoder saturates at the high levels (a finer latent or a finer refinement adds hundredths of a dB: BENCHMARKS.md,
issue 28, seventeenth part); a classical codec keeps gaining about 6 dB a bit. This measures what a residual layer
would give before any format carries one: each test scene is coded at a level as its product is (refined, the loop
filter included), then the residual (truth - decoding) is quantised pixel by pixel with a step in DN and a dead zone
(the 10 m bands on the 10 m grid, the 20 m bands on their 2 x 2 means, added back on the 2 x 2 pixels), and its size
is the adaptive code length of its integers: per 512 px block and band, in contexts of the coded neighbours'
magnitudes (left, above) and the decoding's local activity (its gradient in steps), the Krichevsky-Trofimov
estimate that an adaptive range coder reaches within a few bytes, large values escaped in Exp-Golomb bits.
CF = (product bytes + residual bytes) against the protocol's 88 bit a pixel; gains against the best of JPEG 2000 /
JPEG XL at that CF on the scene (``benchmarks.baseline_curves``). Nothing is written: a prototype's figures.

``--coder jpeg2000``: the residual coded by JPEG 2000 instead (OpenJPEG through imagecodecs, the ``--steps`` its
fixed-quality targets in dB against the 16-bit peak, the same for every band: about the same squared error in each),
block by block as a product would store it (512 px blocks of the 10 m bands, their 256 px of the 20 m bands'
2 x 2 means, one codestream a band and block, each codestream's whole length counted). Wavelets spend few bits
where the residual is smooth, where the pixel layer's integers spend some on every pixel.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.special import gammaln

from corsa.codec import residual_coder
from corsa.codec.models import VariableRateCodec
from corsa.core.machine import cpu_name
from corsa.core.metrics import compression_factor, is_small, psnr
from corsa.core.scene import BANDS, to_uint16
from corsa.formats import stream_format
from corsa.formats.datasets import load_split

from . import baseline_curves
from .rd import SPLIT_FILE
from .rd_rate import compare, source_of, summarise_levels

GRID20 = ("B05", "B06", "B07", "B8A", "B11", "B12")
DEADZONE = 0.15          # of a step: |residual| rounds down unless this much past the half step
ESCAPE = 15              # |integer| from here: an escape symbol, then Exp-Golomb bits and a sign
ACTIVITY = np.array([0.5, 1.0, 2.0, 4.0])   # decoding's gradient in steps: context edges
BLOCK_PX = 512


def quantise(residual: np.ndarray, step: float) -> np.ndarray:
    return (np.sign(residual) * np.floor(np.abs(residual) / step + 0.5 - DEADZONE)).astype(np.int32)


def code_bits(q: np.ndarray, decoded: np.ndarray, step: float, block: int) -> float:
    """Adaptive code length (bits) of one band's integers (h, w), in blocks of ``block`` a side, with
    contexts (``decoded``: the band's decoding on the integers' grid)."""
    a = np.abs(q)
    left, up = np.zeros_like(a), np.zeros_like(a)
    left[:, 1:], up[1:] = a[:, :-1], a[:-1]
    grad = np.zeros(decoded.shape, np.float32)
    grad[:, 1:] += np.abs(np.diff(decoded, axis=1))
    grad[1:] += np.abs(np.diff(decoded, axis=0))
    ctx = np.minimum(left + up, 3) * (len(ACTIVITY) + 1) + np.searchsorted(ACTIVITY, grad / step)
    symbol = np.clip(q, -ESCAPE, ESCAPE) + ESCAPE                 # 0 and 2 ESCAPE: escapes
    big = a[a >= ESCAPE] - ESCAPE + 1
    bits = float((2 * np.floor(np.log2(big)) + 2).sum())          # Exp-Golomb and the sign
    alphabet, contexts = 2 * ESCAPE + 1, 4 * (len(ACTIVITY) + 1)
    h, w = q.shape
    for y in range(0, h, block):
        for x in range(0, w, block):
            c, s = ctx[y:y + block, x:x + block].ravel(), symbol[y:y + block, x:x + block].ravel()
            counts = np.bincount(c * alphabet + s, minlength=contexts * alphabet).reshape(contexts, alphabet)
            n = counts.sum(1)
            bits += float((gammaln(n + alphabet / 2) - gammaln(alphabet / 2)
                           - (gammaln(counts + 0.5) - gammaln(0.5)).sum(1)).sum() / np.log(2))
    return bits


def residual_layer(truth: np.ndarray, decoded: np.ndarray, valid: np.ndarray, step: float, **_) -> tuple[np.ndarray, float]:
    """The decoding with its residual layer at ``step`` DN, and that layer's bits (the JPEG 2000 coders' options
    do not apply)."""
    out, bits = decoded.copy(), 0.0
    for b, name in enumerate(BANDS):
        r = np.where(valid, truth[b].astype(np.float32) - decoded[b], 0)
        if name in GRID20:
            q = quantise(residual_coder.means2(r), step)
            coarse = residual_coder.means2(decoded[b])
            out[b] += np.repeat(np.repeat(q * np.float32(step), 2, 0), 2, 1)[:r.shape[0], :r.shape[1]]
            bits += code_bits(q, coarse, step, BLOCK_PX // 2)
        else:
            q = quantise(r, step)
            out[b] += q * np.float32(step)
            bits += code_bits(q, decoded[b], step, BLOCK_PX)
    return out, bits


def _jpeg2000(a: np.ndarray, target: float | None, block: int, weight: float, lam: float) -> tuple[np.ndarray, int]:
    """``a`` (h, w) coded block by block (``residual_coder``, each block of ``block`` a side at ``target`` dB, None:
    where its error falls by lambda a bit; or none): what readers decode, and the bytes with a byte of flags a block."""
    out, size = np.zeros(a.shape, np.float32), 0
    for y in range(0, a.shape[0], block):
        for x in range(0, a.shape[1], block):
            part = a[y:y + block, x:x + block]
            stream, _ = residual_coder.encode(part, lam, weight, target)
            out[y:y + block, x:x + block] = residual_coder.decode(stream, part.shape)
            size += len(stream) + 1
    return out, size


def jpeg2000_layer(truth: np.ndarray, decoded: np.ndarray, valid: np.ndarray, target_db: float | None,
                   lam: float = 0.0, grid20: str = "20m") -> tuple[np.ndarray, float]:
    """The decoding with its residual coded by JPEG 2000 at ``target_db`` (None: each block's where its error falls
    by ``lam`` a bit), and that layer's bits. ``grid20``: the 20 m bands' residual on their 2 x 2 means ("20m"),
    on the 10 m grid ("10m"), or each band on the one that costs it least by ``lam`` ("either")."""
    out, size = decoded.copy(), 0
    for b, name in enumerate(BANDS):
        r = np.where(valid, truth[b].astype(np.float32) - decoded[b], 0)
        grids = (grid20,) if grid20 != "either" else ("20m", "10m")
        options = []
        if name not in GRID20 or "10m" in grids:
            options.append(_jpeg2000(r, target_db, BLOCK_PX, 1.0, lam))
        if name in GRID20 and "20m" in grids:
            d, n = _jpeg2000(residual_coder.means2(r), target_db, BLOCK_PX // 2, 4.0, lam)
            options.append((np.repeat(np.repeat(d, 2, 0), 2, 1)[:r.shape[0], :r.shape[1]], n))
        # a 20 m band on whichever grid costs it least (its source's 20 m pixels may hold 10 m detail)
        d, n = min(options, key=lambda o: float(((r - o[0]) ** 2).sum()) + lam * 8 * o[1])
        out[b] += d
        size += n
    return out, 8.0 * size


def jpeg2000_rd_layer(truth: np.ndarray, decoded: np.ndarray, valid: np.ndarray, step: float, grid20: str = "20m",
                      **_) -> tuple[np.ndarray, float]:
    """``jpeg2000_layer`` with each block's target where its error falls by a lambda (``step``, DN^2 a bit) a bit
    (``residual_coder.target_db``, as the products code it; until the twenty-fourth part the best of 7 targets): a
    level by its slope, as JPEG 2000's own rate allocation, instead of one distortion for every scene."""
    return jpeg2000_layer(truth, decoded, valid, None, step, grid20)


LAYERS = {"pixels": residual_layer, "jpeg2000": jpeg2000_layer, "jpeg2000-rd": jpeg2000_rd_layer}


def measure(codec: VariableRateCodec, scenes, levels: list[int], steps: list[float], coder: str = "pixels",
            lam: float = 0.0, grid20: str = "20m") -> list[dict]:
    rows = []
    for i, s in enumerate(scenes, 1):
        for q in levels:
            ints = codec.quantise(codec.latent(s.data, q), q)
            data, rec, cells = stream_format.encode_refined(codec, s.data, ints, q, s.nodata_mask, None, None, "undated")
            if cells is not None:
                stream_format.refine(rec, cells, codec.refiner, codec.level(q), ~s.nodata_mask)
            base = {"scene": s.name, "source": source_of(s), "small": is_small(s.data),
                    "l1c": s.extra.get("level") == "L1C", "pixels": s.pixels}
            for step in [0.0] + steps:
                out, bits = (rec, 0.0) if not step else LAYERS[coder](s.data, rec, ~s.nodata_mask, step,
                                                                           lam=lam, grid20=grid20)
                dec = to_uint16(out)
                dec[:, s.nodata_mask] = 0
                size = len(data) + int(np.ceil(bits / 8))
                rows.append({**base, "quality": f"{q}+{step:g}", "bytes": size, "residual_bytes": size - len(data),
                             "cf": compression_factor(s.pixels, size), "psnr": psnr(s.data, dec)})
        print(f"[{i}/{len(scenes)}] {s.name}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa3.12")
    p.add_argument("--levels", type=int, nargs="+", default=[7, 9])
    p.add_argument("--coder", choices=sorted(LAYERS), default="pixels",
                   help="the residual's integers pixel by pixel (--steps: DN), JPEG 2000 (--steps: dB targets) or JPEG 2000 "
                   "with each block's target chosen by a lambda (jpeg2000-rd; --steps: lambdas, DN^2 a bit)")
    p.add_argument("--steps", type=float, nargs="+", default=[128, 96, 64, 48, 32])
    p.add_argument("--grid20", choices=("20m", "10m", "either"), default="20m",
                   help="jpeg2000: the 20 m bands' residual on their 2 x 2 means, on the 10 m grid, or either by lambda")
    p.add_argument("--lam", type=float, default=0.0, help="jpeg2000: a block's codestream kept where it takes off more "
                   "than this many DN^2 a bit (0: every one kept)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    codec = VariableRateCodec(args.model, threads=1)
    scenes = load_split(SPLIT_FILE, args.split)
    curves = baseline_curves.fill(scenes, baseline_curves.split_cache(args.split))
    rows = measure(codec, scenes, args.levels, args.steps, args.coder, args.lam, args.grid20)
    compare(rows, curves)
    labels = [f"{q}+{s:g}" for q in args.levels for s in [0.0] + args.steps]
    summary = summarise_levels(rows, labels)
    result = {"model": codec.model_id, "split": args.split, "cpu": cpu_name(), "coder": args.coder, "lam": args.lam, "grid20": args.grid20, "deadzone": DEADZONE,
              "levels": summary, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    claim = {r["source"] for r in rows if not r["l1c"] and not r["small"]}
    print("level+step | CF | PSNR | gain (mean over L2A sources) | worst L2A source | residual share of bytes")
    for lv in summary:
        src = lv["l2a_sources"]
        per = {k: v["gain_mean"] for k, v in lv["per_source"].items() if k in claim and v.get("gain_mean") is not None}
        share = np.mean([r["residual_bytes"] / r["bytes"] for r in rows if r["quality"] == lv["quality"]])
        print(f"{lv['quality']} | {src['cf']:.1f} | {src['psnr']:.2f} | {src['gain_mean']:+.2f} | "
              f"{min(per.values()):+.2f} | {share:.2f}")
    return result


if __name__ == "__main__":
    main()
