"""STAC as a load_collection source: a STAC API (Earth Search, Planetary Computer, CDSE) or a
static item collection (a JSON file), loaded with odc-stac onto one 10 m grid.

Asset names differ between catalogues; each band is looked up under its usual aliases. The 20 m
bands are resampled to 10 m by nearest neighbour, and the +1000 offset of processing baseline
04.00 and later is removed unless the catalogue says it already did.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pystac
import rasterio
import rasterio.warp
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from corsa.core.scene import BANDS, BOA_ADD_OFFSET

ALIASES = {
    "B02": ("B02", "blue", "B02_10m"), "B03": ("B03", "green", "B03_10m"), "B04": ("B04", "red", "B04_10m"),
    "B05": ("B05", "rededge1", "B05_20m"), "B06": ("B06", "rededge2", "B06_20m"),
    "B07": ("B07", "rededge3", "B07_20m"), "B08": ("B08", "nir", "B08_10m"), "B8A": ("B8A", "nir08", "B8A_20m"),
    "B11": ("B11", "swir16", "B11_20m"), "B12": ("B12", "swir22", "B12_20m"),
}


class StacError(ValueError):
    """A STAC source has no usable items, or items lack bands."""


def item_from_files(item_id: str, when: datetime, band_files: dict[str, Path], properties: dict | None = None) -> pystac.Item:
    """A STAC item (with projection metadata, as odc-stac needs) for local per-band GeoTIFFs."""
    assets, bbox, epsg = {}, None, None
    for band, path in band_files.items():
        with rasterio.open(path) as src:
            epsg = src.crs.to_epsg()
            assets[band] = pystac.Asset(str(Path(path).resolve()), media_type=pystac.MediaType.COG,
                                        roles=["data"], extra_fields={"proj:shape": list(src.shape),
                                                                      "proj:transform": list(src.transform)[:6]})
            b = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds)
            bbox = b if bbox is None else (min(bbox[0], b[0]), min(bbox[1], b[1]), max(bbox[2], b[2]), max(bbox[3], b[3]))
    geometry = {"type": "Polygon", "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]],
                                                    [bbox[0], bbox[3]], [bbox[0], bbox[1]]]]}
    item = pystac.Item(item_id, geometry, list(bbox), when, {**(properties or {}), "proj:epsg": epsg})
    for band, asset in assets.items():
        item.add_asset(band, asset)
    return item


def _asset_key(item: pystac.Item, band: str) -> str:
    for alias in ALIASES[band]:
        if alias in item.assets:
            return alias
    raise StacError(f"item {item.id} has no asset for {band} (looked for {', '.join(ALIASES[band])})")


def _offset(item: pystac.Item) -> int:
    props = item.properties
    if props.get("earthsearch:boa_offset_applied") is True:
        return 0
    baseline = props.get("s2:processing_baseline") or props.get("processing:version")
    try:
        return BOA_ADD_OFFSET if baseline and float(baseline) >= 4.0 else 0
    except ValueError:
        return 0


@dataclass
class StacSource:
    """``href``: a STAC API URL or a local item-collection JSON; ``collection``: the API's collection id."""

    href: str
    collection: str = "sentinel-2-l2a"

    def items(self, bbox: tuple[float, float, float, float] | None, interval: list | None,
              max_cloud_cover: float | None = None) -> list[pystac.Item]:
        when = "/".join(str(v) if v else ".." for v in interval) if interval else None
        if Path(self.href).is_file():
            items = list(pystac.ItemCollection.from_file(self.href))
            items = [i for i in items if _overlaps(i.bbox, bbox) and _in_interval(i.datetime, interval)]
        else:
            from pystac_client import Client

            query = {"eo:cloud_cover": {"lte": max_cloud_cover}} if max_cloud_cover is not None else None
            items = list(Client.open(self.href).search(collections=[self.collection], bbox=bbox, datetime=when,
                                                       query=query).items())
        if max_cloud_cover is not None:
            items = [i for i in items if i.properties.get("eo:cloud_cover", 0) <= max_cloud_cover]
        if not items:
            raise StacError(f"no STAC item of {self.href} matches bbox {bbox} and dates {interval}")
        return items

    def load(self, spatial_extent: dict | None, temporal_extent: list | None, bands: list[str] | None = None,
             max_cloud_cover: float | None = None) -> xr.DataArray:
        import odc.stac

        bands = list(bands or BANDS)
        bbox = None
        if spatial_extent:
            if str(spatial_extent.get("crs", "EPSG:4326")).upper() not in ("EPSG:4326", "4326"):
                bbox = rasterio.warp.transform_bounds(spatial_extent["crs"], "EPSG:4326", spatial_extent["west"],
                                                      spatial_extent["south"], spatial_extent["east"], spatial_extent["north"])
            else:
                bbox = (spatial_extent["west"], spatial_extent["south"], spatial_extent["east"], spatial_extent["north"])
        items = self.items(bbox, temporal_extent, max_cloud_cover)
        keys = {b: _asset_key(items[0], b) for b in bands}
        epsg = items[0].properties.get("proj:epsg")
        grid = _tile_geobox(items, keys, bbox)
        ds = odc.stac.load(items, bands=list(keys.values()), resampling="nearest", groupby="solar_day",
                           chunks={"x": 1024, "y": 1024},
                           **({"geobox": grid} if grid is not None else
                              {"crs": f"EPSG:{epsg}" if epsg else None, "resolution": 10, "bbox": bbox}))
        cube = ds.rename({v: k for k, v in keys.items()}).to_dataarray("bands").rename(time="t")
        cube = cube.transpose("t", "bands", "y", "x")
        offsets = _day_offsets(items, cube["t"].values)
        if any(offsets):
            off = xr.DataArray(np.array(offsets, np.int32), dims="t", coords={"t": cube["t"]})
            cube = xr.where(cube > 0, np.maximum(cube.astype(np.int32) - off, 1), 0).astype(np.uint16)
        return cube.rio.write_crs(ds.odc.crs.to_wkt())


