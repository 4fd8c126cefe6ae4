"""Rendering a compressed series off its stored grid and dates (``corsa decompress --date / --scale /
--like``): a date between stored dates from the decodes around it (the model's time head,
``between.onnx``, ``training.train_between``, or linear interpolation where the stored dates show the
head does worse: ``corsa_udf.between``), and a decoded date at any pixel size or on another
grid (the space head, ``render.onnx``, ``training.train_render``, LIIF-style: queried at each output
pixel's centre, in the decoded grid's pixel units, with the output pixel's size there; bicubic where the
decoded date's own 2 x 2 averages show the head does worse: ``corsa_udf.render_guard``).

    product -> the candidates' latents, block by block -> decode -> time head -> GeoTIFF (stored grid)
    GeoTIFF (stored grid) -> output blocks -> their centres in the stored grid -> space head -> GeoTIFF
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import corsa_udf
import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as warp_points
from rasterio.windows import Window

from corsa.blocks import blockwise
from corsa.core import cluster
from corsa.openeo import windows
from corsa.formats import stream_format
from corsa.core import progress
from corsa.formats import results
from corsa.formats import series
from corsa.codec.models import VariableRateCodec, checked_session
from corsa.core.files import writing
from corsa.core.scene import BANDS, to_uint16

BLOCK = 256         # output px per side the space head renders at once


def _entry(codec: VariableRateCodec, name: str, what: str) -> dict:
    entry = codec.card["files"].get(name)
    if entry is None:
        raise ValueError(f"model {codec.model_id} has no {what} ({name}.onnx): it renders stored dates on their grid only")
    return entry


def _head(codec: VariableRateCodec, name: str, what: str):
    return checked_session(codec.path, _entry(codec, name, what), cluster.THREADS)


def between_date(folder: Path, date: str, codec: VariableRateCodec, out: Path,
                 run: cluster.Cluster | None = None) -> Path:
    """A date between a product's first and last stored dates, rendered from the decodes of the
    stored dates around it (``corsa_udf.between_candidates``) with the time head (a model without one:
    linear interpolation in time, ``corsa_udf.linear_between``), on the stored grid,
    block by block (``run``: on a cluster's workers)."""
    dates, days = blockwise.dated(folder)
    t = float(np.datetime64(date, "D").astype(np.int64))
    if len(dates) < 2 or not days[0] < t < days[-1]:
        span = f"between {dates[0]} and {dates[-1]}" if len(dates) > 1 else "with two dated dates or more"
        raise ValueError(f"{folder} renders dates {span}, not {date}: it extrapolates no date")
    time_head = "between" in codec.card["files"]   # else linear interpolation (corsa_udf.linear_between)
    if time_head:
        blockwise._sessions(codec, "between")     # checked here, before any block runs
    pick = corsa_udf.between_candidates(days, t)
    picked, picked_days = [dates[j] for j in pick], [days[j] for j in pick]
    stored = blockwise.StoredDates(folder, picked, series.header(folder, picked[0])[1]["shape"], codec, f"render {date}")
    head = stored.ints[0].head
    overlap = windows.OVERLAP["decompress"]

    def block(ys: tuple[int, ...], xs: tuple[int, ...], latents: list[np.ndarray], refinements: list
              ) -> tuple[int, int, np.ndarray]:
        (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = ys, xs
        dec = blockwise.network_session(codec, head["quality"])
        gaps = np.stack([np.zeros((wy1 - wy0, wx1 - wx0), bool) if m is None else m[wy0:wy1, wx0:wx1] for m in stored.masks])
        decoded = np.stack([blockwise.refined(corsa_udf.synthesise(dec, z, windows.UDF_TILE, overlap)[:, :wy1 - wy0, :wx1 - wx0], f, g)
                            for z, f, g in zip(latents, refinements, gaps)])
        # Gaps 0 as the decompress service's UDF has them: the time head reads the pixels around a gap too.
        decoded[np.broadcast_to(gaps[:, None], decoded.shape)] = 0
        rec = (corsa_udf.between(blockwise._sessions(codec, "between"), decoded, gaps, picked_days, t) if time_head
               else corsa_udf.linear_between(decoded, gaps, picked_days, t))[:, y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0]
        return y0, x0, to_uint16(rec)

    def inputs(ys: tuple[int, ...], xs: tuple[int, ...], pool) -> tuple:
        return (stored.latents(slice(ys[2] // 4, -(-ys[3] // 4)), slice(xs[2] // 4, -(-xs[3] // 4)), pool, codec),
                stored.refinements(ys, xs))

    return blockwise.write_blocks(out, {**head, "date": date}, overlap, inputs, block, run)


@dataclass(frozen=True)
class Grid:
    """An output grid: rows and columns, its affine transform and CRS (None: the source's)."""

    shape: tuple[int, int]
    transform: Affine
    crs: CRS | None = None


def scaled(path: Path, scale: float) -> Grid:
    """The grid of the GeoTIFF ``path`` with pixels ``scale`` times smaller, on the same bounds (the
    pixel size adjusted so a whole number of them covers them)."""
    if not scale > 0 or not np.isfinite(scale):
        raise ValueError(f"--scale must be a positive number, not {scale}")
    with rasterio.open(path) as f:
        h, w, t, crs = f.height, f.width, f.transform, f.crs
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return Grid((nh, nw), t * Affine.scale(w / nw, h / nh), crs)


def like(path: Path) -> Grid:
    """The grid of a raster GDAL opens (--like)."""
    try:
        with rasterio.open(path) as f:
            if f.crs is None or f.transform.is_identity:
                raise ValueError(f"--like {path}: it has no georeferencing (CRS and transform) to render onto")
            return Grid((f.height, f.width), f.transform, f.crs)
    except rasterio.errors.RasterioIOError as e:
        raise ValueError(f"--like {path}: not a raster GDAL can open ({e})") from None


def _points(src_transform: Affine, src_crs: CRS | None, grid: Grid, rows: range, cols: range) -> np.ndarray:
    """The stored grid's pixel coordinates (y, x) of the corners of output pixels (rows+1, cols+1, 2)."""
    cc, rr = np.meshgrid(np.arange(cols.start, cols.stop + 1, dtype=np.float64),
                         np.arange(rows.start, rows.stop + 1, dtype=np.float64))
    xs, ys = grid.transform * (cc.ravel(), rr.ravel())
    if grid.crs is not None and src_crs is not None and grid.crs != src_crs:
        xs, ys = warp_points(grid.crs, src_crs, xs, ys)
    col, row = ~src_transform * (np.asarray(xs), np.asarray(ys))
    return np.stack([np.asarray(row).reshape(cc.shape), np.asarray(col).reshape(cc.shape)], -1)


def _queries(corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Output pixels' centres and cell sizes (N, 2) in stored pixels, from their corners."""
    centre = (corners[:-1, :-1] + corners[1:, 1:] + corners[:-1, 1:] + corners[1:, :-1]) / 4
    cell = np.stack([np.abs(corners[1:, :-1, 0] - corners[:-1, :-1, 0]), np.abs(corners[:-1, 1:, 1] - corners[:-1, :-1, 1])], -1)
    return centre.reshape(-1, 2), cell.reshape(-1, 2)


def render_file(source: Path, codec: VariableRateCodec, grid: Grid, out: Path) -> Path:
    """A decoded date (GeoTIFF on the stored grid) rendered onto ``grid``: with the space head where
    the output pixels are at most as large as the stored ones, GDAL's average where they are larger
    (what a coarser pixel of the ground shows). Output pixels whose centre falls outside the stored
    date, or on its nodata, are 0. Under a temporary name until complete."""
    with rasterio.open(source) as src:
        centre = _queries(_points(src.transform, src.crs, grid, range(grid.shape[0] // 2, grid.shape[0] // 2 + 1),
                                  range(grid.shape[1] // 2, grid.shape[1] // 2 + 1)))[1][0]
        coarser = bool(centre.max() > 1 + 1e-6)
        session = None if coarser else _head(codec, "render", "space head")
        guard = None if coarser else _Guard(src, session)
        reach = codec.card.get("render", {}).get("reach_px", 0) + 1
        profile = {"count": len(BANDS), "dtype": "uint16", "height": grid.shape[0], "width": grid.shape[1],
                   "transform": grid.transform, "crs": grid.crs or src.crs}
        with results.cog_writer(out, profile) as dst:
            for i, b in enumerate(BANDS, 1):
                dst.set_band_description(i, b)
            vrt = (WarpedVRT(src, crs=profile["crs"], transform=grid.transform, width=grid.shape[1], height=grid.shape[0],
                             resampling=Resampling.average, nodata=0) if coarser else nullcontext())
            with vrt:
                for r0 in range(0, grid.shape[0], BLOCK):
                    for c0 in range(0, grid.shape[1], BLOCK):
                        rows, cols = range(r0, min(r0 + BLOCK, grid.shape[0])), range(c0, min(c0 + BLOCK, grid.shape[1]))
                        window = Window(c0, r0, len(cols), len(rows))
                        with writing(out):
                            dst.write(vrt.read(window=window) if coarser else
                                      _render_block(src, session, guard, reach, *_queries(_points(src.transform, src.crs, grid, rows, cols)))
                                      .reshape(len(BANDS), len(rows), len(cols)), window=window)
    return out


class _Guard:
    """A stored date's space-head guard (``corsa_udf.render_guard``), computed block by block as they
    are first asked for (the product's blocks, as the decompress UDF gives it with positions); the
    blocks above the rows asked for are let go (output blocks come row by row)."""

    def __init__(self, src, session):
        self.src, self.session = src, session
        self.blocks: dict[tuple[int, int], np.ndarray] = {}

    def _block(self, r: int, c: int) -> np.ndarray:
        if (r, c) not in self.blocks:
            b = corsa_udf.BLOCK_PX
            window = Window(c * b, r * b, min(b, self.src.width - c * b), min(b, self.src.height - r * b))
            self.blocks[r, c] = corsa_udf.render_guard(self.session, self.src.read(window=window))
        return self.blocks[r, c]

    def at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The weights of stored pixels (rows, cols)."""
        b = corsa_udf.BLOCK_PX
        for key in [k for k in self.blocks if k[0] < rows.min() // b]:
            del self.blocks[key]
        out = np.empty(len(rows), np.float32)
        block = rows // b * (self.src.width // b + 1) + cols // b
        for k in np.unique(block):
            where = block == k
            r, c = divmod(int(k), self.src.width // b + 1)
            out[where] = self._block(r, c)[rows[where] - r * b, cols[where] - c * b]
        return out


def _render_block(src, session, guard: _Guard, reach: int, coord: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """(10, N) uint16: the space head at ``coord`` (stored pixels) over the window of ``src`` they need."""
    out = np.zeros((len(BANDS), len(coord)), np.uint16)
    inside = (coord[:, 0] >= 0) & (coord[:, 0] < src.height) & (coord[:, 1] >= 0) & (coord[:, 1] < src.width)
    if not inside.any():
        return out
    q, c = coord[inside], cell[inside]
    r0, c0 = (max(0, int(np.floor(q[:, k].min())) - reach) for k in (0, 1))
    r1, c1 = min(src.height, int(np.ceil(q[:, 0].max())) + reach), min(src.width, int(np.ceil(q[:, 1].max())) + reach)
    image = src.read(window=Window(c0, r0, c1 - c0, r1 - r0))
    weights = guard.at(np.floor(q[:, 0]).astype(np.intp), np.floor(q[:, 1]).astype(np.intp))
    out[:, inside] = corsa_udf.render_points(session, image, q - [r0, c0], c, weights)
    return out


def decompress(folder: Path, codec: VariableRateCodec, out: Path, single: bool, date: str | None = None,
               fill_gaps: bool = False, scale: float | None = None, like_path: Path | None = None,
               run: cluster.Cluster | None = None, clear: bool = False) -> list[Path]:
    """Every date of a stream-format product (or only ``date``, stored or between stored dates) to the file
    ``out`` (``single``) or to ``out/corsa_decoded_<date>.tif`` (the engine path's names); on the
    stored grid, or on the grid of ``scale`` (pixels that many times smaller) or of ``like_path``.
    ``run``: a cluster whose workers decode the stored grid's blocks. ``clear``: stored dates with their
    cloud and cloud-shadow pixels set to 0 (with ``fill_gaps`` filled from the other dates, as nodata is;
    ``blockwise.DateDecoder``), then rendered as nodata."""
    dates = stream_format.dates_in(folder)
    between = date is not None and date not in dates
    if between and fill_gaps:
        raise ValueError(f"{date} is not a stored date of {folder}: --fill fills a stored date's gaps")
    if clear and between:
        raise ValueError(f"{date} is not a stored date of {folder}: --clear masks the clouds of stored dates")
    grid = like(like_path) if like_path else None       # a bad --like or --scale is refused before decoding
    if scale is not None and not (scale > 0 and np.isfinite(scale)):
        raise ValueError(f"--scale must be a positive number, not {scale}")
    todo = [date] if date is not None else dates
    if single and len(todo) != 1:
        raise ValueError(f"{folder} holds {len(todo)} dates: give a folder as -o")
    stored = [d for d in todo if d in dates]
    progress.grow(sum(blockwise.block_rows(series.header(folder, d)[1]["shape"]) for d in stored or dates[:1]))
    written = []
    for d in todo:
        target = out if single else out / results.file_name(blockwise.DECODED_PREFIX, d)
        plain = target if scale is None and like_path is None else target.with_name(target.name + ".stored.tif")
        try:
            if between:
                between_date(folder, d, codec, plain, run)
            else:
                blockwise.decompress_date(folder, d, codec, plain, fill_gaps, run, clear)
            if plain != target:
                render_file(plain, codec, grid or scaled(plain, scale), target)
        finally:
            if plain != target:
                plain.unlink(missing_ok=True)
        written.append(target)
    return written
