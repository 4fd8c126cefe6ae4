"""save_result of the embedded engine: GeoTIFFs as a back end's generic writer makes them.

It writes the cube it is given, nothing project-specific: one file per date,
``<filename_prefix>_<YYYY-MM-DD>.tif`` (prefix "openEO" by default, as geopyspark back ends name
them), the cube's own data type (bool as uint8), band names as band descriptions, tiled 256 x 256
and DEFLATE-compressed. A graph may hold several save_result nodes: the engine collects them and
``write_all`` computes them together, a few block positions at a time, so what they share
upstream (the UDF's chunks) is computed once; a slow task's result that a later batch needs again
(a chunk read by its neighbours' overlap) is kept until that batch on the local scheduler (memory
bounded by a few rows of chunks); a dask.distributed scheduler gets every block in one graph and
computes what they share once. Blocks are written in this process as they come. Files appear under
their names only when every file of the run is complete.
"""
from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

if TYPE_CHECKING:         # the decompress path runs without xarray (its import: 0.5 s)
    import xarray as xr

from corsa.core.files import writing
from corsa.core.scene import to_uint16
from corsa.formats.product import date_label

PROFILE = {"driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
           "BIGTIFF": "IF_SAFER"}
DEFAULT_PREFIX = "openEO"
# Decoded reflectances as users read them remotely: GDAL's cloud-optimised layout (tiles, overviews
# by averaging, the header first), DN = reflectance x 10000 said by each band's scale and offset.
COG_OPTIONS = {"compress": "deflate", "predictor": 2, "blocksize": 512, "overviews": "auto", "resampling": "average",
               "BIGTIFF": "IF_SAFER", "NUM_THREADS": "ALL_CPUS"}   # tiles compressed side by side: the same bytes
# A file written only to be made a COG at once: compressed fast (ZSTD level 1), the COG compresses for good.
SCRATCH = {**PROFILE, "compress": "zstd", "ZSTD_LEVEL": 1}
REFLECTANCE_SCALE = 1e-4


@dataclass
class PendingFile:
    path: Path
    data: object  # dask array (bands, y, x)
    bands: list[str]
    transform: Affine | None
    crs: str | None


def transform_of(cube: xr.DataArray) -> Affine | None:
    """The cube's written transform when it has one (exact: coordinates recomputed from a
    decimated grid carry float error), else the one its coordinates give."""
    try:
        return cube.rio.transform()
    except Exception:  # coordinates without a regular grid
        return None


def _to_uint16(part: Path) -> None:
    """``part`` rewritten as uint16 DN if it holds floats (the float32 a back end stores a UDF's
    output as): rounded, clipped, NaN 0; block row by block row."""
    with rasterio.open(part) as src:
        if src.dtypes[0] == "uint16":
            return
        staged = part.with_name(part.name + ".u16")
        try:
            with rasterio.open(staged, "w", **{**src.profile, "dtype": "uint16", "nodata": None}) as dst:
                for i in range(1, src.count + 1):
                    dst.set_band_description(i, src.descriptions[i - 1])
                dst.update_tags(**src.tags())
                for _, window in src.block_windows(1):
                    dst.write(to_uint16(src.read(window=window)), window=window)
            staged.replace(part)
        finally:
            staged.unlink(missing_ok=True)