def _tile_geobox(items: list[pystac.Item], keys: dict[str, str], bbox):
    """The items' own 10 m grid when they share one (one tile, several dates), cropped to bbox;
    None otherwise (odc-stac then picks a grid from crs, resolution and bbox)."""
    from odc.geo.geobox import GeoBox
    from odc.geo.geom import BoundingBox
    from rasterio.transform import Affine

    ten = [k for b, k in keys.items() if b in ("B02", "B03", "B04", "B08")]
    grids = {(tuple(i.assets[ten[0]].extra_fields.get("proj:shape") or ()),
              tuple(i.assets[ten[0]].extra_fields.get("proj:transform") or ()),
              i.properties.get("proj:epsg")) for i in items} if ten else set()
    if len(grids) != 1:
        return None
    shape, transform, epsg = grids.pop()
    if not (shape and transform and epsg):
        return None
    gbox = GeoBox(shape, Affine(*transform), f"EPSG:{epsg}")
    if bbox is not None:
        region = BoundingBox(*bbox, crs="EPSG:4326").to_crs(gbox.crs)
        gbox = _crop(gbox, region)
    return gbox


def _crop(gbox, region):
    """The part of ``gbox`` (whole pixels) that covers ``region`` (a bounding box in its CRS)."""
    pts = [gbox.wld2pix(x, y) for x, y in ((region.left, region.bottom), (region.right, region.top),
                                               (region.left, region.top), (region.right, region.bottom))]
    ys = [p[1] for p in pts]
    xs = [p[0] for p in pts]
    y0, y1 = max(0, int(np.floor(min(ys)))), min(gbox.shape[0], int(np.ceil(max(ys))))
    x0, x1 = max(0, int(np.floor(min(xs)))), min(gbox.shape[1], int(np.ceil(max(xs))))
    if y1 <= y0 or x1 <= x0:
        raise StacError("the spatial extent does not overlap the items' grid")
    return gbox[y0:y1, x0:x1]


def _day_offsets(items: list[pystac.Item], days: np.ndarray) -> list[int]:
    by_day: dict = {}
    for item in items:
        by_day.setdefault(np.datetime64(item.datetime.replace(tzinfo=None), "D"), set()).add(_offset(item))
    out = []
    for t in days:
        found = by_day.get(np.datetime64(t, "D"), {0})
        if len(found) > 1:
            raise StacError(f"items of {np.datetime64(t, 'D')} mix processing baselines with and without the offset")
        out.append(found.pop())
    return out


def _overlaps(a, b) -> bool:
    return b is None or not (a[2] < b[0] or a[0] > b[2] or a[3] < b[1] or a[1] > b[3])


def _in_interval(when: datetime | None, interval: list | None) -> bool:
    if not interval or when is None:
        return True
    t = np.datetime64(when.replace(tzinfo=None))
    start, end = interval
    return (start is None or t >= np.datetime64(start)) and (end is None or t < np.datetime64(end))
