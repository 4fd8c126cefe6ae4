"""Gap filling from a series' other dates: a date's gap pixels are the interpolation in time of its
previous and next decoded dates, corrected by a network (``fill.onnx`` of the model,
``training.train_fill``) that reads the latents: the date's own around the gap (what this day's light
and ground look like there) and its neighbours'. Gaps are the date's nodata pixels; every other
pixel keeps the value a plain decode gives.
"""
from __future__ import annotations

import numpy as np

FILE_NAME = "fill.onnx"
REACH_CELLS = 9          # the network's receptive radius in latent cells (a 3x3 conv and 4 residual blocks)
MAX_DAYS = 365


def day_planes(days_before: int, days_after: int, shape: tuple[int, int]) -> np.ndarray:
    """(2, h, w) float32: the days to the previous and the next date, in months, capped at a year."""
    d = np.array([min(max(days_before, 0), MAX_DAYS), min(max(days_after, 0), MAX_DAYS)], np.float32) / 30.0
    return np.broadcast_to(d[:, None, None], (2,) + shape).astype(np.float32)


def gap_cells(mask: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
    """A pixel mask (h, w) -> (cells) True where the 4 x 4 px cell holds a masked pixel (the last
    cells of a grid that is no multiple of 4 are partial)."""
    padded = np.zeros((4 * cells[0], 4 * cells[1]), bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask[: 4 * cells[0], : 4 * cells[1]]
    return padded.reshape(cells[0], 4, cells[1], 4).any((1, 3))


def interpolate(before: np.ndarray, after: np.ndarray, gap_before: np.ndarray, gap_after: np.ndarray,
                days_before: int, days_after: int) -> np.ndarray:
    """Linear interpolation in time of two decoded dates (bands, h, w); where one of them is a gap
    (h, w) the other one alone."""
    wb = np.float32(max(days_after, 0) + 1e-3) * ~gap_before
    wa = np.float32(max(days_before, 0) + 1e-3) * ~gap_after
    total = wb + wa
    out = (before * wb + after * wa) / np.where(total > 0, total, 1)
    return np.where(total > 0, out, 0.5 * (before + after)).astype(np.float32)


def fill_pixels(session, z: np.ndarray, gap: np.ndarray, before: tuple[np.ndarray, np.ndarray],
                after: tuple[np.ndarray, np.ndarray], days: tuple[int, int], interp: np.ndarray,
                scale: float = 1.0) -> np.ndarray:
    """The filled pixels (bands, 4h, 4w) of a window: ``interp`` (the interpolation in time) plus the
    network's correction, times ``scale`` (the model card's correction_scale, chosen on the validation
    split), from the dequantised latent (L, h, w) with its gap cells (h, w) and the (latent, gap cells)
    of the dates before and after it."""
    shape = z.shape[1:]
    feeds = {"z": z[None], "m": gap[None, None], "zp": before[0][None], "mp": before[1][None, None],
             "zn": after[0][None], "mn": after[1][None, None], "days": day_planes(*days, shape)[None],
             "interp": interp[None]}
    (corr,) = session.run(None, {k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items()})
    return interp + np.float32(scale) * corr[0]
