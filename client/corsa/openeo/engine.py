"""The embedded engine: runs our process-graph JSON on openeo-processes-dask, on this machine.

openeo-processes-dask supplies the standard processes; we register the ones it lacks or gets
wrong for these graphs (shared/TOOLCHAIN.md): load_collection over local files (GeoTIFF, openEO
NetCDF, job results, products) with extents and bands applied, apply_neighborhood, run_udf with
named dims, resample_spatial "near" by whole factors or to smaller pixels on the cube's own grid,
save_result writing the cube it is given as a back end's generic GeoTIFF writer does
(``corsa.formats.results``), and our UDPs by id.
Parameter references nested in arguments (a UDF context naming a process parameter) are resolved
too. A graph may have several leaves (one save_result per stored layer): all of them run.
"""
from __future__ import annotations

import inspect
import json
import logging
from functools import wraps
from pathlib import Path
from typing import Any, Callable, Iterator

import dask
import dask.threaded
import dask.array as darr
import numpy as np
import pandas as pd
import xarray as xr
from affine import Affine
from openeo.udf import UdfData, XarrayDataCube
from openeo.udf.run_code import run_udf_code
from openeo_pg_parser_networkx import OpenEOProcessGraph, ProcessRegistry
from openeo_pg_parser_networkx.pg_schema import ParameterReference
from openeo_pg_parser_networkx.process_registry import Process
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.errors import RasterioError

from corsa.formats import stac_catalog
from corsa.formats import results
from corsa.codec.models import local_model
from corsa.formats.product import date_label as product_date_label
from corsa.openeo.processes import GRAPHS_DIR
from corsa.formats.sources import Catalogue

# It warns at import about optional machine-learning processes that these graphs do not use.
logging.getLogger("openeo_processes_dask.process_implementations").setLevel(logging.ERROR)
import openeo_processes_dask.process_implementations as opd_impl  # noqa: E402
import openeo_processes_dask.specs as opd_specs  # noqa: E402
from openeo_processes_dask.process_implementations.core import process as opd_process  # noqa: E402


class EngineError(RuntimeError):
    """A process graph cannot run on the embedded engine; the message says why."""


def _resolve(value: Any, named: dict) -> Any:
    if isinstance(value, ParameterReference):
        if value.from_parameter not in named:
            raise EngineError(f"process parameter {value.from_parameter!r} has no value")
        return named[value.from_parameter]
    if isinstance(value, dict):
        if "process_graph" in value:  # a callback: its parameters are bound when it runs
            return value
        return {k: _resolve(v, named) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, named) for v in value]
    return value


def _resolving(f: Callable) -> Callable:
    """openeo-processes-dask's wrapper resolves top-level references; this adds nested ones."""
    inner = opd_process(f)
    takes = inspect.signature(f).parameters

    @wraps(f)
    def wrapper(*args, positional_parameters: dict | None = None, named_parameters: dict | None = None, **kwargs):
        named = dict(named_parameters or {})
        for name, i in (positional_parameters or {}).items():
            named[name] = args[i]
        kwargs = {k: _resolve(v, named) if isinstance(v, (dict, list)) else v for k, v in kwargs.items()}
        if "parent_parameters" in takes:
            # A callback may name the enclosing graph's parameters (openEO API); pass them down.
            kwargs["parent_parameters"] = named
        return inner(*args, positional_parameters=positional_parameters, named_parameters=named_parameters, **kwargs)

    return wrapper


NEIGHBORHOOD = "corsa_apply_neighborhood"
LEAVES = "corsa_all_leaves"


def _referenced(nodes: dict) -> set[str]:
    """Ids of the nodes of one graph level that another node of that level takes as input."""
    found: set[str] = set()

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            if "from_node" in value:
                found.add(value["from_node"])
            elif "process_graph" not in value:  # a callback's references are its own nodes
                for v in value.values():
                    visit(v)
        elif isinstance(value, list):
            for v in value:
                visit(v)

    for node in nodes.values():
        visit(node.get("arguments", {}))
    return found


