"""Per-pixel classes on the 20 m grid from the Sen2Cor scene classification (SCL) of WorldStrat.

The SCL files lie on the same ~10 m grid as the L2A stacks. A class on the 20 m grid (the level-0
cell of the codec: 2 x 2 input pixels, grid padded to a multiple of 4 like the encoder pads) is the
most frequent merged class of its 4 pixels; cells with fewer than 3 labelled pixels get no label.
Merges (counts in shared/data/README.md terms, 10 m pixels of all 208 SCL files):
  cloud        = SCL 8 cloud medium prob. + 9 cloud high prob. + 10 thin cirrus
  shadow/dark  = SCL 3 cloud shadow + 2 dark area / topographic shadow (both rare, both dark)
  no label     = SCL 0 nodata, 1 saturated/defective (absent here), 7 unclassified (no class)
"""
from __future__ import annotations

import numpy as np

# value, name, the SCL codes merged into it, colour (RGB) of the GeoTIFF colour table
CLASSES = (
    (1, "vegetation", (4,), (0, 160, 0)),
    (2, "not_vegetated", (5,), (255, 230, 90)),
    (3, "water", (6,), (0, 0, 255)),
    (4, "snow_ice", (11,), (0, 255, 255)),
    (5, "cloud", (8, 9, 10), (220, 220, 220)),
    (6, "cloud_shadow_dark", (2, 3), (60, 60, 60)),
)
CLOUD_CLASSES = (5, 6)   # the values that mark a pixel unusable (cloud, shadow)
STRIDE0, PAD = 2, 4


def merge_scl(scl: np.ndarray) -> np.ndarray:
    """SCL codes -> class values (0 = no label)."""
    lut = np.zeros(256, np.uint8)
    for value, _, codes, _ in CLASSES:
        lut[list(codes)] = value
    return lut[scl]


def to_grid20(classes: np.ndarray, min_votes: int = 3, values: tuple[int, ...] | None = None) -> np.ndarray:
    """(H, W) class values on the 10 m grid -> (ceil(H/4)*2, ceil(W/4)*2) mode per 2 x 2 cell;
    ``values``: the class values (default: the scene classes')."""
    values = values or tuple(v for v, *_ in CLASSES)
    h, w = classes.shape
    padded = np.pad(classes, ((0, -h % PAD), (0, -w % PAD)))
    cells = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2)
    votes = np.stack([(cells == v).sum((1, 3)) for v in values])
    best = votes.argmax(0)
    out = np.array(values, np.uint8)[best]
    out[votes.sum(0) < min_votes] = 0
    return out


def mean_grid20(dn: np.ndarray) -> np.ndarray:
    """(bands, H, W) -> (bands, ceil(H/4)*2, ceil(W/4)*2) float32 mean of each 2 x 2 cell (edge padding)."""
    h, w = dn.shape[1:]
    x = np.pad(dn.astype(np.float32), ((0, 0), (0, -h % PAD), (0, -w % PAD)), mode="edge")
    return x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2).mean((2, 4))
