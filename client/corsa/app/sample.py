"""The sample scene and the pictures the demo and the local page show: the default scene (the
shared data's Major-TOM scene, or the same place from Earth Search's STAC API), a scene written as
the 10-band GeoTIFF the CLI takes, and a before / after quicklook."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from corsa.formats.datasets import LOADERS, default_data_root
from corsa.core.scene import BANDS, Scene, to_uint16

EARTH_SEARCH = "https://earth-search.aws.element84.com/v1"
DEFAULT_PLACE = {"west": 17.90, "south": 0.0, "east": 17.99, "north": 0.09, "crs": "EPSG:4326"}
DEFAULT_DATES = ["2022-07-06", "2022-07-07"]


def quicklook(scene: np.ndarray, decoded: np.ndarray, path: Path) -> Path:
    """True-colour input (left) and reconstruction (right) as one PNG, both stretched alike
    between the input's 1st and 99th percentiles."""
    rgb = [BANDS.index(b) for b in ("B04", "B03", "B02")]
    lo, hi = np.percentile(scene[rgb], [1, 99])
    pair = np.concatenate([scene[rgb], np.full((3, scene.shape[1], 8), lo), decoded[rgb]], axis=2)
    img = (np.clip((pair - lo) / max(hi - lo, 1), 0, 1) ** (1 / 1.4) * 255).astype(np.uint8)
    tmp = path.with_name(path.stem + ".part.png")
    with warnings.catch_warnings():  # a picture, not a map: no georeferencing wanted
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", driver="PNG", width=img.shape[2], height=img.shape[1], count=3,
                           dtype="uint8") as dst:
            dst.write(img)
    tmp.replace(path)
    for aux in path.parent.glob(tmp.name + ".aux.xml"):
        aux.unlink()
    return path


def default_scene() -> Scene:
    root = default_data_root()
    if root.is_dir():
        return next(LOADERS["majortom"](root))
    from corsa.formats.stac_source import StacSource

    import requests
    from pystac_client.exceptions import APIError

    print(f"shared data not at {root}: loading the scene from {EARTH_SEARCH}")
    try:
        cube = StacSource(EARTH_SEARCH).load(DEFAULT_PLACE, DEFAULT_DATES, list(BANDS)).isel(t=0)
    except (APIError, requests.RequestException, OSError) as e:
        print(f"corsa demo: error: no shared data at {root} (set CORSA_DATA, or clone beside shared/) and "
              f"{EARTH_SEARCH} cannot be read: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    data = to_uint16(cube.values[:, :1024, :1024])
    tr = cube.rio.transform()
    return Scene("earth-search-S2-20220706", "stac", "earth-search", data, str(cube.rio.crs), tuple(tr)[:6],
                 "2022-07-06")


def write_input(scene: Scene, path: Path) -> Path:
    """The scene as the 10-band GeoTIFF the CLI takes (band descriptions and date tag)."""
    with rasterio.open(path, "w", driver="GTiff", width=scene.data.shape[2], height=scene.data.shape[1],
                       count=len(BANDS), dtype="uint16", crs=scene.crs,
                       transform=Affine(*scene.transform) if scene.transform else None,
                       tiled=True, compress="zstd", predictor=2) as dst:
        dst.write(scene.data)
        for i, b in enumerate(BANDS, 1):
            dst.set_band_description(i, b)
        if scene.date:
            dst.update_tags(TIFFTAG_DATETIME=f"{scene.date.replace('-', ':')} 00:00:00")
    return path
