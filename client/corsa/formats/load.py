"""Read a user's multi-band GeoTIFF into the canonical scene."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError

from corsa.core.scene import BANDS, Scene, to_uint16


class InputError(ValueError):
    """An input raster cannot be read as the 10 Sentinel-2 bands."""


def read_geotiff(path: str | Path) -> Scene:
    """Bands are taken by their descriptions when these name all 10 bands, otherwise the file
    must hold exactly the 10 bands in canonical order (B02 B03 B04 B05 B06 B07 B08 B8A B11 B12)."""
    path = Path(path)
    try:
        src = rasterio.open(path)
    except RasterioIOError as e:
        raise InputError(f"cannot open {path} as a raster: {e}") from e
    with src:
        names = tuple(d.upper() if d else "" for d in src.descriptions)
        if set(BANDS) <= set(names):
            order = [names.index(b) + 1 for b in BANDS]
        elif src.count == len(BANDS):
            order = list(range(1, len(BANDS) + 1))
        else:
            missing = sorted(set(BANDS) - set(names))
            raise InputError(f"{path} has {src.count} bands and its descriptions lack {missing}: "
                             f"need the 10 bands {', '.join(BANDS)} (by description, or exactly 10 in that order)")
        if np.dtype(src.dtypes[0]).kind not in "uif":
            raise InputError(f"{path} has data type {src.dtypes[0]}, expected integer or float DN")
        data = src.read(order)
        crs = src.crs.to_string() if src.crs else None
        transform = tuple(src.transform)[:6]
    return Scene(path.stem, "file", str(path), to_uint16(data), crs, transform)
