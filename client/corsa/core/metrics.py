"""Quality and size figures exactly as shared/EVAL_PROTOCOL.md defines them."""
from __future__ import annotations

import numpy as np

from corsa.core.scene import PEAK_DN, RAW_BITS_PER_PIXEL, nodata_mask


def squared_error(reference: np.ndarray, decoded: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-band sum of squared DN errors over valid pixels, and the valid pixel count."""
    valid = ~nodata_mask(reference)
    diff = reference[:, valid].astype(np.float64) - decoded[:, valid].astype(np.float64)
    return (diff ** 2).sum(1), int(valid.sum())


def psnr(reference: np.ndarray, decoded: np.ndarray) -> float:
    """PSNR in dB, peak 10000, MSE over all bands on the 10 m grid, nodata excluded."""
    sse, n = squared_error(reference, decoded)
    mse = sse.sum() / (n * reference.shape[0])
    return float("inf") if mse == 0 else float(10 * np.log10(PEAK_DN ** 2 / mse))


def band_psnr(reference: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Per-band PSNR in dB, peak 10000, nodata excluded."""
    sse, n = squared_error(reference, decoded)
    with np.errstate(divide="ignore"):  # an exact band is inf dB, as in psnr
        return 10 * np.log10(PEAK_DN ** 2 * n / sse)


def band_rmse(reference: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Per-band RMSE in DN over valid pixels."""
    sse, n = squared_error(reference, decoded)
    return np.sqrt(sse / n)


def compression_factor(n_pixels: int, compressed_bytes: int) -> float:
    """CF against native storage (88 bit per 10 m pixel)."""
    return RAW_BITS_PER_PIXEL * n_pixels / (8 * compressed_bytes)


# Scenes smaller than this on a side are "small patches" (BigEarthNet's 120 px): the classical
# codecs' per-band headers dominate there at high CF, so EVAL_PROTOCOL's means leave them out.
SMALL_SIDE = 130


def is_small(data: np.ndarray) -> bool:
    """Whether a (bands, y, x) scene is a small patch, reported apart from the means."""
    return min(data.shape[1:]) < SMALL_SIDE
