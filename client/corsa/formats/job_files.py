"""A compress job's files <-> the entropy-coded product, losslessly.

A compress service (corsa_openeo_compress_s2, corsa2_openeo_compress_s2) saves each stored layer of
the model card on its own grid with standard processes, so any back end's GeoTIFF writer makes
them: ``corsa_<layer>_<date>.tif`` (L0 / L1 indices or the integer latent, band names as band
descriptions) beside ``corsa_nodata_<date>.tif`` on the 10 m input grid. ``pack`` entropy-codes a
download of them into the product (format 5 for variable-rate models, format 2 for codebook
models), block by block (memory flat in the area); ``job_cube`` reads them as the compressed cube
the decompress UDF takes. The files name neither model nor quality: they come from the job's
description (``job.json``, which ``corsa.openeo.jobs.download`` saves beside them) or from the user.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import rasterio

import corsa_udf
from rasterio.transform import Affine
from rasterio.windows import Window

from corsa.formats import codebook_product, product
from corsa.formats import stream_format
from corsa.formats import series
from corsa.codec.codebook import CodebookCodec, open_codec
from corsa.codec.models import VariableRateCodec, sha256_file
from corsa.codec.refine_coder import BlockRefinement

NODATA = "nodata"
# A refined model's refinement cells: bands cell_B02, ... of its latent layer's file (before nodata),
# read as a layer of their own.
REFINE_LAYER = "refine"
# A loop-filtered model's filters: bands filter_B02, ... after them, read as a layer of their own.
FILTER_LAYER = "filter"
JOB_FILE = "job.json"
# corsa_<layer>_<date>.tif as the embedded engine names them; CDSE and Terrascope add a time or a
# "Z" to the date (corsa_latent_2022-07-06Z.tif, ..._2022-07-06T00:00:00Z.tif).
_NAME = re.compile(r"^corsa_(?P<layer>[A-Za-z0-9]+)_(?P<date>\d{4}-\d{2}-\d{2}|undated)(T\d{2}:?\d{2}:?\d{2}(\.\d+)?)?Z?\.tiff?$")
BLOCK_PX = 4 * stream_format.BLOCK  # 10 m pixels per block side: one stream-format block


class JobFilesError(product.ProductError):
    """A folder of job files is incomplete, or a file does not fit the grid or the model."""


@dataclass
class Layer:
    name: str
    path: Path
    bands: list[str]
    stride: int
    dtype: str
    first: int = 1      # the file's band (1-based) that the layer starts at


def _seal(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_job_file(folder: Path, description: dict, files: list[Path]) -> Path:
    """``folder``/job.json: a job's description and the sha256 of each of its downloaded files."""
    record = json.loads(json.dumps({"job": description, "files": {p.name: sha256_file(p) for p in files}}, default=str))
    path = Path(folder) / JOB_FILE
    path.write_text(json.dumps({**record, "sha256": _seal(record)}, indent=1))
    return path