def detach_callbacks(graph: dict) -> dict:
    """A copy of a process graph whose apply_neighborhood callbacks travel as JSON text.

    The parser caches a callback node's result across calls, so a callback run once per chunk
    would return the first chunk's result every time; our apply_neighborhood parses the callback
    itself, afresh for each chunk."""
    out = {}
    for node_id, node in graph.items():
        node = json.loads(json.dumps(node))
        if node["process_id"] == "apply_neighborhood":
            node["process_id"] = NEIGHBORHOOD
            node["arguments"]["process"] = json.dumps(node["arguments"]["process"])
        out[node_id] = node
    return out


def cloud_cover_limit(properties: dict | None, named: dict) -> float | None:
    """The bound of an ``eo:cloud_cover`` filter of the form lte/lt(value, limit), else None."""
    graph = ((properties or {}).get("eo:cloud_cover") or {}).get("process_graph") or {}
    for node in graph.values():
        if node.get("process_id") in ("lte", "lt"):
            limit = node["arguments"].get("y")
            if isinstance(limit, dict) and "from_parameter" in limit:
                limit = named.get(limit["from_parameter"])
            elif isinstance(limit, ParameterReference):
                limit = named.get(limit.from_parameter)
            return float(limit) if limit is not None else None
    return None


def _sizes(data: xr.DataArray, resolution) -> tuple[Affine, tuple[float, float]] | None:
    """(the cube's transform, the (x, y) pixel sizes asked for), or None."""
    if "x" not in data.dims or "y" not in data.dims:
        return None
    try:
        tr = data.rio.transform()  # the written transform: a side of 1 px has no spacing to recalc from
    except Exception:
        return None
    res = tuple(resolution) if isinstance(resolution, (list, tuple)) else (resolution, resolution)
    if len(res) != 2 or not all(isinstance(r, (int, float)) and r > 0 for r in res) or not (tr.a and tr.e):
        return None
    return tr, (float(res[0]), float(res[1]))


def _whole_factor(data: xr.DataArray, resolution) -> int | None:
    """resolution / the cube's pixel size, when that is the same whole number on both axes."""
    sizes = _sizes(data, resolution)
    if sizes is None:
        return None
    tr, res = sizes
    factors = [r / abs(s) for r, s in zip(res, (tr.a, tr.e))]
    k = round(factors[0])
    return k if k >= 1 and all(abs(f - k) < 1e-6 * k for f in factors) else None


def _near_finer(data: xr.DataArray, resolution) -> tuple | None:
    """(values, transform) of ``data`` "near" on pixels of ``resolution``, at most its own on both
    axes, from the upper-left corner over the same bounds (as many whole new pixels as are nearest
    them): each new pixel takes the one whose cell holds its centre. None for coarser ones."""
    sizes = _sizes(data, resolution)
    if sizes is None:
        return None
    tr, (rx, ry) = sizes
    if rx > abs(tr.a) * (1 + 1e-9) or ry > abs(tr.e) * (1 + 1e-9):
        return None

    def picks(n: int, step: float, r: float) -> np.ndarray:
        m = max(1, round(n * step / r))
        return np.minimum(((np.arange(m) + 0.5) * r / step).astype(int), n - 1)

    values = darr.asarray(data.data)
    values = values[..., picks(values.shape[-2], abs(tr.e), ry), :][..., picks(values.shape[-1], abs(tr.a), rx)]
    return values, Affine(np.sign(tr.a) * rx, 0, tr.c, 0, np.sign(tr.e) * ry, tr.f)


