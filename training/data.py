"""Training data: scenes of a split held in memory, random augmented crops, input statistics."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from corsa.core.scene import Scene


@dataclass
class BandStats:
    """Yeo-Johnson lambda, mean and std of the transformed bands, mean and std of raw DN."""

    lmbda: list[float]
    yj_mean: list[float]
    yj_std: list[float]
    dn_mean: list[float]
    dn_std: list[float]


def yeo_johnson(x: np.ndarray, lmbda: float) -> np.ndarray:
    """Yeo-Johnson for x >= 0 (DN are never negative); lmbda is kept away from 0 by the fit."""
    return ((x + 1.0) ** lmbda - 1.0) / lmbda


def fit_band_stats(scenes: list[Scene], samples: int = 200_000, seed: int = 0) -> BandStats:
    """Fit per-band Yeo-Johnson and standardisation on valid pixels drawn from the scenes."""
    rng = np.random.default_rng(seed)
    pix = np.concatenate([s.data.reshape(s.data.shape[0], -1)[:, ~s.nodata_mask.ravel()] for s in scenes], 1)
    pix = pix[:, rng.choice(pix.shape[1], min(samples, pix.shape[1]), replace=False)].astype(np.float64)
    lmbda, yj_mean, yj_std = [], [], []
    for band in pix:
        lam = float(stats.yeojohnson_normmax(band))
        lam = lam if abs(lam) > 1e-3 else 1e-3
        y = yeo_johnson(band, lam)
        lmbda.append(lam)
        yj_mean.append(float(y.mean()))
        yj_std.append(float(y.std()))
    return BandStats(lmbda, yj_mean, yj_std, pix.mean(1).tolist(), pix.std(1).tolist())


class CropSampler:
    """Random crops (with flips and quarter turns) from in-memory scenes, chosen by area.

    Crops that are mostly nodata are drawn again: they would teach the model nothing. With
    ``max_weight_px`` a scene weighs at most that many pixels, so a few large scenes do not dominate.
    ``boost`` gives the scenes a test picks (a scene by the first test it passes) that share of the
    draws together: surfaces the data holds little of are seen more often.
    """

    def __init__(self, scenes: list[Scene], crop: int, seed: int, max_weight_px: int | None = None,
                 boost: Sequence[tuple[Callable[[np.ndarray], bool], float]] = ()):
        self.scenes = [s.data.astype(np.float32) for s in scenes if min(s.data.shape[1:]) >= crop]
        if not self.scenes:
            raise ValueError(f"no scene is at least {crop} px on each side")
        area = np.array([(a.shape[1] - crop + 1) * (a.shape[2] - crop + 1) for a in self.scenes], float)
        if max_weight_px:
            area = np.minimum(area, max_weight_px)
        kind = np.full(len(self.scenes), -1)
        for k, (test, _) in enumerate(boost):
            for i, a in enumerate(self.scenes):
                if kind[i] < 0 and test(a):
                    kind[i] = k
        rest = 1.0 - sum(share for k, (_, share) in enumerate(boost) if (kind == k).any())
        if rest <= 0:
            raise ValueError("boosted shares must leave some draws to the other scenes")
        self.p = np.zeros(len(area))
        for k, share in [(-1, rest)] + [(k, share) for k, (_, share) in enumerate(boost)]:
            if (kind == k).any():
                self.p[kind == k] = share * area[kind == k] / area[kind == k].sum()
        self.boosted = [int((kind == k).sum()) for k in range(len(boost))]
        self.crop = crop
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int) -> np.ndarray:
        out = np.empty((n, self.scenes[0].shape[0], self.crop, self.crop), np.float32)
        i = 0
        while i < n:
            a = self.scenes[self.rng.choice(len(self.scenes), p=self.p)]
            y = self.rng.integers(0, a.shape[1] - self.crop + 1)
            x = self.rng.integers(0, a.shape[2] - self.crop + 1)
            tile = a[:, y:y + self.crop, x:x + self.crop]
            if np.all(tile == 0, axis=0).mean() > 0.5:
                continue
            tile = np.rot90(tile, self.rng.integers(4), axes=(1, 2))
            if self.rng.integers(2):
                tile = tile[:, :, ::-1]
            out[i] = tile
            i += 1
        return out

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state
