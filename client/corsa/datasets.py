"""Loaders for the real Sentinel-2 groups in shared/data/s2, each brought to the canonical scene.

Band orders, grids and offsets differ per group (shared/data/README.md); each loader states its own.
Groups without all 10 bands (worldcereal: no B8A; gfmap: 4 bands) are not loaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import rasterio

from .scene import BANDS, Scene, baseline_offset, remove_offset, to_uint16, upsample_nearest

# 12-band L2A stacks (SSL4EO-S12, WorldStrat): B01..B12 without B10.
L2A_12 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
# EuroSAT-MS: 13 L1C bands with B8A last.
EUROSAT_13 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")


def default_data_root() -> Path:
    """shared/data/s2 next to the checkout, or where CORSA_DATA points."""
    env = os.environ.get("CORSA_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "s2"


def _select(stack: np.ndarray, order: tuple[str, ...]) -> np.ndarray:
    return stack[[order.index(b) for b in BANDS]]


def _geo(src: rasterio.DatasetReader) -> tuple[str | None, tuple[float, ...] | None]:
    crs = src.crs.to_string() if src.crs else None
    return crs, tuple(src.transform)[:6]


def load_terracodec(root: Path) -> Iterator[Scene]:
    """SSL4EO-S12 L2A, int16 (12, 264, 264) on 10 m; no geotransform, 4 dates per location."""
    for path in sorted((root / "terracodec_ssl4eo_s12_l2a").glob("ssl4eos12_val_*_*.tif")):
        location, t = path.stem.split("_")[-2:]
        with rasterio.open(path) as src:
            data = to_uint16(_select(src.read(), L2A_12))
        yield Scene(path.stem, "terracodec", f"ssl4eo-{location}", data, extra={"t": int(t)})


def load_worldstrat(root: Path) -> Iterator[Scene]:
    """WorldStrat L2A revisits, uint16 (12, ~158, ~158), EPSG:4326, nodata 0, bands named."""
    base = root / "worldstrat_l2a"
    for aoi in sorted(p for p in base.iterdir() if p.is_dir()):
        revisits = {r["file"]: r for r in json.loads((aoi / "revisits.json").read_text())}
        for path in sorted(aoi.glob("*-L2A.tif")):
            with rasterio.open(path) as src:
                order = tuple(src.descriptions) if all(src.descriptions) else L2A_12
                data = _select(src.read(), order)
                crs, transform = _geo(src)
            meta = revisits.get(path.name, {})
            scl = path.with_name(path.name.replace("-L2A.tif", "-SCL.tif"))
            yield Scene(path.stem, "worldstrat", aoi.name, data, crs, transform,
                        meta.get("lowres_date"),
                        extra={"scl": str(scl) if scl.exists() else None,
                               "cloud_cover": meta.get("cloud_cover")})


def _per_band_product(folder: Path, band_file: Callable[[str], Path], group: str,
                      location: str, product_id: str) -> Scene:
    """A product stored as one GeoTIFF per band at native resolution (10 m and 20 m)."""
    with rasterio.open(band_file("B02")) as ref:
        shape = ref.shape
        crs, transform = _geo(ref)
    bands = []
    for band in BANDS:
        with rasterio.open(band_file(band)) as src:
            arr = src.read(1)
        factor = shape[0] // arr.shape[0]
        bands.append(arr if factor == 1 else upsample_nearest(arr, factor, shape))
    data = remove_offset(np.stack(bands), baseline_offset(product_id))
    date = product_id.split("_")[2][:8]
    return Scene(product_id, group, location, data, crs, transform,
                 f"{date[:4]}-{date[4:6]}-{date[6:]}")


def load_majortom(root: Path) -> Iterator[Scene]:
    """Major-TOM Core cell 0U_199R: per-band files at native resolution, baseline N0400 (+1000)."""
    for folder in sorted((root / "majortom_core_s2l2a").glob("*/*/S2*_MSIL2A_*")):
        yield _per_band_product(folder, lambda b: folder / f"{b}.tif", "majortom",
                                f"majortom-{folder.parent.name}", folder.name)


def load_bigearthnet(root: Path) -> Iterator[Scene]:
    """BigEarthNet v2 patch: per-band files at native resolution, N9999 (no offset)."""
    for folder in sorted((root / "bigearthnet_s2_samples" / "BigEarthNet-S2").glob("*/S2*_MSIL2A_*")):
        yield _per_band_product(folder, lambda b: folder / f"{folder.name}_{b}.tif",
                                "bigearthnet", f"bigearthnet-{folder.name}", folder.name)


def load_eurosat(root: Path) -> Iterator[Scene]:
    """EuroSAT-MS samples: (13, 64, 64) L1C (top of atmosphere, not L2A), B8A last."""
    for path in sorted((root / "eurosat_ms_samples").glob("*/*.tif")):
        with rasterio.open(path) as src:
            data = _select(src.read(), EUROSAT_13)
            crs, transform = _geo(src)
        yield Scene(path.stem, "eurosat", f"eurosat-{path.stem}", data, crs, transform,
                    extra={"level": "L1C", "label": path.parent.name})


LOADERS: dict[str, Callable[[Path], Iterator[Scene]]] = {
    "terracodec": load_terracodec,
    "worldstrat": load_worldstrat,
    "majortom": load_majortom,
    "bigearthnet": load_bigearthnet,
    "eurosat": load_eurosat,
}


def load_all(root: Path | None = None, groups: tuple[str, ...] | None = None) -> list[Scene]:
    """Every canonical scene of the shared data (or of the named groups)."""
    root = Path(root) if root else default_data_root()
    if not root.is_dir():
        raise FileNotFoundError(f"shared Sentinel-2 data not found at {root} (set CORSA_DATA)")
    return [s for g in (groups or tuple(LOADERS)) for s in LOADERS[g](root)]


def load_split(split_file: Path, name: str, root: Path | None = None) -> list[Scene]:
    """The scenes of one split ('train', 'val' or 'test') of a split file listing locations."""
    split = json.loads(Path(split_file).read_text())
    if name not in split:
        raise KeyError(f"split {name!r} not in {split_file}: has {sorted(k for k in split if k != 'about')}")
    wanted = set(split[name])
    scenes = [s for s in load_all(root) if s.location in wanted]
    missing = wanted - {s.location for s in scenes}
    if missing:
        raise FileNotFoundError(f"locations of split {name!r} not found in the data: {sorted(missing)}")
    return scenes
