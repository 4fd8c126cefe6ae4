"""save_result of the embedded engine: GeoTIFFs as a back end's generic writer makes them.

It writes the cube it is given, nothing project-specific: one file per date,
``<filename_prefix>_<YYYY-MM-DD>.tif`` (prefix "openEO" by default, as geopyspark back ends name
them), the cube's own data type (bool as uint8), band names as band descriptions, tiled 256 x 256
and DEFLATE-compressed. A graph may hold several save_result nodes: the engine collects them and
``write_all`` computes them together, block position by block position, so what they share
upstream (the UDF's chunks) is computed once; blocks are written in this process as they come
(memory bounded by a few chunks; works with a dask.distributed scheduler too). Files appear under
their names only when every file of the run is complete.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import rasterio
import xarray as xr
from rasterio.transform import Affine
from rasterio.windows import Window

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


def _describe_cog(f, bands: tuple[str, ...] | None) -> None:
    """What a decoded file says of itself: nodata 0, the DN scale, band descriptions (default: as they are)."""
    f.nodata = 0
    f.scales = (REFLECTANCE_SCALE,) * f.count
    f.offsets = (0.0,) * f.count
    for i, b in enumerate(bands or (), 1):
        f.set_band_description(i, b)
    f.update_tags(DN="reflectance x 10000")


def _copy_cog(src, out: Path) -> None:
    """GDAL's COG driver copies ``src`` (a path or an open dataset) to ``out``, under a temporary name."""
    import rasterio.shutil

    staged = out.with_name(out.name + ".cog.part")
    try:
        with writing(out):
            rasterio.shutil.copy(src, staged, driver="COG", **COG_OPTIONS)
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
    at ``out``, with nodata 0, band descriptions ``bands`` (default: as they are) and the DN scale;
    ``part`` is removed. Under a temporary name until complete."""
    try:
        _to_uint16(part)
        with writing(out), rasterio.open(part, "r+") as f:
            _describe_cog(f, bands)
        _copy_cog(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


# GDAL's COG driver only copies a whole dataset: a decoded date up to this size is written block by
# block into memory and copied from there (no scratch file written and read back); a larger one (a
# full tile: 2.4 GB) goes through a scratch GeoTIFF beside the output, within the memory target.
IN_MEMORY_BYTES = 256 << 20


@contextmanager
def cog_writer(out: Path, profile: dict) -> Iterator:
    """A dataset to write a decoded date (uint16 DN) into, block by block, made the cloud-optimised
    GeoTIFF ``out`` (``as_cog``) when the block exits without error; nothing at ``out`` otherwise."""
    size = profile["count"] * profile["height"] * profile["width"] * np.dtype(profile["dtype"]).itemsize
    out.parent.mkdir(parents=True, exist_ok=True)
    if size > IN_MEMORY_BYTES:
        part = out.with_name(out.name + ".part")
        try:
            with writing(out), rasterio.open(part, "w", **{**SCRATCH, **profile}) as dst:
                yield dst
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        as_cog(part, out)
        return
    grid = {k: profile[k] for k in ("count", "dtype", "height", "width", "transform", "crs") if k in profile}
    with rasterio.open(out.name, "w", driver="MEM", **grid) as dst:
        yield dst
        _describe_cog(dst, None)
        _copy_cog(dst, out)


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


def _blocks(arrays: list, compute: Callable, parallel: int = 2):
    """(array index, y, x, values) of every block of ``arrays`` (bands, y, x), all bands at once;
    arrays with the same block layout are computed together, ``parallel`` block positions per compute."""
    import dask
    import dask.array as darr

    arrays = list(dask.optimize(*[darr.asarray(a).rechunk({0: -1}) for a in arrays]))
    groups: dict[tuple, list[int]] = {}
    for k, a in enumerate(arrays):
        groups.setdefault(a.numblocks, []).append(k)
    for numblocks, members in groups.items():
        positions = [(iy, ix) for iy in range(numblocks[1]) for ix in range(numblocks[2])]
        offsets = {k: [np.cumsum((0,) + c) for c in arrays[k].chunks] for k in members}
        for p in range(0, len(positions), parallel):
            batch = [(k, iy, ix) for iy, ix in positions[p:p + parallel] for k in members]
            for (k, iy, ix), v in zip(batch, compute(*[arrays[k].blocks[0, iy, ix] for k, iy, ix in batch])):
                yield k, int(offsets[k][1][iy]), int(offsets[k][2][ix]), np.asarray(v)


def write_all(files: list[PendingFile], compute: Callable) -> list[Path]:
    """Compute and write ``files``; on any failure none of them is left behind."""
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
        for k, y, x, v in _blocks([f.data for f in files], compute):
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
