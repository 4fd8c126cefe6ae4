"""Products opened by xarray: ``xr.open_dataset(product, engine="corsa")``, lazily.

    product (folder, its STAC Collection / Item, or a compress job's download) -> headers only -> a Dataset whose arrays decode,
    when indexed, only the 512 px blocks under the window asked for (``blockwise.DateDecoder``: each
    block exactly as ``corsa decompress`` writes it), date by date.

Variables (rioxarray's conventions: the CRS and transform in ``spatial_ref``, nodata 0 and the
reflectance scale as ``_FillValue`` / ``scale_factor``, decoded unless ``mask_and_scale=False``):
  reflectance (time, band, y, x): the decoded bands, uint16 DN on the stored 10 m grid;
  features (time, channel, y_latent, x_latent), with ``features=True``: the stored latents,
    dequantised (ints x inv_gain of each date's level), on the 40 m latent grid, entropy-decoded
    only, without running the decoder;
  scl, landcover (time, y, x), with ``classes="scl"`` / ``"landcover"`` / both in a list: the model's class heads
    on the latents (no decoding), uint8 (0 = nodata, CF's flag_values / flag_meanings), each 20 m cell over its
    10 m pixels: what ``corsa classify`` gives, on the reflectance's grid.
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
from corsa.codec.models import VariableRateCodec
from corsa.formats import codebook_product, job_files, product, stac_catalog, stream_format
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


class Source:
    """Where a Dataset's dates come from: a product folder (formats 3-13), or a compress job's
    download (its latent GeoTIFFs, ``job_files.DateIntegers``, decoded as the packed product would
    be). Each date's decoder is opened on first use; pickles as its names (dask workers reopen)."""

    def __init__(self, folder: Path, dates: list[str], job: tuple | None = None):
        self.folder, self.dates, self.job = folder, dates, job
        self._decoders: dict[str, DateDecoder] = {}

    def __reduce__(self):
        return type(self), (self.folder, self.dates, self.job)

    def head(self, date: str) -> dict:
        """The date's header (its decoder's: read, and its model checked, once)."""
        return self.decoder(date).head

    def codec(self, date: str):
        return self.job[0] if self.job else product.stream_codec(self.folder, date)

    def decoder(self, date: str) -> DateDecoder:
        if date not in self._decoders:
            ints = job_files.DateIntegers(self.folder, date, *self.job) if self.job else None
            self._decoders[date] = DateDecoder(self.folder, date, self.codec(date), ints=ints)
        return self._decoders[date]


class _DateArray(BackendArray):
    """A (time, c, y, x) array of a source's dates, read date by date through ``part(date, c, y, x)``."""

    def __init__(self, source: Source, shape: tuple[int, ...], dtype):
        self.source, self.shape, self.dtype = source, (len(source.dates), *shape), np.dtype(dtype)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._read)

    def _read(self, key: tuple) -> np.ndarray:
        (t, *rest), after = _ranges(key, self.shape)
        shape = (t.stop - t.start, *(r.stop - r.start for r in rest))
        if not np.prod(shape):
            return np.zeros(shape, self.dtype)[after]
        # one date (the usual read) handed over as decoded, not copied into a new array
        parts = [self.part(self.source.decoder(date), *rest).astype(self.dtype, copy=False) for date in self.source.dates[t]]
        return (parts[0][None] if len(parts) == 1 else np.stack(parts))[after]

    def part(self, decoder: DateDecoder, *window: slice) -> np.ndarray:
        raise NotImplementedError


class Reflectance(_DateArray):
    """The decoded bands: the blocks under the window, decoded as ``corsa decompress`` does."""

    def part(self, decoder: DateDecoder, c: slice, y: slice, x: slice) -> np.ndarray:
        return decoder.window(y, x)[c]


class Features(_DateArray):
    """The dequantised latents: entropy decoding of the blocks under the window, no decoder."""

    def part(self, decoder: DateDecoder, c: slice, y: slice, x: slice) -> np.ndarray:
        return decoder.codec.dequantise(decoder.ints.window(y, x, None)[c], decoder.head["quality"])


class Classes(_DateArray):
    """A (time, y, x) class map of the model's head for one class set: from the integers of the blocks under the
    window, no decoding (``DateDecoder.classes``)."""

    def __init__(self, source: Source, shape: tuple[int, ...], classes: str):
        super().__init__(source, shape, np.uint8)
        self.classes = classes

    def part(self, decoder: DateDecoder, y: slice, x: slice) -> np.ndarray:
        return decoder.classes(y, x, self.classes)


def _class_variable(source: Source, shape: tuple[int, int], classes: str) -> xr.Variable:
    """The variable of one class set, with CF's flag_values / flag_meanings from the model's head (0: nodata)."""
    codec = source.codec(source.dates[0])
    head = (codec.card.get("heads") or {}).get(classes) if isinstance(codec, VariableRateCodec) else None
    if head is None:
        raise product.ProductError(f"model {codec.model_id} has no {classes} head: classes= takes "
                                   f"{', '.join(sorted((codec.card.get('heads') or {}))) or 'none'} for this product")
    return xr.Variable(("time", "y", "x"), indexing.LazilyIndexedArray(Classes(source, shape, classes)), attrs={
        "long_name": {"scl": "scene classes", "landcover": "land cover"}.get(classes, classes) + " from the codes",
        "flag_values": np.array([0] + [c["value"] for c in head["classes"]], np.uint8),
        "flag_meanings": " ".join(["no_data"] + [c["name"].replace(" ", "_") for c in head["classes"]])},
        encoding={"preferred_chunks": {"time": 1, "y": BLOCK_PX, "x": BLOCK_PX}})


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


