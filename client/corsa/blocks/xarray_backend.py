"""Products opened by xarray: ``xr.open_dataset(product, engine="corsa")``, lazily.

    product (folder, or its STAC Collection / Item) -> headers only -> a Dataset whose arrays decode,
    when indexed, only the 512 px blocks under the window asked for (``blockwise.DateDecoder``: each
    block exactly as ``corsa decompress`` writes it), date by date.

Variables (rioxarray's conventions: the CRS and transform in ``spatial_ref``, nodata 0 and the
reflectance scale as ``_FillValue`` / ``scale_factor``, decoded unless ``mask_and_scale=False``):
  reflectance (time, band, y, x): the decoded bands, uint16 DN on the stored 10 m grid;
  features (time, channel, y_latent, x_latent), with ``features=True``: the stored latents,
    dequantised (ints x inv_gain of each date's level), on the 40 m latent grid, entropy-decoded
    only, without running the decoder.
``chunks={}`` gives dask chunks of one date and one block (the product's own blocks); the arrays
pickle as their product's names, so dask.distributed workers open the files themselves.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from rasterio.crs import CRS
from rasterio.transform import Affine
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from corsa.blocks.blockwise import BLOCK_PX, DateDecoder
from corsa.core.scene import BANDS
from corsa.formats import codebook_product, product, series, stac_catalog, stream_format
from corsa.formats.results import REFLECTANCE_SCALE

LATENT_STRIDE = 4       # 10 m pixels per latent cell along each side


def _ranges(key: tuple, shape: tuple[int, ...]) -> tuple[list[slice], tuple]:
    """A basic index (ints and slices) as the contiguous ranges to read, and the index that then
    takes the steps and drops the integer axes."""
    spans, after = [], []
    for k, n in zip(key, shape):
        if isinstance(k, (int, np.integer)):
            spans.append(slice(int(k) % n, int(k) % n + 1))
            after.append(0)
            continue
        r = range(*k.indices(n))
        if not r:
            spans.append(slice(0, 0))
            after.append(slice(None))
            continue
        lo = min(r[0], r[-1])
        spans.append(slice(lo, max(r[0], r[-1]) + 1))
        end = r[-1] - lo + (1 if r.step > 0 else -1)
        after.append(slice(r[0] - lo, end if end >= 0 else None, r.step))
    return spans, tuple(after)


class _DateArray(BackendArray):
    """A (time, c, y, x) array of a product's dates, read date by date through ``part(date, c, y, x)``."""

    def __init__(self, folder: Path, dates: list[str], shape: tuple[int, ...], dtype):
        self.folder, self.dates = folder, dates
        self.shape, self.dtype = (len(dates), *shape), np.dtype(dtype)
        self._decoders: dict[str, DateDecoder] = {}

    def __reduce__(self):
        return type(self), (self.folder, self.dates, self.shape[1:], self.dtype)

    def decoder(self, date: str) -> DateDecoder:
        if date not in self._decoders:
            self._decoders[date] = DateDecoder(self.folder, date, product.stream_codec(self.folder, date))
        return self._decoders[date]

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._read)

    def _read(self, key: tuple) -> np.ndarray:
        (t, c, y, x), after = _ranges(key, self.shape)
        out = np.zeros((t.stop - t.start, c.stop - c.start, y.stop - y.start, x.stop - x.start), self.dtype)
        if out.size:
            for i, date in enumerate(self.dates[t]):
                out[i] = self.part(date, c, y, x)
        return out[after]

    def part(self, date: str, c: slice, y: slice, x: slice) -> np.ndarray:
        raise NotImplementedError


class Reflectance(_DateArray):
    """The decoded bands: the blocks under the window, decoded as ``corsa decompress`` does."""

    def part(self, date: str, c: slice, y: slice, x: slice) -> np.ndarray:
        return self.decoder(date).window(y, x)[c]


class Features(_DateArray):
    """The dequantised latents: entropy decoding of the blocks under the window, no decoder."""

    def part(self, date: str, c: slice, y: slice, x: slice) -> np.ndarray:
        d = self.decoder(date)
        return d.codec.dequantise(d.ints.window(y, x, None)[c], d.head["quality"])


def _grid(heads: dict[str, dict], folder: Path) -> dict:
    """The one grid every date of the product is on."""
    grids = {(tuple(h["shape"]), h["transform"], h["crs"]) for h in heads.values()}
    if len(grids) != 1:
        raise product.ProductError(f"{folder} holds dates on {len(grids)} grids: open each grid's dates by their "
                                   "STAC Item")
    return next(iter(heads.values()))


def _grid_mapping(crs: str | None, transform: Affine | None) -> dict:
    """The CF grid mapping as rioxarray writes and reads it (without needing rioxarray here)."""
    attrs = {}
    if crs:
        wkt = CRS.from_user_input(crs).to_wkt()
        attrs.update(crs_wkt=wkt, spatial_ref=wkt)
    if transform is not None:
        attrs["GeoTransform"] = " ".join(str(v) for v in transform.to_gdal())
    return attrs


