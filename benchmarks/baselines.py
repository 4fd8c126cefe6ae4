"""JPEG 2000 and JPEG XL at a target CF, as shared/EVAL_PROTOCOL.md prescribes.

Each band is coded on its own; one quality knob per scene is bisected until the scene's CF reaches
the target. Two layouts are tried, the better kept: every band on the 10 m grid, and the 20 m bands
2x2-averaged to 20 m (bilinear back to 10 m after decoding). Codestreams carry no container
(J2K codestream, bare JPEG XL codestream), the fairest size for these codecs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import imagecodecs
import numpy as np
from scipy import ndimage

from corsa.core.metrics import compression_factor, psnr
from corsa.core.scene import BANDS, BANDS_20M, to_uint16

IS_20M = np.array([b in BANDS_20M for b in BANDS])


@dataclass(frozen=True)
class ClassicCodec:
    name: str
    encode: Callable[[np.ndarray, float], bytes]
    decode: Callable[[bytes], np.ndarray]
    lo: float              # knob range; quality rises from lo to hi
    hi: float
    log: bool              # bisect the knob on a log scale


def _j2k_encode(band: np.ndarray, level: float) -> bytes:
    # level: OpenJPEG's fixed-quality PSNR target (dB, 16-bit peak).
    return imagecodecs.jpeg2k_encode(band, level=level, codecformat=imagecodecs.JPEG2K.CODEC.J2K)


def _jxl_encode(band: np.ndarray, quality: float) -> bytes:
    # quality is 1/distance, so that both knobs rise with quality.
    return imagecodecs.jpegxl_encode(band, distance=1.0 / quality)


CODECS = {
    "jpeg2000": ClassicCodec("jpeg2000", _j2k_encode, imagecodecs.jpeg2k_decode, 20.0, 110.0, False),
    "jpegxl": ClassicCodec("jpegxl", _jxl_encode, imagecodecs.jpegxl_decode, 1 / 25.0, 50.0, True),
}


def _downsample(band: np.ndarray) -> np.ndarray:
    h, w = band.shape
    padded = np.pad(band.astype(np.float64), ((0, h % 2), (0, w % 2)), mode="edge")
    return padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).mean((1, 3))


def _upsample(band: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    up = ndimage.zoom(band.astype(np.float64), 2, order=1, grid_mode=True, mode="nearest")
    return up[: shape[0], : shape[1]]


def code_scene(data: np.ndarray, codec: ClassicCodec, knob: float, layout: str) -> tuple[int, np.ndarray]:
    """Bytes of all band codestreams, and the decoded (10, H, W) scene."""
    shape = data.shape[1:]
    total, out = 0, np.empty(data.shape, np.float64)
    for i, band in enumerate(data):
        coarse = layout == "20m" and IS_20M[i]
        src = to_uint16(_downsample(band)) if coarse else band
        stream = codec.encode(np.ascontiguousarray(src), knob)
        total += len(stream)
        dec = codec.decode(stream).astype(np.float64)
        out[i] = _upsample(dec, shape) if coarse else dec
    return total, to_uint16(out)


def at_cf(data: np.ndarray, codec: ClassicCodec, target_cf: float, iters: int = 12) -> dict:
    """Best PSNR of the codec with CF >= target over both layouts (None if unreachable)."""
    n = data.shape[1] * data.shape[2]
    budget = 88 * n / (8 * target_cf)
    best = None
    for layout in ("10m", "20m"):
        lo, hi = codec.lo, codec.hi
        f = (np.log, np.exp) if codec.log else (lambda v: v, lambda v: v)
        a, b = f[0](lo), f[0](hi)
        found = None
        size, dec = code_scene(data, codec, f[1](a), layout)
        if size > budget:
            continue
        found = (f[1](a), size, dec)
        for _ in range(iters):
            mid = (a + b) / 2
            size, dec = code_scene(data, codec, f[1](mid), layout)
            if size <= budget:
                a, found = mid, (f[1](mid), size, dec)
            else:
                b = mid
        knob, size, dec = found
        score = psnr(data, dec)
        if best is None or score > best["psnr"]:
            best = {"codec": codec.name, "layout": layout, "knob": float(knob), "bytes": int(size),
                    "cf": compression_factor(n, size), "psnr": score, "decoded": dec}
    return best