def _copy_cog(src, out: Path, **options) -> None:
    """GDAL's COG driver copies ``src`` (a path, VRT text or an open dataset) to ``out``, under a
    temporary name; ``options`` beside ``COG_OPTIONS``."""
    import rasterio.shutil

    staged = out.with_name(out.name + ".cog.part")
    try:
        with writing(out):
            rasterio.shutil.copy(src, staged, driver="COG", **{**COG_OPTIONS, **options})
            # GDAL can return from the copy of a file it could not finish (a file size limit reached
            # at its last write): the last tile, written last in a COG, is read back before the rename.
            with rasterio.open(staged) as f:
                (y, x) = f.block_shapes[0]
                f.read(window=Window((f.width - 1) // x * x, (f.height - 1) // y * y, 1, 1))
            staged.replace(out)
    finally:
        staged.unlink(missing_ok=True)


def as_cog(part: Path, out: Path, bands: tuple[str, ...] | None = None) -> Path:
    """The GeoTIFF ``part`` (decoded reflectances, DN) rewritten as a cloud-optimised uint16 GeoTIFF
    at ``out``, with nodata 0, band descriptions ``bands`` (default: as they are) and the DN scale,
    its overviews those ``corsa decompress`` makes (``cog_writer``); ``part`` is removed. Under a
    temporary name until complete."""
    try:
        _to_uint16(part)
        with rasterio.open(part) as src:
            profile = {"count": src.count, "dtype": "uint16", "height": src.height, "width": src.width}
            if src.crs is not None or not src.transform.is_identity:
                profile.update(transform=src.transform, crs=src.crs.to_string() if src.crs else None)
            with cog_writer(out, profile, written=part) as dst:
                dst.tags.update(src.tags())
                for i, b in enumerate(bands or src.descriptions, 1):
                    dst.set_band_description(i, b or "")
                step = 2 * COG_OPTIONS["blocksize"]
                for y0 in range(0, src.height, step):
                    for x0 in range(0, src.width, step):
                        window = Window(x0, y0, min(step, src.width - x0), min(step, src.height - y0))
                        dst.write(src.read(window=window), window)
    finally:
        part.unlink(missing_ok=True)
    return out


# GDAL's COG driver only copies a whole dataset: a decoded date up to this size is written block by
# block into memory and copied from there (no scratch file written and read back); a larger one (a
# full tile: 2.4 GB) goes through scratch GeoTIFFs beside the output, within the memory target.
IN_MEMORY_BYTES = 256 << 20
# Uncompressed tiles in GDAL's memory file system: what an in-memory date is written into.
IN_MEMORY = {"driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256}


def overview_factors(height: int, width: int, block: int = COG_OPTIONS["blocksize"]) -> list[int]:
    """The COG driver's own overview levels: halving (rounded down) while a side is above its block size."""
    f, out = 1, []
    while height // f > block or width // f > block:
        f *= 2
        out.append(f)
    return out


def _halved(total: np.ndarray) -> np.ndarray:
    """Sums over 2 x 2 cells of (bands, h, w); an odd side's last cell takes what there is."""
    if total.shape[1] % 2 or total.shape[2] % 2:
        total = np.pad(total, ((0, 0), (0, total.shape[1] % 2), (0, total.shape[2] % 2)))
    return total[:, 0::2, 0::2] + total[:, 1::2, 0::2] + total[:, 0::2, 1::2] + total[:, 1::2, 1::2]


def overview_pieces(block: np.ndarray, factors: list[int]) -> list[np.ndarray]:
    """A block's (bands, h, w, uint16, 0 = nodata) pieces of the overviews ``factors`` (powers of 2):
    each pixel the mean of the valid pixels of its cell, rounded half up (GDAL's "average" with nodata
    0; level by level GDAL averages the level before, rounded: its pixels may be 1 DN off these), 0
    where it has none. A block starting at multiples of the largest factor gives the pieces of the
    whole image's overviews there (sides rounded up)."""
    step = factors[-1] if factors else 1
    # A block without nodata whose sides the largest factor divides: every cell full, means by shifts.
    full = not (block.shape[1] % step or block.shape[2] % step) and bool(block.all())
    total, count, out, f0 = block.astype(np.uint32), None if full else (block != 0).astype(np.uint32), [], 1
    for f in factors:
        while f0 < f:
            total, count, f0 = _halved(total), None if full else _halved(count), 2 * f0
        if full:
            out.append(((total + f * f // 2) >> (2 * f.bit_length() - 2)).astype(np.uint16))
        else:
            out.append(np.where(count > 0, np.floor(total / np.maximum(count, 1) + 0.5), 0).astype(np.uint16))
    return out


class _Pyramid:
    """A decoded date written block by block (``write``, as a rasterio dataset takes it) with its
    overviews computed from each block as it comes (``overview_pieces``), so that GDAL's COG driver
    copies them (``OVERVIEWS=FORCE_USE_EXISTING``) instead of reading the whole date back to make them:
    a quarter of the copy's time (BENCHMARKS.md, issue 28, ninth part). The full-resolution data and
    each overview are GeoTIFFs at ``base`` (+ ".ovr<factor>"), joined by a VRT for the copy."""

    def __init__(self, base: str, profile: dict, options: dict, written: bool = False):
        """``written``: the full-resolution data is already at ``base``; ``write`` adds its overviews."""
        self.profile, self.base = profile, base
        self.factors = overview_factors(profile["height"], profile["width"])
        self.step = self.factors[-1] if self.factors else 1
        self.paths = [base] + [f"{base}.ovr{f}" for f in self.factors]
        self.bands, self.tags = [""] * profile["count"], {"DN": "reflectance x 10000"}
        grid = {k: profile[k] for k in ("count", "dtype", "height", "width")}
        self.files = [None if written else rasterio.open(base, "w", **{**options, **grid, **{
            k: profile[k] for k in ("transform", "crs") if k in profile}})]
        for f, path in zip(self.factors, self.paths[1:]):
            self.files.append(rasterio.open(path, "w", **{**options, **grid, "height": -(-grid["height"] // f),
                                                         "width": -(-grid["width"] // f)}))

    def set_band_description(self, band: int, text: str) -> None:
        self.bands[band - 1] = text

    def write(self, data: np.ndarray, window: Window) -> None:
        y0, x0 = int(window.row_off), int(window.col_off)
        if y0 % self.step or x0 % self.step:
            raise ValueError(f"a block at ({y0}, {x0}) is not aligned to the overviews' largest factor {self.step}")
        if self.files[0] is not None:
            self.files[0].write(data, window=window)
        for f, piece, dst in zip(self.factors, overview_pieces(data, self.factors), self.files[1:]):
            dst.write(piece, window=Window(x0 // f, y0 // f, piece.shape[2], piece.shape[1]))

    def close(self) -> None:
        for f in self.files:
            if f is not None:
                f.close()

    def remove(self) -> None:
        """Closes and deletes the files this pyramid wrote (not a ``written`` date)."""
        import rasterio.shutil

        self.close()
        for f in self.files:
            if f is None:
                continue
            if f.name.startswith("/vsimem/"):
                rasterio.shutil.delete(f.name)
            else:
                Path(f.name).unlink(missing_ok=True)

    def vrt(self) -> str:
        """The VRT of the date and its overviews, with what a decoded file says of itself: nodata 0, the
        DN scale, band descriptions, its tags."""
        from rasterio.crs import CRS

        p, head = self.profile, []
        if p.get("crs"):
            head.append(f"<SRS>{escape(CRS.from_user_input(p['crs']).to_wkt())}</SRS>")
        if p.get("transform") is not None:
            head.append(f"<GeoTransform>{', '.join(repr(float(v)) for v in Affine(*p['transform'][:6]).to_gdal())}</GeoTransform>")
        bands = []
        for i, name in enumerate(self.bands, 1):
            overviews = "".join(f'<Overview><SourceFilename relativeToVRT="0">{escape(path)}</SourceFilename>'
                                f"<SourceBand>{i}</SourceBand></Overview>" for path in self.paths[1:])
            bands.append(f'<VRTRasterBand dataType="UInt16" band="{i}"><Description>{escape(name)}</Description>'
                         f"<NoDataValue>0</NoDataValue><Offset>0</Offset><Scale>{REFLECTANCE_SCALE!r}</Scale>"
                         f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(self.base)}</SourceFilename>'
                         f"<SourceBand>{i}</SourceBand></SimpleSource>{overviews}</VRTRasterBand>")
        metadata = "".join(f'<MDI key="{escape(k)}">{escape(v)}</MDI>' for k, v in self.tags.items())
        return (f'<VRTDataset rasterXSize="{p["width"]}" rasterYSize="{p["height"]}">{"".join(head)}'
                f'<Metadata>{metadata}</Metadata>{"".join(bands)}</VRTDataset>')


@contextmanager
def cog_writer(out: Path, profile: dict, written: Path | None = None) -> Iterator:
    """A dataset to write a decoded date (uint16 DN) into, block by block (blocks aligned to 512 px),
    made the cloud-optimised GeoTIFF ``out`` with its overviews (``_Pyramid``) when the block exits
    without error; nothing at ``out`` otherwise. ``written``: a GeoTIFF that already holds the date;
    the blocks written then only make its overviews."""
    size = profile["count"] * profile["height"] * profile["width"] * np.dtype(profile["dtype"]).itemsize
    out.parent.mkdir(parents=True, exist_ok=True)
    if written is not None:
        base, options = str(written), SCRATCH
    elif size > IN_MEMORY_BYTES:
        base, options = str(out.with_name(out.name + ".part")), SCRATCH
    else:
        base, options = f"/vsimem/corsa-{uuid.uuid4().hex}/{out.name}", IN_MEMORY
    pyramid = None
    try:
        with writing(out):
            pyramid = _Pyramid(base, profile, options, written is not None)
        yield pyramid
        with writing(out):
            pyramid.close()
        _copy_cog(pyramid.vrt(), out, overviews="FORCE_USE_EXISTING")
    finally:
        if pyramid is not None:
            pyramid.remove()


def file_name(prefix: str | None, date: str) -> str:
    return f"{prefix or DEFAULT_PREFIX}_{date}.tif"


def pending_files(cube: xr.DataArray, folder: Path, options: dict | None) -> list[PendingFile]:
    """The files save_result(GTiff) makes of ``cube``: one per date."""
    import dask.array as darr

    prefix = (options or {}).get("filename_prefix")
    bands = [str(b) for b in cube["bands"].values] if "bands" in cube.dims else ["band_1"]
    cube = cube if "bands" in cube.dims else cube.expand_dims(bands=bands)
    cube = cube.transpose("t", "bands", "y", "x") if "t" in cube.dims else cube.expand_dims(t=[None])
    transform, crs = transform_of(cube), (cube.rio.crs.to_string() if cube.rio.crs else None)
    out = []
    for i in range(cube.sizes["t"]):
        date = date_label(cube["t"].values[i] if "t" in cube.coords else None)
        data = darr.asarray(cube.isel(t=i).data)
        out.append(PendingFile(Path(folder) / file_name(prefix, date), data.astype(np.uint8) if data.dtype == bool
                               else data, bands, transform, crs))
    names = [p.path.name for p in out]
    if len(set(names)) < len(names):
        raise ValueError(f"save_result: several dates map to the same file name ({names}): give the cube dates")
    return out


class _Reuse:
    """A dask callback (the local scheduler's) that keeps a task's array for the later batches that need it
    again, when computing it took ``min_s`` or more: blocks are computed a few positions at a time, and a
    chunk with overlap (apply_neighborhood on a decoded cube: corsa_openeo_render) reads its neighbours'
    chunks too, so an upstream UDF chunk would otherwise run once for every batch that reads it. ``last``
    gives each task key the index of the last batch that needs it; its array is dropped after that one."""

    def __init__(self, last: dict, min_s: float = 0.02):
        self.last, self.min_s = last, min_s
        self.kept: dict = {}
        self.started: dict = {}
        self.batch = 0

    def callback(self):
        from dask.callbacks import Callback

        return Callback(pretask=self._pretask, posttask=self._posttask)

    def _pretask(self, key, dsk, state) -> None:
        self.started[key] = time.perf_counter()

    def _posttask(self, key, value, dsk, state, worker) -> None:
        took = time.perf_counter() - self.started.pop(key, time.perf_counter())
        # arrays only: a kept value goes into the next graph as it is, where a tuple would read as a task
        if self.last.get(key, -1) > self.batch and took >= self.min_s and isinstance(value, np.ndarray):
            self.kept[key] = value

    def done(self, batch: int) -> None:
        """Batch ``batch`` is computed: drop what no later one needs."""
        self.batch = batch + 1
        self.kept = {k: v for k, v in self.kept.items() if self.last[k] > batch}
        self.started.clear()


def _blocks(arrays: list, get: Callable | None = None, parallel: int = 2, stream: Callable | None = None):
    """(array index, y, x, values) of every block of ``arrays`` (bands, y, x), all bands at once, as they are
    computed: by ``get(graph, keys)`` (the local scheduler's) a few block positions at a time (``_batched``), or by
    ``stream(graph, keys)`` (a dask.distributed scheduler's, yielding (key, value) as they are done) all in one
    graph: the cluster computes what blocks share once and holds the blocks until they are written, where
    batches ran the shared chunks again in each batch that read them. The graph is optimised once, so that its
    keys are the same in every batch."""
    import dask
    import dask.array as darr

    arrays = list(dask.optimize(*[darr.asarray(a).rechunk({0: -1}) for a in arrays]))
    graph = {}
    for a in arrays:
        graph.update(a.__dask_graph__())
    offsets = [[np.cumsum((0,) + c) for c in a.chunks] for a in arrays]
    # the same cube saved twice is one array after optimising: each of its blocks goes to every file
    which: dict[tuple, list[int]] = {}
    for k, a in enumerate(arrays):
        for iy in range(a.numblocks[1]):
            for ix in range(a.numblocks[2]):
                which.setdefault((a.name, 0, iy, ix), []).append(k)
    done = stream(graph, list(which)) if stream is not None else _batched(arrays, graph, get, parallel)
    for key, v in done:
        (_, _, iy, ix), v = key, np.asarray(v)
        for k in which[key]:
            yield k, int(offsets[k][1][iy]), int(offsets[k][2][ix]), v


def _batched(arrays: list, graph: dict, get: Callable, parallel: int) -> Iterator[tuple]:
    """(key, value) of every block of ``arrays``: arrays with the same block layout computed together,
    ``parallel`` block positions per call of ``get``, with what a later batch needs again kept for it
    (``_Reuse``)."""
    groups: dict[tuple, dict[str, None]] = {}      # names kept once: the same cube saved twice is one array
    for a in arrays:
        groups.setdefault(a.numblocks, {})[a.name] = None
    batches, last = [], {}
    for numblocks, members in groups.items():
        positions = [(iy, ix) for iy in range(numblocks[1]) for ix in range(numblocks[2])]
        batches += [[(name, 0, iy, ix) for iy, ix in positions[p:p + parallel] for name in members]
                    for p in range(0, len(positions), parallel)]
    for b, keys in enumerate(batches):
        last.update(dict.fromkeys(_upstream(graph, keys), b))
    reuse = _Reuse(last)
    for b, keys in enumerate(batches):
        sub = {k: reuse.kept.get(k, graph[k]) for k in _upstream(graph, keys, reuse.kept)}
        with reuse.callback():
            values = get(sub, keys)
        reuse.done(b)
        yield from zip(keys, values)


def block_keeping(array, index: tuple) -> tuple[np.ndarray, object]:
    """Block ``index`` of the dask array ``array`` computed, and ``array`` with the arrays of that
    computation's slow tasks (``_Reuse``'s rule) in its graph as values, so that computing ``array`` later
    does not run them again (the engine computes an apply_neighborhood's first chunk up front to learn its
    bands; its overlap reads the upstream chunks around it). With a distributed scheduler (no callbacks)
    ``array`` comes back as it was."""
    import dask
    import dask.array as darr

    graph = dict(array.__dask_graph__())
    reuse = _Reuse(dict.fromkeys(graph, 1))
    with reuse.callback():
        (value,) = dask.compute(array.blocks[index], optimize_graph=False)
    if not reuse.kept:
        return value, array
    graph.update(reuse.kept)
    return value, darr.Array(graph, array.name, array.chunks, meta=array._meta)


def _upstream(graph: dict, keys: list, known: dict | None = None) -> set:
    """``keys`` and every task of ``graph`` they depend on, short of those ``known`` already."""
    from dask.core import get_dependencies

    stack, seen = list(keys), set()
    while stack:
        key = stack.pop()
        if key not in seen:
            seen.add(key)
            if not known or key not in known:
                stack.extend(get_dependencies(graph, key))
    return seen


def write_all(files: list[PendingFile], get: Callable | None = None, stream: Callable | None = None) -> list[Path]:
    """Compute (``get``: the local dask scheduler's get(graph, keys), or ``stream``: a distributed one's,
    ``_blocks``) and write ``files``; on any failure none of them is left behind."""
    if not files:
        return []
    parts = [f.path.with_name(f.path.name + ".part") for f in files]
    handles = []
    try:
        for f, part in zip(files, parts):
            part.parent.mkdir(parents=True, exist_ok=True)
            kw = {**PROFILE, "count": len(f.bands), "dtype": f.data.dtype.name, "height": f.data.shape[1],
                  "width": f.data.shape[2]}
            if f.transform is not None:
                kw["transform"] = f.transform
            if f.crs:
                kw["crs"] = f.crs
            with writing(f.path):
                dst = rasterio.open(part, "w", **kw)
            handles.append(dst)
            for i, b in enumerate(f.bands, 1):
                dst.set_band_description(i, b)
        for k, y, x, v in _blocks([f.data for f in files], get, stream=stream):
            with writing(files[k].path):
                handles[k].write(v, window=Window(x, y, v.shape[2], v.shape[1]))
        for f, dst in zip(files, handles):
            with writing(f.path):
                dst.close()
    except BaseException:
        for dst in handles:
            dst.close()
        for part in parts:
            part.unlink(missing_ok=True)
        raise
    for f, part in zip(files, parts):
        part.replace(f.path)
    return [f.path for f in files]