def _source(path: str | os.PathLike, model: str | None, quality: int | None) -> Source:
    """The dates to open from a product folder, its STAC Collection or Item, or a compress job's
    download (``model`` / ``quality``: a job's, where its folder does not say them)."""
    path = Path(path)
    if stac_catalog.is_ours(path):
        folder, dates = stac_catalog.product_of(path)
    else:
        folder, dates = path, stream_format.dates_in(path) if path.is_dir() else []
    if stream_format.dates_in(folder):
        stac_catalog.check_complete(folder)
        return Source(folder, dates)
    if path.is_dir() and codebook_product.dates_in(folder):
        raise product.ProductError(f"{folder} is a product of formats 1-2 (corsa512): decode it with corsa "
                                   "decompress; xarray opens products of the variable-rate models (formats 3-13)")
    if path.is_dir() and job_files.job_dates(folder):
        codec, level = job_files.resolve(folder, model, quality)
        if not isinstance(codec, VariableRateCodec):
            raise product.ProductError(f"{folder} holds a codebook model's job files: decode them with corsa decompress")
        return Source(folder, job_files.job_dates(folder), (codec, level))
    raise product.ProductError(f"{path} is neither a CORSA product folder (corsa_<date>{stream_format.SUFFIX} files), "
                               "its STAC Collection or Item, nor a compress job's download")


def open_product(path: str | os.PathLike, features: bool = False, mask_and_scale: bool = True,
                 drop_variables=None, model: str | None = None, quality: int | None = None,
                 classes: str | list[str] | tuple[str, ...] = ()) -> xr.Dataset:
    """The Dataset of a product or a compress job's download (see the module's description);
    reads the dates' headers only. ``classes``: the class sets ("scl", "landcover") to add as variables."""
    source = _source(path, model, quality)
    heads = {d: source.head(d) for d in source.dates}
    grid = _grid(heads, source.folder)
    shape, transform, crs = tuple(grid["shape"]), grid["transform"], grid["crs"]
    dates = source.dates
    coords = {"time": _time(dates), "band": list(BANDS), **product.grid_coords(shape, transform),
              "quality": ("time", [stream_format.level_of(heads[d]) for d in dates])}
    scaled = {"_FillValue": np.uint16(0), "scale_factor": np.float32(REFLECTANCE_SCALE), "add_offset": np.float32(0)}
    variables = {"reflectance": xr.Variable(
        ("time", "band", "y", "x"), indexing.LazilyIndexedArray(Reflectance(source, (len(BANDS), *shape), np.uint16)),
        attrs={**scaled, "long_name": "surface reflectance", "units": "1"},
        encoding={"preferred_chunks": {"time": 1, "band": len(BANDS), "y": BLOCK_PX, "x": BLOCK_PX}})}
    if features:
        channels = source.codec(dates[0]).channels
        cells = stream_format.latent_cells(shape)
        latent_grid = product.grid_coords(cells, (transform or Affine.identity()) * Affine.scale(LATENT_STRIDE))
        coords.update(channel=[f"z{i:02d}" for i in range(channels)], y_latent=latent_grid["y"],
                      x_latent=latent_grid["x"])
        variables["features"] = xr.Variable(
            ("time", "channel", "y_latent", "x_latent"),
            indexing.LazilyIndexedArray(Features(source, (channels, *cells), np.float32)),
            attrs={"long_name": "dequantised latent (the codes the decoder and the classifier heads read)"},
            encoding={"preferred_chunks": {"time": 1, "channel": channels, "y_latent": BLOCK_PX // LATENT_STRIDE,
                                           "x_latent": BLOCK_PX // LATENT_STRIDE}})
    for name in [classes] if isinstance(classes, str) else classes:
        variables[name] = _class_variable(source, shape, name)
    ds = xr.Dataset(variables, coords=coords, attrs={
        "corsa_model_id": grid["model_id"], "corsa_product": str(source.folder),
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
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "mask_and_scale", "features", "model", "quality",
                               "classes")

    def open_dataset(self, filename_or_obj, *, drop_variables=None, mask_and_scale=True, features=False, model=None,
                     quality=None, classes=()) -> xr.Dataset:
        return open_product(filename_or_obj, features=features, mask_and_scale=mask_and_scale,
                            drop_variables=drop_variables, model=model, quality=quality, classes=classes)

    def guess_can_open(self, filename_or_obj) -> bool:
        try:
            path = Path(filename_or_obj)
        except TypeError:
            return False
        return stac_catalog.is_ours(path) or (path.is_dir() and bool(stream_format.dates_in(path)
                                                                     or job_files.job_dates(path)))
