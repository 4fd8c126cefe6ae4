"""Where load_collection finds data on the embedded engine: local files as openEO cubes.

A collection id is a path (a 10-band GeoTIFF, an openEO NetCDF cube, a folder of either, or a
compressed product folder, or a folder of a compress job's files) or a name mapped to such a path or to a STAC source (SENTINEL2_L2A ->
what the user configured). The result is a lazy (t, bands, y, x) cube with its CRS, the extents and bands applied.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from corsa.formats import job_files
from corsa.formats import codebook_product, product
from corsa.formats import stream_format
from corsa.core.scene import BANDS
from corsa.formats.stac_source import StacError, StacSource


class SourceError(ValueError):
    """A collection cannot be found or read, or the request selects nothing."""


NETCDF_PREFIXES = ("S2-L2A-", "S2-")
CHUNK = 1024          # dask chunk side of a GeoTIFF in strips
CHUNK_TILED = 512     # at least this, of a tiled GeoTIFF (``geotiff_chunks``)


def _band_name(name: str) -> str:
    for prefix in NETCDF_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _tiff_datetime(value: str | None) -> str | None:
    """TIFF's DateTime tag ('YYYY:MM:DD HH:MM:SS') as an ISO date."""
    if not value:
        return None
    day = value.split(" ")[0].replace(":", "-")
    return day if len(day) == 10 else None


_ISO_DAY = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)")          # openEO_2023-06-01Z.tif
_SENTINEL_TIME = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})T\d{6}(?!\d)")  # S2A_MSIL2A_20220706T085611_...


def date_from_name(name: str) -> str | None:
    """The acquisition day a file name carries, as openEO back ends (``openEO_2023-06-01Z.tif``)
    and Sentinel-2 products (``S2B_MSIL2A_20220706T085611_N0400_...``: the first time, the sensing
    start) name files; None when it names none, or a day that does not exist."""
    for pattern in (_ISO_DAY, _SENTINEL_TIME):
        m = pattern.search(name)
        if m:
            day = "-".join(m.groups())
            try:
                return day if str(np.datetime64(day, "D")) == day else None
            except ValueError:
                return None
    return None