def _decimate(arr, factor: int):
    """Every ``factor``-th pixel over the last two axes, from index factor // 2 of each cell (the
    last pixel of a partial cell at the edge), chunk by chunk: an output block comes from one input
    block, so layers taken from one cube keep its block layout (``corsa.formats.results`` writes them together)."""
    side = {ax: max(factor, round(max(arr.chunks[ax]) / factor) * factor) for ax in (-2, -1)}
    if any(c % factor for ax in (-2, -1) for c in arr.chunks[ax][:-1]):
        arr = arr.rechunk({arr.ndim - 2: side[-2], arr.ndim - 1: side[-1]})

    def pick(block: np.ndarray) -> np.ndarray:
        ys, xs = (np.minimum(np.arange(-(-n // factor)) * factor + factor // 2, n - 1) for n in block.shape[-2:])
        return block[..., ys[:, None], xs[None, :]]

    chunks = arr.chunks[:-2] + tuple(tuple(-(-c // factor) for c in arr.chunks[ax]) for ax in (-2, -1))
    return arr.map_blocks(pick, chunks=chunks, dtype=arr.dtype)


def _spec(pid: str, params: list[str]) -> dict:
    return {"id": pid, "parameters": [{"name": p, "schema": {}} for p in params], "returns": {"schema": {}}}


class Engine:
    """One engine: a catalogue of local data, an output folder, and optionally a dask cluster."""

    def __init__(self, catalogue: Catalogue, output: Path | None = None, scheduler: str | None = None):
        self.catalogue = catalogue
        self.output = Path(output) if output else None
        self.scheduler = scheduler
        self.written: list[Path] = []
        self._pending: list[results.PendingFile] = []
        self.registry = self._registry()

    # -- the processes we supply ------------------------------------------------------------
    def _registry(self) -> ProcessRegistry:
        reg = ProcessRegistry(wrap_funcs=[_resolving])
        for name, func in vars(opd_impl).items():
            spec = getattr(opd_specs, name, None)
            if callable(func) and isinstance(spec, dict):
                reg[name] = Process(spec=spec, implementation=func)
        reg["load_collection"] = Process(opd_specs.load_collection, self.load_collection)
        reg["load_stac"] = Process(opd_specs.load_stac, self.load_stac)
        reg["run_udf"] = Process(opd_specs.run_udf, self.run_udf)
        reg["save_result"] = Process(opd_specs.save_result, self.save_result)
        reg["resample_spatial"] = Process(opd_specs.resample_spatial, self.resample_spatial)
        reg[LEAVES] = Process(_spec(LEAVES, ["values"]), lambda values, **_: list(values))
        reg[NEIGHBORHOOD] = Process(
            _spec(NEIGHBORHOOD, ["data", "process", "size", "overlap", "context"]), self.apply_neighborhood)
        for path in sorted(GRAPHS_DIR.glob("*.json")):
            udp = json.loads(path.read_text())
            reg[udp["id"]] = Process(spec=udp, implementation=self._udp(udp))
        return reg

    def _udp(self, udp: dict) -> Callable:
        defaults = {p["name"]: p["default"] for p in udp["parameters"] if "default" in p}

        graph = {**udp, "process_graph": detach_callbacks(udp["process_graph"])}

        def run(**kwargs):
            args = {**defaults, **{k: v for k, v in kwargs.items() if k not in ("named_parameters",)}}
            return self._run_leaves(graph, args)

        return run

    def load_collection(self, id: str, spatial_extent=None, temporal_extent=None, bands=None,
                        properties=None, parent_parameters: dict | None = None) -> xr.DataArray:
        limit = cloud_cover_limit(properties, parent_parameters or {})
        if hasattr(temporal_extent, "root"):  # a literal interval in the graph, parsed into pg_schema dates
            temporal_extent = [None if v is None else pd.Timestamp(v.root).tz_convert(None).isoformat()
                               for v in temporal_extent.root]
        return self.catalogue.load(id, spatial_extent, temporal_extent, bands, limit)

    def load_stac(self, url: str, spatial_extent=None, temporal_extent=None, bands=None, properties=None,
                  parent_parameters: dict | None = None) -> xr.DataArray:
        """A product's STAC Collection or Item (``corsa.formats.stac_catalog``): the product's cube (its dates, or
        the Item's); any other STAC source as load_collection loads it."""
        if not stac_catalog.is_ours(url):
            return self.load_collection(url, spatial_extent, temporal_extent, bands, properties, parent_parameters)
        folder, dates = stac_catalog.product_of(url)
        cube = self.load_collection(str(folder), spatial_extent, temporal_extent, bands, properties, parent_parameters)
        if "t" in cube.dims and len(dates) < cube.sizes["t"]:
            cube = cube.isel(t=[i for i, t in enumerate(cube["t"].values) if product_date_label(t) in dates])
        return cube

    def run_udf(self, data: xr.DataArray, udf: str, runtime: str, context: dict | None = None, **_) -> xr.DataArray:
        """The UDF run as openeo-geopyspark-driver runs it: its code text through the openeo client's
        ``run_udf_code`` (which finds ``apply_datacube`` by its signature), one cube in a UdfData."""
        if not isinstance(data, xr.DataArray):
            raise EngineError("run_udf needs a data cube with named dimensions")
        # Model files a back end's UDF would fetch from this repository (or find unpacked from a
        # model archive) are read from the same folders here: this machine reaches no network.
        context = {k: local_model(v) if isinstance(v, str) else v for k, v in (context or {}).items()}
        result = run_udf_code(udf, UdfData(datacube_list=[XarrayDataCube(data)], user_context=context))
        (cube,) = result.get_datacube_list()
        return cube.get_array()

    def apply_neighborhood(self, data: xr.DataArray, process: str, size: list, overlap: list | None = None,
                           context: dict | None = None, parent_parameters: dict | None = None) -> xr.DataArray:
        """Run ``process`` on chunks of ``size`` px with ``overlap`` px of context, lazily on dask,
        the way openeo-geopyspark-driver does (``GeopysparkDataCube.apply_neighborhood`` ->
        ``apply_tiles_spatiotemporal``; chunks cut by ``OpenEOProcesses.retile``): the cube as
        float32 (its nodata NaN); chunks of size + 2 x overlap on a grid from its upper-left corner,
        padded with NaN beyond the cube; dims (t, bands, y, x) with cell-centre coordinates over the
        whole chunk and t as a DatetimeIndex; the callback's result cropped of its overlap and
        stored as float32, whatever dtype the UDF returned.

        ``process`` is the callback as JSON text (see detach_callbacks). The first chunk is
        computed up front to learn the output bands and dates; what it computed upstream
        stays in the graph for the rest (``results.block_keeping``)."""
        callback = json.loads(process)
        sizes = {s["dimension"]: s["value"] for s in size}
        depth = {d["dimension"]: int(d["value"] or 0) for d in (overlap or [])}
        if set(sizes) - {"x", "y", "t"} or any(s.get("unit", "px") != "px" for s in size) or \
                any(not isinstance(sizes.get(d), (int, float)) for d in ("x", "y")) or set(depth) - {"x", "y"}:
            raise EngineError(f"apply_neighborhood supports pixel sizes and overlaps over x and y (t: all dates or "
                              f"a number of them), got size {size}, overlap {overlap}")
        cube = data.transpose(*[d for d in ("t", "bands", "y", "x") if d in data.dims])
        if "bands" not in cube.dims or set(cube.dims) - {"t", "bands", "y", "x"}:
            raise EngineError(f"apply_neighborhood needs a cube with dims (t,) bands, y, x; got {data.dims}")
        axes = {d: i for i, d in enumerate(cube.dims)}
        step = {d: int(sizes[d]) for d in ("y", "x")}
        dep = {d: depth.get(d, 0) for d in ("y", "x")}
        if any(dep[d] > step[d] for d in dep):
            raise EngineError(f"apply_neighborhood's overlap {overlap} exceeds its size {size}")
        shape = {d: cube.sizes[d] for d in ("y", "x")}
        transform = results.transform_of(cube)
        if transform is None:
            raise EngineError("apply_neighborhood needs a cube on a regular x / y grid")
        nodata = cube.rio.nodata if cube.rio.nodata is not None else cube.attrs.get("_FillValue")
        arr = darr.asarray(cube.data)
        arr = (darr.where(arr == nodata, np.nan, arr) if nodata is not None else arr).astype(np.float32)
        for d in ("y", "x"):   # NaN to whole chunks (not darr.pad: it cuts the padding into chunks of the last one's size)
            if shape[d] % step[d]:
                fill = list(arr.shape)
                fill[axes[d]] = -shape[d] % step[d]
                arr = darr.concatenate([arr, darr.full(fill, np.nan, dtype=np.float32)], axis=axes[d])
        chunks = {axes[d]: step[d] for d in ("y", "x")}
        chunks[axes["bands"]] = -1
        if "t" in axes:
            # openEO: a dimension not in size comes whole (the fill reads a date's neighbours).
            chunks[axes["t"]] = -1 if sizes.get("t") is None else int(sizes["t"])
        arr = arr.rechunk(chunks)
        margins = {axes[d]: dep[d] for d in ("y", "x")}
        padded = darr.overlap.overlap(arr, depth=margins, boundary=np.nan) if any(dep.values()) else arr
        band_labels = list(cube["bands"].values)
        times = pd.DatetimeIndex(cube["t"].values) if "t" in axes else None
        t_starts = np.cumsum((0,) + arr.chunks[axes["t"]]) if "t" in axes else None

        def centres(d: str, start: int, n: int) -> np.ndarray:
            a, off = (transform.e, transform.f) if d == "y" else (transform.a, transform.c)
            return (off + (np.arange(start, start + n) + 0.5) * a).astype(np.float32)

        def call(block: np.ndarray, location: tuple) -> xr.DataArray:
            coords = {d: centres(d, location[axes[d]] * step[d] - dep[d], block.shape[axes[d]]) for d in ("y", "x")}
            if times is not None:
                t0 = t_starts[location[axes["t"]]]
                coords["t"] = times[t0:t0 + block.shape[axes["t"]]]
            blk = xr.DataArray(block, dims=cube.dims, coords={**coords, "bands": band_labels})
            named = {**(parent_parameters or {}), "data": blk, "context": context or {}}
            out = OpenEOProcessGraph(callback).to_callable(self.registry)(named_parameters=named)
            if not isinstance(out, xr.DataArray) or set(out.dims) != set(cube.dims):
                raise EngineError(f"apply_neighborhood's callback returned {type(out).__name__} "
                                  f"{getattr(out, 'dims', '')}, not a cube with dims {cube.dims}")
            out = out.transpose(*cube.dims)
            if any(out.sizes[d] != blk.sizes[d] for d in ("y", "x")):
                raise EngineError(f"apply_neighborhood's callback returned {out.sizes['y']} x {out.sizes['x']} px "
                                  f"for a chunk of {blk.sizes['y']} x {blk.sizes['x']}: it must keep the chunk's grid")
            return out

        first_block, padded = results.block_keeping(padded, (0,) * padded.ndim)
        first = call(first_block, (0,) * padded.ndim)
        out_bands = list(first["bands"].values)

        def cropped(out: np.ndarray) -> np.ndarray:
            index = [slice(None)] * out.ndim
            for d in ("y", "x"):
                index[axes[d]] = slice(dep[d], dep[d] + step[d])
            return out[tuple(index)].astype(np.float32)

        first_values = cropped(first.values)

        def func(block, block_info=None):
            location = tuple(block_info[0]["chunk-location"])
            if not any(location):       # the first chunk ran above already
                return first_values
            return cropped(call(block, location).values)

        out_chunks = list(arr.chunks)
        out_chunks[axes["bands"]] = (len(out_bands),)
        out_coords = {d: cube[d] for d in cube.dims if d != "bands" and d in cube.coords}
        if "t" in axes and first.sizes["t"] != cube.sizes["t"]:
            # The callback returned other dates (openEO lets it change labels): only with t whole.
            if len(arr.chunks[axes["t"]]) != 1:
                raise EngineError("a callback that changes the dates needs the dimension t whole (not in size)")
            out_chunks[axes["t"]] = (first.sizes["t"],)
            out_coords["t"] = first["t"].values
        result = padded.map_blocks(func, dtype=np.float32, chunks=tuple(out_chunks))
        crop = [slice(None)] * result.ndim
        for d in ("y", "x"):
            crop[axes[d]] = slice(0, shape[d])
        out = xr.DataArray(result[tuple(crop)], dims=cube.dims, coords={**out_coords, "bands": out_bands},
                           attrs={**cube.attrs, **first.attrs})
        out = out.rio.write_crs(cube.rio.crs) if cube.rio.crs else out
        # A side of 1 px has no coordinate spacing to compute the grid from: carry the transform.
        return out.rio.write_transform(transform)

    def resample_spatial(self, data: xr.DataArray, resolution=0, projection=None, method: str = "near",
                         align: str = "upper-left", **_) -> xr.DataArray:
        """On the cube's own CRS, "near" to a whole multiple of its pixel size from the upper-left
        corner: every factor-th pixel (the one GDAL's nearest picks, inside each new cell), with the
        new grid's coordinates; to smaller pixels: each new one takes the pixel that holds its
        centre, over the same bounds. Anything else goes to openeo-processes-dask (odc-geo)."""
        dims = [d for d in data.dims if d not in ("y", "x")] + ["y", "x"]
        cube = data.transpose(*dims)
        factor = _whole_factor(cube, resolution)
        finer = None if factor is not None else _near_finer(cube, resolution)
        same_crs = projection is None or (data.rio.crs is not None and data.rio.crs == CRS.from_user_input(projection))
        if (factor is None and finer is None) or not same_crs or method != "near" or align != "upper-left":
            return opd_impl.resample_spatial(data, projection=projection, resolution=resolution, method=method,
                                             align=align)
        if factor is not None:
            values, new = _decimate(darr.asarray(cube.data), factor), cube.rio.transform() * Affine.scale(factor)
        else:
            values, new = finer
        out = xr.DataArray(values, dims=dims, coords={
            **{d: cube[d] for d in dims[:-2] if d in cube.coords},
            "y": new.f + (np.arange(values.shape[-2]) + 0.5) * new.e,
            "x": new.c + (np.arange(values.shape[-1]) + 0.5) * new.a}, attrs=data.attrs).transpose(*data.dims)
        out = out.rio.write_crs(data.rio.crs) if data.rio.crs else out
        return out.rio.write_transform(new)

    def save_result(self, data: xr.DataArray, format: str = "GTiff", options: dict | None = None, **_) -> bool:
        if self.output is None:
            raise EngineError("save_result needs an output folder (Engine(output=...))")
        if str(format).lower() not in ("gtiff", "geotiff"):
            raise EngineError(f"save_result format {format!r} is not supported here: use GTiff")
        self._pending += results.pending_files(data, self.output, options)
        return True

    # -- running ------------------------------------------------------------------------------
    def _compute(self, *arrays):
        if self.scheduler:
            from dask.distributed import Client
            with Client(self.scheduler) as client:
                return dask.compute(*arrays, scheduler=client)
        return dask.compute(*arrays, scheduler="threads")

    def _stream(self, graph: dict, keys: list) -> Iterator[tuple]:
        """(key, value) of each of ``keys`` of a dask graph as the engine's dask.distributed scheduler
        computes it, all in one graph on one connection; each value let go on the cluster once handed over."""
        from dask.distributed import Client, as_completed

        with Client(self.scheduler) as client:
            done = as_completed(client.get(graph, keys, sync=False))
            for f in done:
                key, value = f.key, f.result()
                f.release()
                yield key, value

    def _run_leaves(self, graph: dict, named: dict) -> Any:
        """Run every leaf of a graph (several save_result nodes, say) in one parse, so what they
        share upstream is built once; returns the value of the node flagged as result. (The parser
        walks back from the result node only: a synthetic node gathering the leaves is the result.)"""
        nodes = graph["process_graph"]
        leaves = [n for n in nodes if n not in _referenced(nodes)]
        if len(leaves) < 2:
            return OpenEOProcessGraph(graph).to_callable(self.registry)(named_parameters=named)
        result = next(n for n, node in nodes.items() if node.get("result"))
        joined = {n: {**node, "result": False} for n, node in nodes.items()}
        joined[LEAVES] = {"process_id": LEAVES, "arguments": {"values": [{"from_node": n} for n in leaves]},
                          "result": True}
        values = OpenEOProcessGraph({**graph, "process_graph": joined}).to_callable(self.registry)(
            named_parameters=named)
        return values[leaves.index(result)]

    def run(self, graph: dict, **parameters) -> Any:
        """Run a process graph (a UDP JSON or a bare {"process_graph": ...}) with named parameters;
        the files its save_result nodes make are written at the end, all or none."""
        pg = graph if "process_graph" in graph else {"process_graph": graph}
        defaults = {p["name"]: p["default"] for p in pg.get("parameters", []) if "default" in p}
        pg = {**pg, "process_graph": detach_callbacks(pg["process_graph"])}
        self._pending = []
        try:
            value = self._run_leaves(pg, {**defaults, **parameters})
            self.written += (results.write_all(self._pending, stream=self._stream) if self.scheduler else
                             results.write_all(self._pending, dask.threaded.get))
        except (RasterioError, CPLE_BaseError) as e:
            # GDAL opens a truncated or damaged file and fails only on the block it cannot read,
            # wherever the data is computed; its own message (the cause) names the file.
            raise EngineError(f"reading the data failed (truncated or corrupt file?): {e.__cause__ or e}") from e
        finally:
            self._pending = []
        return value
