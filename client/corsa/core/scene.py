"""The canonical scene every part of corsa works on (see shared/EVAL_PROTOCOL.md).

10 Sentinel-2 L2A bands on one 10 m grid, uint16 DN = surface reflectance x 10000, with the
processing-baseline offset removed, and nodata = a pixel whose bands are all 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
BANDS_10M: tuple[str, ...] = ("B02", "B03", "B04", "B08")
BANDS_20M: tuple[str, ...] = ("B05", "B06", "B07", "B8A", "B11", "B12")
# Native Sentinel-2 storage: 16 bit per 10 m pixel for the four 10 m bands plus 16 bit per
# 20 m pixel (a quarter of a 10 m pixel) for the six 20 m bands.
RAW_BITS_PER_PIXEL: float = 16 * len(BANDS_10M) + 16 * len(BANDS_20M) / 4  # = 88
PEAK_DN: float = 10000.0
BOA_ADD_OFFSET: int = 1000


@dataclass
class Scene:
    """One date of one location: ``data`` is (band, y, x) uint16 in ``BANDS`` order."""

    name: str
    group: str
    location: str
    data: np.ndarray
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    date: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def nodata_mask(self) -> np.ndarray:
        return nodata_mask(self.data)

    @property
    def pixels(self) -> int:
        return int(self.data.shape[1] * self.data.shape[2])


def nodata_mask(data: np.ndarray) -> np.ndarray:
    """True where every band is 0 (the protocol's nodata)."""
    return np.all(data == 0, axis=0)


def baseline_offset(product_id: str) -> int:
    """The DN offset of a product: baseline 04.00 and later add BOA_ADD_OFFSET.

    The baseline is read from the ``_Nxxxx_`` field of a Sentinel-2 product name; N9999 marks
    reprocessed archive data without the offset (as BigEarthNet's patches are named).
    """
    match = re.search(r"_N(\d{4})_", product_id)
    if match is None:
        raise ValueError(f"no processing baseline (_Nxxxx_) in product id {product_id!r}")
    baseline = int(match.group(1))
    return BOA_ADD_OFFSET if 400 <= baseline < 9999 else 0


def remove_offset(dn: np.ndarray, offset: int) -> np.ndarray:
    """Subtract the baseline offset, keeping 0 (nodata) at 0 and clipping dark pixels to 1."""
    if offset == 0:
        return dn
    out = np.where(dn > 0, np.maximum(dn.astype(np.int32) - offset, 1), 0)
    return out.astype(np.uint16)


def to_uint16(dn: np.ndarray) -> np.ndarray:
    """Round and clip a float or signed DN array into uint16, NaN becoming 0 (nodata)."""
    arr = np.asarray(dn)
    if not np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr, 0, np.iinfo(np.uint16).max).astype(np.uint16)
    # In the array's own precision (rounding a float32 in float64 gives the same integers), one
    # temporary: fmax/fmin take the number where the other operand is NaN, so NaN becomes 0 here.
    out = np.rint(arr)
    np.fmax(out, 0, out=out)
    np.fmin(out, np.iinfo(np.uint16).max, out=out)
    return out.astype(np.uint16)