def _chunk_side(block: int) -> int:
    """A chunk side of whole internal tiles of ``block`` px, at least a stream block (512 px)."""
    return block * -(-CHUNK_TILED // block)


def geotiff_chunks(path: Path) -> dict:
    """Dask chunks of a GeoTIFF's bands. A tiled file's: whole internal tiles, about 512 px a side, as a
    block's window (512 px and the network's reach) reads them. Each chunk a window touches is read and
    decompressed whole: in chunks of 1024 px, a 10980 px tile's compress spent 58 CPU-seconds
    reading, as much as the encoder (BENCHMARKS.md, issue 28). A file in strips is read whole strips at a
    time whatever the chunk: CHUNK px."""
    with rasterio.open(path) as f:
        by, bx = f.block_shapes[0]
        if bx >= f.width:
            return {"band": -1, "y": CHUNK, "x": CHUNK}
        return {"band": -1, "y": _chunk_side(by), "x": _chunk_side(bx)}


def open_geotiff(path: Path) -> xr.DataArray:
    da = rioxarray.open_rasterio(path, chunks=geotiff_chunks(path))
    long_name = da.attrs.get("long_name") or ()
    # rioxarray gives one string for a single band, a tuple otherwise
    names = [str(n).upper() for n in ((long_name,) if isinstance(long_name, str) else long_name)]
    if da.dtype.kind not in "uif":
        raise SourceError(f"{path} has data type {da.dtype}, expected integer or float DN")
    twice = sorted({n for n in names if n in BANDS and names.count(n) > 1})
    if twice:
        raise SourceError(f"{path} describes more than one band as {', '.join(twice)}")
    if set(BANDS) <= set(names):
        labels = names
    elif da.sizes["band"] == len(BANDS):
        labels = list(BANDS)
    else:
        missing = [b for b in BANDS if b not in names]
        raise SourceError(f"{path} has {da.sizes['band']} bands and lacks {', '.join(missing)}: it needs the "
                          f"10 bands {', '.join(BANDS)}, named by band descriptions or exactly 10 in that order")
    date = da.attrs.get("CORSA_DATE") or _tiff_datetime(da.attrs.get("TIFFTAG_DATETIME")) or date_from_name(path.name)
    da = da.rename(band="bands").assign_coords(bands=labels)
    nodata = da.attrs.get("_FillValue")
    if nodata not in (None, 0) and not np.isnan(nodata):
        da = da.where(da != nodata, 0)  # the protocol's nodata is 0 in every band
    t = pd.to_datetime([date]) if date else pd.DatetimeIndex([pd.NaT])
    return da.expand_dims(t=t).transpose("t", "bands", "y", "x")


def open_netcdf(path: Path) -> xr.DataArray:
    ds = xr.open_dataset(path, chunks={}, decode_coords="all", mask_and_scale=False)
    crs = geo = None
    if "crs" in ds.variables:
        crs = ds["crs"].attrs.get("spatial_ref") or ds["crs"].attrs.get("crs_wkt")
        geo = ds["crs"].attrs.get("GeoTransform")
    variables = {v: _band_name(v) for v in ds.data_vars if ds[v].dims == ("t", "y", "x")}
    if not variables:
        raise SourceError(f"{path} has no (t, y, x) band variables")
    arrays = []
    for var, band in variables.items():
        v = ds[var]
        if v.attrs.get("_Unsigned") in ("true", True) and v.dtype.kind == "i":
            v = v.astype(v.dtype.str.replace("i", "u"))
        fill = v.attrs.get("_FillValue", ds[var].encoding.get("_FillValue"))
        if fill is not None:
            v = v.where(v != np.asarray(fill).astype(v.dtype), 0)
        if v.dtype == np.uint16 and "65535" not in str(fill):
            v = v.where(v != 65535, 0)
        arrays.append(v.rename(band))
    da = xr.merge(arrays, compat="override").to_dataarray("bands").transpose("t", "bands", "y", "x")
    if crs:
        da = da.rio.write_crs(crs)
    if geo:
        # GDAL's and openEO's writers record the grid itself: exact, where coordinates carry float error
        da = da.rio.write_transform(Affine.from_gdal(*(float(v) for v in str(geo).split())))
    return da


def open_product(folder: Path) -> xr.DataArray:
    """A compressed product as the cube corsa_openeo_decompress takes: (t, [idx0, idx1, nodata], y, x) for
    a codebook model's product, (t, [z00, ..., nodata], y, x) for a variable-rate model's."""
    stream_dates = stream_format.dates_in(folder)
    if stream_dates:
        return xr.concat([product.latent_date_cube(folder, d, product.stream_codec(folder, d)) for d in stream_dates],
                         dim="t", combine_attrs="drop_conflicts")
    dates = codebook_product.dates_in(folder)
    if not dates:
        raise SourceError(f"{folder} holds no complete compressed date (corsa_<date>_L0.tif)")
    return xr.concat([codebook_product.date_cube(folder, d) for d in dates], dim="t")


@dataclass
class Catalogue:
    """Collection names the user maps to paths (SENTINEL2_L2A -> a folder, say)."""

    collections: dict[str, Path | StacSource] = field(default_factory=dict)

    def resolve(self, collection_id: str) -> Path | StacSource:
        if collection_id in self.collections:
            target = self.collections[collection_id]
            return target if isinstance(target, StacSource) else Path(target)
        path = Path(collection_id)
        if path.exists():
            return path
        known = ", ".join(sorted(self.collections)) or "none"
        raise SourceError(f"collection {collection_id!r} is neither a configured collection ({known}) "
                          "nor an existing file or folder")

    def open(self, collection_id: str) -> xr.DataArray:
        path = self.resolve(collection_id)
        if path.is_dir():
            if codebook_product.dates_in(path) or stream_format.dates_in(path):
                return open_product(path)
            if job_files.job_dates(path):
                return job_files.job_cube(path)
            files = sorted([*path.glob("*.tif"), *path.glob("*.tiff"), *path.glob("*.nc")])
            if not files:
                raise SourceError(f"{path} is empty: give a 10-band GeoTIFF, a folder of dated GeoTIFFs or an openEO "
                                  "NetCDF cube" if not any(path.iterdir()) else
                                  f"{path} holds no GeoTIFF (.tif), NetCDF (.nc) or compressed product")
            cubes = [self._open_file(f) for f in files]
            crs = {str(c.rio.crs) for c in cubes}
            if len(crs) > 1:
                raise SourceError(f"{path} mixes coordinate reference systems {sorted(crs)}: "
                                  "reproject the files to one CRS first")
            return xr.concat(cubes, dim="t").sortby("t")
        return self._open_file(path)

    @staticmethod
    def _open_file(path: Path) -> xr.DataArray:
        suffix = path.suffix.lower()
        opener = {".tif": open_geotiff, ".tiff": open_geotiff, ".nc": open_netcdf}.get(suffix)
        if opener is None:
            raise SourceError(f"{path}: unsupported file type {suffix!r} (GeoTIFF or NetCDF)")
        try:
            return opener(path)
        except SourceError:
            raise
        except Exception as e:  # rasterio / netCDF errors for damaged or foreign files
            raise SourceError(f"cannot read {path}: {e}") from e

    def load(self, collection_id: str, spatial_extent: dict | None = None, temporal_extent: list | None = None,
             bands: list[str] | None = None, max_cloud_cover: float | None = None) -> xr.DataArray:
        target = self.resolve(collection_id)
        if isinstance(target, StacSource):
            try:
                return target.load(spatial_extent, temporal_extent, bands, max_cloud_cover)
            except StacError as e:
                raise SourceError(str(e)) from e
        cube = self.open(collection_id)
        if bands:
            missing = [b for b in bands if b not in list(cube["bands"].values)]
            if missing:
                raise SourceError(f"collection {collection_id!r} lacks bands {missing}; "
                                  f"it has {list(cube['bands'].values)}")
            cube = cube.sel(bands=list(bands))
        if temporal_extent and any(temporal_extent) and cube["t"].isnull().any():
            raise SourceError(f"collection {collection_id!r} has data without a date (no CORSA_DATE or TIFF "
                              f"DateTime tag): the temporal extent {temporal_extent} cannot select from it")
        if temporal_extent:
            start, end = (pd.Timestamp(v) if v else None for v in temporal_extent)
            keep = np.ones(cube.sizes["t"], bool)
            if start is not None:
                keep &= (cube["t"] >= np.datetime64(start)).values
            if end is not None:
                keep &= (cube["t"] < np.datetime64(end)).values
            if not keep.any():
                raise SourceError(f"no date of {collection_id!r} lies in {temporal_extent}")
            cube = cube.isel(t=np.nonzero(keep)[0])
        if spatial_extent:
            ext = dict(spatial_extent)
            try:
                cube = cube.rio.clip_box(ext["west"], ext["south"], ext["east"], ext["north"],
                                         crs=ext.get("crs") or "EPSG:4326")
            except Exception as e:  # rioxarray raises NoDataInBounds and friends
                raise SourceError(f"spatial extent {ext} selects no pixel of {collection_id!r}: {e}") from e
        return cube