def _time(dates: list[str]) -> pd.DatetimeIndex:
    return pd.DatetimeIndex([pd.NaT if d == stac_catalog.UNDATED else pd.Timestamp(d) for d in dates])


def _product(source: str | os.PathLike) -> tuple[Path, list[str]]:
    """A product folder and the dates to open from a folder or its STAC Collection or Item."""
    path = Path(source)
    if stac_catalog.is_ours(path):
        folder, dates = stac_catalog.product_of(path)
    else:
        folder, dates = path, stream_format.dates_in(path) if path.is_dir() else []
    if not stream_format.dates_in(folder):
        if path.is_dir() and codebook_product.dates_in(folder):
            raise product.ProductError(f"{folder} is a product of formats 1-2 (corsa512): decode it with corsa "
                                       "decompress; xarray opens products of the variable-rate models (formats 3-4)")
        raise product.ProductError(f"{source} is neither a CORSA product folder (corsa_<date>{stream_format.SUFFIX} "
                                   "files) nor its STAC Collection or Item")
    stac_catalog.check_complete(folder)
    return folder, dates


def open_product(source: str | os.PathLike, features: bool = False, mask_and_scale: bool = True,
                 drop_variables=None) -> xr.Dataset:
    """The Dataset of a product (see the module's description); reads the dates' headers only."""
    folder, dates = _product(source)
    heads = {d: series.header(folder, d)[1] for d in dates}
    for d, h in heads.items():       # every date's model, checked now (its decoder opens on first read)
        series.check_model_prefix(h["model_id"], h["sha_prefix"], product.stream_codec(folder, d))
    grid = _grid(heads, folder)
    shape, transform, crs = tuple(grid["shape"]), grid["transform"], grid["crs"]
    coords = {"time": _time(dates), "band": list(BANDS), **product.grid_coords(shape, transform),
              "quality": ("time", [heads[d]["quality"] for d in dates])}
    scaled = {"_FillValue": np.uint16(0), "scale_factor": np.float32(REFLECTANCE_SCALE), "add_offset": np.float32(0)}
    variables = {"reflectance": xr.Variable(
        ("time", "band", "y", "x"), indexing.LazilyIndexedArray(Reflectance(folder, dates, (len(BANDS), *shape), np.uint16)),
        attrs={**scaled, "long_name": "surface reflectance", "units": "1"},
        encoding={"preferred_chunks": {"time": 1, "band": len(BANDS), "y": BLOCK_PX, "x": BLOCK_PX}})}
    if features:
        channels = product.stream_codec(folder, dates[0]).channels
        cells = stream_format.latent_cells(shape)
        latent_grid = product.grid_coords(cells, (transform or Affine.identity()) * Affine.scale(LATENT_STRIDE))
        coords.update(channel=[f"z{i:02d}" for i in range(channels)], y_latent=latent_grid["y"],
                      x_latent=latent_grid["x"])
        variables["features"] = xr.Variable(
            ("time", "channel", "y_latent", "x_latent"),
            indexing.LazilyIndexedArray(Features(folder, dates, (channels, *cells), np.float32)),
            attrs={"long_name": "dequantised latent (the codes the decoder and the classifier heads read)"},
            encoding={"preferred_chunks": {"time": 1, "channel": channels, "y_latent": BLOCK_PX // LATENT_STRIDE,
                                           "x_latent": BLOCK_PX // LATENT_STRIDE}})
    ds = xr.Dataset(variables, coords=coords, attrs={
        "corsa_model_id": grid["model_id"], "corsa_product": str(folder),
        "source": "CORSA product (https://github.com/corsa-openeo/corsa-openeo)"})
    if crs or transform is not None:
        ds = ds.assign_coords(spatial_ref=xr.Variable((), np.int64(0), _grid_mapping(crs, transform)))
        for v in ds.data_vars.values():
            v.encoding["grid_mapping"] = "spatial_ref"
    if mask_and_scale:
        ds = xr.decode_cf(ds, mask_and_scale=True, decode_times=False, decode_coords=False)
    return ds.drop_vars(drop_variables or [], errors="ignore")


class CorsaBackendEntrypoint(BackendEntrypoint):
    """xarray's entry point ``corsa`` (registered by the package's ``xarray.backends`` entry point)."""

    description = "Open CORSA compressed Sentinel-2 products lazily, block by block"
    url = "https://github.com/corsa-openeo/corsa-openeo/blob/main/docs/xarray.md"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "mask_and_scale", "features")

    def open_dataset(self, filename_or_obj, *, drop_variables=None, mask_and_scale=True, features=False) -> xr.Dataset:
        return open_product(filename_or_obj, features=features, mask_and_scale=mask_and_scale,
                            drop_variables=drop_variables)

    def guess_can_open(self, filename_or_obj) -> bool:
        try:
            path = Path(filename_or_obj)
        except TypeError:
            return False
        return stac_catalog.is_ours(path) or (path.is_dir() and bool(stream_format.dates_in(path)))