def _job_record(folder: Path) -> tuple[dict, dict[str, str] | None]:
    """(the job's description, {file name: sha256} or None when the download recorded none) from
    ``folder``'s job.json; ({}, None) without one."""
    path = Path(folder) / JOB_FILE
    if not path.is_file():
        return {}, None
    try:
        doc = json.loads(path.read_bytes())
    except ValueError as e:     # UnicodeDecodeError included
        raise JobFilesError(f"{path} is damaged: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise JobFilesError(f"{path} is damaged: not a job's description")
    if not {"job", "files", "sha256"} & doc.keys():
        return doc, None
    record = {"job": doc.get("job"), "files": doc.get("files")}
    if (doc.get("sha256") != _seal(record) or not isinstance(record["job"], dict)
            or not isinstance(record["files"], dict)):
        raise JobFilesError(f"{path} is damaged: its content does not match the sha256 recorded with it")
    return record["job"], record["files"]


def _check_downloaded(folder: Path, files: dict[str, Path], date: str | None = None) -> None:
    """``files`` (name -> path; those of ``date``, or all) are those the download recorded, unchanged."""
    _, sums = _job_record(folder)
    if sums is None:
        return
    for name in sums:
        m = _NAME.match(name)
        if m and (date is None or m["date"] == date) and name not in files:
            raise JobFilesError(f"{Path(folder) / name}, downloaded with the job (job.json), is missing")
    for name, path in files.items():
        if name not in sums:
            raise JobFilesError(f"{path} is not among the files the job's download recorded (job.json)")
        if date is not None and sha256_file(path) != sums[name]:
            raise JobFilesError(f"{path} has changed since it was downloaded (its sha256 is not the one job.json "
                                "recorded): damaged; download the job's results again")


def _layer_files(folder: Path) -> dict[str, dict[str, Path]]:
    """{date: {layer: path}} of the corsa_<layer>_<date>.tif files in ``folder``."""
    out: dict[str, dict[str, Path]] = {}
    for path in sorted(Path(folder).glob("corsa_*.tif*")):
        m = _NAME.match(path.name)
        if m:
            out.setdefault(m["date"], {})[m["layer"]] = path
    return out


def job_dates(folder: Path) -> list[str]:
    """Dates with a nodata layer and at least one other layer: a compress job's output (every file
    its download recorded present)."""
    dates = _layer_files(folder)
    _check_downloaded(folder, {p.name: p for layers in dates.values() for p in layers.values()})
    return [d for d, layers in dates.items() if NODATA in layers and len(layers) > 1]


def _grid(path: Path) -> tuple[tuple[int, int], Affine, str | None]:
    with rasterio.open(path) as src:
        return (src.height, src.width), src.transform, (src.crs.to_string() if src.crs else None)


def layers_of(folder: Path, date: str) -> tuple[list[Layer], tuple[int, int], Affine, str | None]:
    """The layers of one date (nodata last), checked against the nodata layer's 10 m grid."""
    files = _layer_files(folder).get(date, {})
    if NODATA not in files:
        raise JobFilesError(f"{folder} has no corsa_{NODATA}_{date}.tif (the 10 m grid of the date)")
    _check_downloaded(folder, {p.name: p for p in files.values()}, date)
    shape, transform, crs = _grid(files[NODATA])
    layers = []
    for name in sorted(files, key=lambda n: (n == NODATA, n)):
        path = files[name]
        with rasterio.open(path) as src:
            ratio = src.transform.a / transform.a if transform.a else 1.0
            if not np.isfinite(ratio):      # a damaged header: pixel sizes of no grid
                raise JobFilesError(f"{path.name} has a pixel size of no grid ({src.transform.a} against "
                                    f"{files[NODATA].name}'s {transform.a})")
            stride = round(ratio)
            expected = (-(-shape[0] // stride), -(-shape[1] // stride)) if stride >= 1 else None
            # a thousandth of a pixel: float rounding of the writer, never a shifted grid
            on_grid = np.allclose(tuple(src.transform)[:6], tuple(transform * Affine.scale(stride))[:6], rtol=0,
                                  atol=1e-3 * abs(transform.a))
            if stride < 1 or not on_grid or (src.height, src.width) != expected:
                raise JobFilesError(f"{path.name} is not on the grid of {files[NODATA].name} coarsened by a whole "
                                    f"factor (its transform {tuple(src.transform)[:6]}, size {src.width} x {src.height})")
            if src.crs != (rasterio.crs.CRS.from_user_input(crs) if crs else None):
                raise JobFilesError(f"{path.name} has CRS {src.crs}, {files[NODATA].name} has {crs}")
            bands = [d or "" for d in src.descriptions]
            if name != NODATA and len(bands) > 1 and bands[-1] == NODATA:
                bands = bands[:-1]   # a latent layer saved whole (corsa.openeo.processes.store_layers): nodata at 40 m
            filters = len(corsa_udf.FILTER_BANDS)
            if name != NODATA and len(bands) > filters and tuple(bands[-filters:]) == corsa_udf.FILTER_BANDS:
                bands = bands[:-filters]   # and a loop-filtered model's filters
                layers.append(Layer(FILTER_LAYER, path, list(corsa_udf.FILTER_BANDS), stride, src.dtypes[0], len(bands) + 1))
            cells = len(corsa_udf.CELL_BANDS)
            if name != NODATA and len(bands) > cells and tuple(bands[-cells:]) == corsa_udf.CELL_BANDS:
                bands = bands[:-cells]   # and a refined model's refinement cells
                layers.append(Layer(REFINE_LAYER, path, list(corsa_udf.CELL_BANDS), stride, src.dtypes[0], len(bands) + 1))
            if name != NODATA and not all(bands):
                raise JobFilesError(f"{path.name} does not name its bands (GeoTIFF band descriptions)")
            layers.append(Layer(name, path, bands if name != NODATA else [NODATA], stride, src.dtypes[0]))
    return layers, shape, transform, crs


def _integers(values: np.ndarray, dtype: str, path: Path) -> np.ndarray:
    """Stored values as integers; a back end that wrote floats must have written whole numbers."""
    if values.dtype.kind == "f":
        if not np.array_equal(values, np.rint(values)):
            raise JobFilesError(f"{path.name} holds values that are not whole numbers: not a compress job's output")
    return values.astype(dtype)


def _read_cells(layer: Layer, y: int, x: int, h: int, w: int, pad_to: int = 4) -> np.ndarray:
    """(bands, cells) of ``layer`` under the 10 m window (y, x, h, w), y and x multiples of 4;
    cells past the input's last row/column repeat the last one, as the UDF pads."""
    s = layer.stride
    rows, cols = -(-(y + h) // s) - y // s, -(-(x + w) // s) - x // s
    with rasterio.open(layer.path) as src:
        v = src.read(list(range(layer.first, layer.first + len(layer.bands))), window=Window(x // s, y // s, cols, rows))
    want = (-(-h // pad_to) * pad_to // s, -(-w // pad_to) * pad_to // s)
    return np.pad(v, ((0, 0), (0, want[0] - v.shape[1]), (0, want[1] - v.shape[2])), mode="edge")


def _windows(shape: tuple[int, int], side: int = BLOCK_PX):
    for y in range(0, shape[0], side):
        for x in range(0, shape[1], side):
            yield y, x, min(side, shape[0] - y), min(side, shape[1] - x)


def _checked_layers(folder: Path, date: str, codec: CodebookCodec | VariableRateCodec) -> tuple[dict[str, Layer], tuple[int, int], Affine, str | None]:
    """One date's layers by name, checked against what the model stores."""
    layers, shape, transform, crs = layers_of(folder, date)
    by_name = {layer.name: layer for layer in layers}
    expected = {l["name"] for l in codec.card["layers"]}
    if set(by_name) - {REFINE_LAYER, FILTER_LAYER} != expected:
        raise JobFilesError(f"date {date} of {folder} has layers {sorted(by_name)}; model {codec.model_id} stores "
                            f"{sorted(expected)}")
    for spec in codec.card["layers"]:
        if spec["name"] in by_name and spec["name"] != NODATA and by_name[spec["name"]].bands != spec["bands"]:
            raise JobFilesError(f"{by_name[spec['name']].path.name} has bands {by_name[spec['name']].bands[:3]}..., "
                                f"model {codec.model_id} stores {spec['bands'][:3]}...")
    return by_name, shape, transform, crs


class DateIntegers:
    """One date of a variable-rate model's job files as the integers a product date would hold: a
    window of latent cells read from its latent GeoTIFF, its nodata mask, a header like a product's
    (``corsa.formats.series.header``). What ``corsa.blocks.blockwise.DateDecoder`` decodes a job's
    download from, without packing it. Pickles as its names."""

    def __init__(self, folder: Path, date: str, codec: VariableRateCodec, quality: int):
        self.args = (folder, date, codec, quality)
        by_name, shape, transform, crs = _checked_layers(folder, date, codec)
        self.latent, self.nodata = by_name["latent"], by_name[NODATA]
        self.cells = by_name.get(REFINE_LAYER) if codec.refines(quality) else None
        # a model with a loop filter stores each block's 20 m grid there at every refined level
        self.filters = by_name.get(FILTER_LAYER) if codec.refines(quality) and codec.refiner.filter_shape else None
        self.codec = codec
        self.head = {"shape": shape, "transform": transform, "crs": crs, "quality": quality,
                     "model_id": codec.model_id, "cells": stream_format.latent_cells(shape), "block": stream_format.BLOCK}

    def __reduce__(self):
        return type(self), self.args

    @cached_property
    def mask(self) -> np.ndarray | None:
        """The date's nodata mask on its 10 m grid (None: no nodata)."""
        h, w = self.head["shape"]
        m = _read_cells(self.nodata, 0, 0, h, w, 1)[0, :h, :w] != 0
        return m if m.any() else None

    def refinement(self, rows: tuple[int, int], cols: tuple[int, int]) -> stream_format.WindowRefinement | None:
        """The refinement over a window of the date's pixels from its refinement cells (None: a date
        without)."""
        if self.cells is None:
            return None
        shape = self.head["shape"]
        return stream_format.refinement_window(self.codec.refiner, self.codec.level(self.head["quality"]), shape,
                                               partial(block_cells, self.cells, self.codec.refiner.grid, shape,
                                                       filters=self.filters, shape=self.codec.refiner.filter_shape),
                                               rows, cols)

    def layer(self, k: int) -> None:
        """A compress job's files hold no residual layer (``corsa compress`` codes it)."""
        return None

    def window(self, cells_y: slice, cells_x: slice, pool=None) -> np.ndarray:
        """The integers of a window of latent cells."""
        with rasterio.open(self.latent.path) as src:
            v = src.read(list(range(1, len(self.latent.bands) + 1)),
                         window=Window(cells_x.start, cells_y.start, cells_x.stop - cells_x.start, cells_y.stop - cells_y.start))
        return _integers(v, "int16", self.latent.path)


def block_cells(layer: Layer, grid: int, size: tuple[int, int], k: int, filters: Layer | None = None,
                shape: corsa_udf.FilterShape | None = None) -> BlockRefinement:
    """Block ``k``'s refinement from the refinement layer of a date of ``size`` px: its cells (10, ch,
    cw) of ``grid`` px, and from the filter layer (if any) its loop filter of ``shape`` (``corsa_udf.filter_layout``)."""
    py, px = stream_format.block_pixels(stream_format.block_slices(stream_format.latent_cells(size))[k], size)
    h, w = py.stop - py.start, px.stop - px.start
    cells = _cells(layer, py.start, px.start, h, w, grid)
    if filters is None or shape is None or min(h, w) < corsa_udf.FILTER_MIN_PX:
        return BlockRefinement(cells)
    values = _integers(_read_cells(filters, py.start, px.start, *corsa_udf.filter_corner(shape), 1), "int64", filters.path)
    # on the 10 m grid, as the UDF wrote it (a layer at 40 m holds each 40 m cell once)
    values = np.repeat(np.repeat(values, filters.stride, 1), filters.stride, 2)
    return BlockRefinement(cells, *corsa_udf.filter_weights(values, 0, 0, shape))


def _cells(layer: Layer, y: int, x: int, h: int, w: int, grid: int) -> np.ndarray:
    """The refinement cells (10, ch, cw) of ``grid`` px under the 10 m window (y, x, h, w) of a block:
    one sample of each (every value over its cell)."""
    step = grid // layer.stride
    return _integers(_read_cells(layer, y, x, h, w, grid)[:, ::step, ::step], "int32", layer.path)


def pack_series(folder: Path, dates: list[str], codec: VariableRateCodec, quality: int, out: Path) -> list[Path]:
    """The dates of a variable-rate model's job files -> their product files, block by block; dates
    on one grid are coded as a series (``corsa.formats.series``) where the model has temporal tables."""
    grids = [_checked_layers(folder, d, codec) for d in dates]
    if len({(g[1], tuple(g[2]), g[3]) for g in grids}) > 1:
        return [p for d in dates for p in pack_series(folder, [d], codec, quality, out)]
    _, shape, transform, crs = grids[0]
    planned = series.plan(dates, [quality] * len(dates), [], temporal=codec.temporal)
    positions = list(_windows(shape))
    masks: dict[int, np.ndarray] = {}

    def ints_of(i: int, k: int) -> np.ndarray:
        by_name, (y, x, h, w) = grids[i][0], positions[k]
        nodata = _read_cells(by_name[NODATA], y, x, h, w, 1)[0] != 0
        if nodata.any():
            masks.setdefault(i, np.zeros(shape, bool))[y:y + h, x:x + w] = nodata
        return _integers(_read_cells(by_name["latent"], y, x, h, w), "int16", by_name["latent"].path)

    def refinement_of(i: int, k: int) -> BlockRefinement | None:
        layer = grids[i][0].get(REFINE_LAYER) if codec.refines(quality) else None
        filters = grids[i][0].get(FILTER_LAYER) if layer is not None and codec.refiner.filter_shape else None
        return None if layer is None else block_cells(layer, codec.refiner.grid, shape, k, filters, codec.refiner.filter_shape)

    coded = series.encode_dates(codec, planned, list(range(len(dates))), len(positions), ints_of,
                                refinement_of=refinement_of)
    return series.write_dates(Path(out), codec, planned, list(range(len(dates))), coded, masks, shape, transform, crs)


def pack_date(folder: Path, date: str, codec: CodebookCodec, out: Path) -> list[Path]:
    """One date's job files of a codebook model -> its product files in ``out`` (same indices, entropy-coded)."""
    by_name, shape, transform, crs = _checked_layers(folder, date, codec)
    writer = codebook_product.DateWriter(Path(out), date, shape, transform, crs, codec.model_id,
                                codec.card["files"]["decoder"]["sha256"])
    try:
        for y, x, h, w in _windows(shape):
            idx0 = _integers(_read_cells(by_name["L0"], y, x, h, w)[0], "uint16", by_name["L0"].path)
            idx1 = _integers(_read_cells(by_name["L1"], y, x, h, w)[0], "uint16", by_name["L1"].path)
            try:
                codec.check_indices(idx0, idx1)
            except ValueError as e:
                raise JobFilesError(f"date {date} of {folder}: {e}") from e
            writer.add(y, x, idx0, idx1, _read_cells(by_name[NODATA], y, x, h, w, 1)[0] != 0)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def job_settings(folder: Path) -> dict:
    """{"model": id, "quality": int or None} of the compress job whose files ``folder`` holds, read
    from its description (job.json); {} when there is none."""
    description, _ = _job_record(folder)
    if not description:
        return {}
    process = description.get("process")
    graph = process.get("process_graph") if isinstance(process, dict) else None
    graph = graph if isinstance(graph, dict) else {}
    found: dict = {}

    def visit(nodes: dict) -> None:
        for node in nodes.values():
            node = node if isinstance(node, dict) else {}   # a description of corsa before the checksums may be damaged
            args = node.get("arguments") if isinstance(node.get("arguments"), dict) else {}
            context = args.get("context") if node.get("process_id") == "run_udf" else None
            if isinstance(context, dict) and context.get("mode") == "compress":
                found.setdefault("model", context.get("model"))
                found.setdefault("quality", context.get("quality"))
            elif "compress" in str(node.get("process_id", "")) and "model" in args:
                found.setdefault("model", args.get("model"))
                found.setdefault("quality", args.get("quality"))
            for value in args.values():
                if isinstance(value, dict) and isinstance(value.get("process_graph"), dict):
                    visit(value["process_graph"])

    visit(graph)
    model = found.get("model")
    quality = found.get("quality")
    return {"model": Path(str(model).rstrip("/")).name if isinstance(model, str) else None,
            "quality": quality if isinstance(quality, int) else None}


def resolve(folder: Path, model: str | None, quality: int | None) -> tuple[CodebookCodec | VariableRateCodec, int | None]:
    """The codec and quality level that wrote a folder of job files: as given, else the job's; at a level made of
    a base and a residual layer, the base (the services store its integers only: ``corsa_udf._variable_rate``)."""
    settings = job_settings(folder)
    model = model or settings.get("model")
    if not model:
        raise JobFilesError(f"{folder} holds a compress job's files but no {JOB_FILE} naming its model: give --model "
                            "(and --quality for a variable-rate model)")
    codec = open_codec(model)
    quality = codec.quality_level(quality if quality is not None or isinstance(codec, CodebookCodec)
                                  else settings.get("quality"))
    return codec, codec.base(quality) if isinstance(codec, VariableRateCodec) else quality


def pack(folder: Path, out: Path, model: str | None = None, quality: int | None = None) -> list[Path]:
    """Every date of a folder of job files -> the product in ``out``."""
    dates = job_dates(folder)
    if not dates:
        raise JobFilesError(f"{folder} holds no compress job's files: corsa_<layer>_<date>.tif beside "
                            f"corsa_{NODATA}_<date>.tif, the date as YYYY-MM-DD, optionally with a time and Z "
                            "(as CDSE and Terrascope name them)")
    codec, quality = resolve(folder, model, quality)
    return pack_dates(folder, dates, codec, quality, out)


def pack_dates(folder: Path, dates: list[str], codec: CodebookCodec | VariableRateCodec, quality: int | None,
               out: Path) -> list[Path]:
    """The given dates of a folder of job files -> their product files in ``out``."""
    if isinstance(codec, VariableRateCodec):
        return pack_series(folder, dates, codec, quality, out)
    return [p for d in dates for p in pack_date(folder, d, codec, out)]


def _replicated(layer: Layer, dtype: np.dtype, block_info=None) -> np.ndarray:
    """One 10 m chunk of a layer, its values repeated over their cells."""
    (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
    v = _read_cells(layer, y0, x0, y1 - y0, x1 - x0, layer.stride)
    return np.repeat(np.repeat(v, layer.stride, 1), layer.stride, 2)[:, : y1 - y0, : x1 - x0].astype(dtype)


def job_cube(folder: Path):
    """A folder of job files as the compressed cube the decompress UDF takes: (t, bands, y, x) on
    the 10 m grid, each layer's values replicated over its cells (a refined model's refinement
    cells too), read lazily by 512 px chunks."""
    import dask.array as darr
    import pandas as pd
    import xarray as xr

    dates = job_dates(folder)
    if not dates:
        raise JobFilesError(f"{folder} holds no compress job's files")
    cubes = []
    for date in dates:
        layers, shape, transform, crs = layers_of(folder, date)
        dtype = np.result_type(*[np.dtype(layer.dtype) for layer in layers])
        chunks = tuple(tuple(min(product.REPLICA_CHUNK, n - o) for o in range(0, n, product.REPLICA_CHUNK))
                       for n in shape)

        parts = [darr.map_blocks(_replicated, layer, dtype, chunks=((len(layer.bands),),) + chunks, dtype=dtype,
                                 name=f"corsa-job-{layer.name}-{layer.path}-{layer.path.stat().st_mtime_ns}")
                 for layer in layers]
        t = pd.DatetimeIndex([pd.NaT if date == "undated" else pd.Timestamp(date)])
        cube = xr.DataArray(darr.concatenate(parts)[None], dims=("t", "bands", "y", "x"),
                            coords={"t": t, "bands": [b for layer in layers for b in layer.bands],
                                    **product.grid_coords(shape, transform)})
        cube = cube.rio.write_crs(crs) if crs else cube
        cubes.append(cube.rio.write_transform(transform))
    return xr.concat(cubes, dim="t") if len(cubes) > 1 else cubes[0]
