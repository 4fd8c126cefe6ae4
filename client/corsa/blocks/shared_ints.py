"""A date's integers computed once and shared by the blocks whose windows need them (``corsa compress``
on this machine).

A block is coded from the integers of its window: the block and, around it, the reach its decoding needs
(``blockwise.compress_overlap``, 56 px for corsa3.12), so neighbouring windows overlap. Encoded window by
window, a 2136 px date ran 1.46x its pixels through the encoder. The encoder's value at a latent cell
depends only on the input within its receptive radius (a test checks it bit for bit), so a window's
integers are the same whether the encoder ran over the window or over a larger area: here it runs once
over units of a block row by UNIT_COLS px (with its reach around each: 1.12x the date's pixels), their
integers kept while blocks near them may still ask (HELD_ROWS rows: 350 MB for a 10980 px date). The units run
on the blocks' own threads, each row queued before the blocks of the row above it (a thread of their own
competed with the blocks for the two cores and fell behind: a 10980 px date compressed in 171 s instead of 153).
On a dask cluster each worker encodes its block's window itself (``blockwise``), as does a compress of dates
whose units would hold more than BUDGET (a long series of large scenes): windows overlap, memory stays flat.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import corsa_udf
import numpy as np
from rasterio.env import get_gdal_config, set_gdal_config

import corsa

if TYPE_CHECKING:
    import xarray as xr

UNIT_ROWS = corsa_udf.BLOCK_PX   # a unit is a block row high, so a block's window spans at most 3 unit rows
UNIT_COLS = 2 * corsa_udf.BLOCK_PX
HELD_ROWS = 5                     # unit rows held at most: 3 above a block row, its own, 1 ahead
BUDGET = 512 << 20                # bytes of units held, all dates of a compress together; beyond, windows alone
CACHED_CHUNK_ROWS = 4.5           # of each date's input in GDAL's block cache while units read it
CACHE_MAX = 640 << 20             # GDAL's block cache at most, all dates together


def held_bytes(shape: tuple[int, int], channels: int) -> int:
    """The most a date's units hold at once (int16 integers)."""
    cells = UNIT_ROWS // corsa_udf.STRIDE1
    return HELD_ROWS * cells * -(-shape[1] // corsa_udf.STRIDE1) * channels * 2


def read_window(scene: "xr.DataArray", rows: slice, cols: slice) -> np.ndarray:
    """(bands, rows, cols) float32 DN of a date's (bands, y, x) cube, read in this thread."""
    from dask.local import get_sync      # here: decompress, which imports the blocks too, needs no dask

    # The caller is already one of the threads: dask looks for a distributed client first for any
    # scheduler it is given by name (importing it: 0.4 s a run).
    return scene.isel(y=rows, x=cols).compute(scheduler=get_sync).values.astype(np.float32)


@contextmanager
def chunk_rows_cached(scenes: list["xr.DataArray"]) -> Iterator[None]:
    """GDAL's block cache raised, while the units read ``scenes`` (each (bands, y, x), dask chunks of
    whole internal tiles), to hold the rows of chunks that a row of units and the next share (CACHED_CHUNK_ROWS
    a date, at most CACHE_MAX; unchanged where the user set GDAL_CACHEMAX). A unit reads its block row
    and its reach into the rows above and below, 3 rows of chunks: with the package's 128 MB cache each
    chunk of a 10980 px date was decompressed about 7 times (26.6 CPU-s of a 132 s compress read it;
    460 MB of cache: 2 times; BENCHMARKS.md, issue 28, twenty-third part)."""
    need = sum(CACHED_CHUNK_ROWS * (s.chunks[1][0] if s.chunks else UNIT_ROWS) * s.sizes["x"] * s.sizes["bands"]
               * s.dtype.itemsize for s in scenes)
    before = get_gdal_config("GDAL_CACHEMAX")
    raise_it = corsa.GDAL_CACHE_OURS and isinstance(before, int) and need > before
    if raise_it:
        set_gdal_config("GDAL_CACHEMAX", int(min(need, CACHE_MAX)))
    try:
        yield
    finally:
        if raise_it:
            set_gdal_config("GDAL_CACHEMAX", before)


class SharedInts:
    """The integers of a date (``scene``: (bands, y, x)) at one quality, unit by unit, through
    ``quantise(latent)``; safe to ask from several threads. ``queue`` hands a row of units to the threads
    that run the blocks (ahead of the blocks that need them, so that no thread of its own competes
    with them for the cores): a unit asked for before a thread has started it is computed by the
    thread asking, one asked for while another thread computes it is waited for."""

    def __init__(self, scene: "xr.DataArray", encoder, reach: int, quantise: Callable[[np.ndarray], np.ndarray]):
        self.scene, self.encoder, self.reach, self.quantise = scene, encoder, reach, quantise
        self.h, self.w = scene.sizes["y"], scene.sizes["x"]
        self.rows, self.cols = -(-self.h // UNIT_ROWS), -(-self.w // UNIT_COLS)
        self._units: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()

    def queue(self, r: int, submit: Callable[..., Future]) -> None:
        """Unit row ``r`` (if the date has it) computed by ``submit(fn, *args)``'s threads."""
        if r < self.rows:
            with self._lock:
                for c in range(self.cols):
                    self._units[r, c] = submit(self._compute, r, c)

    def _compute(self, r: int, c: int) -> np.ndarray:
        y0, y1 = r * UNIT_ROWS, min(self.h, (r + 1) * UNIT_ROWS)
        x0, x1 = c * UNIT_COLS, min(self.w, (c + 1) * UNIT_COLS)
        ry0, ry1 = max(0, y0 - self.reach), min(self.h, y1 + self.reach)
        rx0, rx1 = max(0, x0 - self.reach), min(self.w, x1 + self.reach)
        win = read_window(self.scene, slice(ry0, ry1), slice(rx0, rx1))
        s = corsa_udf.STRIDE1
        latent = corsa_udf.analyse(self.encoder, win, -(-max(win.shape[1:]) // s) * s, 0)
        return self.quantise(latent[:, (y0 - ry0) // s:-(-(y1 - ry0) // s), (x0 - rx0) // s:-(-(x1 - rx0) // s)])

    def _unit(self, r: int, c: int) -> np.ndarray:
        with self._lock:
            # blocks go row by row, two side by side: none still running needs a unit row 4 above one asked for
            for k in [k for k in self._units if k[0] < r - 3]:
                del self._units[k]
            f = self._units.get((r, c))
            mine = f is None or f.cancel()
            if mine:
                f = self._units[r, c] = Future()
                f.set_running_or_notify_cancel()    # running: another thread asking waits for it
        if mine:
            try:
                f.set_result(self._compute(r, c))
            except BaseException as e:
                f.set_exception(e)
                raise
        return f.result()

    def window(self, rows: slice, cols: slice) -> np.ndarray:
        """The integers (latent channels, cells) of the latent cells under ``rows`` x ``cols`` px (starts
        multiples of the cell size), as ``corsa_udf.analyse`` gives them for that window alone."""
        s = corsa_udf.STRIDE1
        return cells_window(slice(rows.start // s, -(-rows.stop // s)), slice(cols.start // s, -(-cols.stop // s)),
                            (UNIT_ROWS // s, UNIT_COLS // s), self._unit)


def cells_window(cy: slice, cx: slice, side: tuple[int, int], part: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """(channels, cells) of the cells ``cy`` x ``cx`` of a grid kept in parts of ``side`` (rows, columns) cells,
    ``part(r, c)`` the one at part row r, column c: only the cells the window takes of each part copied (a
    block's window takes about a ninth of each block around it)."""
    (ur, uc), out = side, None
    for r in range(cy.start // ur, (cy.stop - 1) // ur + 1):
        ys = slice(max(cy.start, r * ur), min(cy.stop, (r + 1) * ur))
        for c in range(cx.start // uc, (cx.stop - 1) // uc + 1):
            xs = slice(max(cx.start, c * uc), min(cx.stop, (c + 1) * uc))
            p = part(r, c)
            if out is None:
                out = np.empty((len(p), cy.stop - cy.start, cx.stop - cx.start), p.dtype)
            out[:, ys.start - cy.start:ys.stop - cy.start, xs.start - cx.start:xs.stop - cx.start] = \
                p[:, ys.start - r * ur:ys.stop - r * ur, xs.start - c * uc:xs.stop - c * uc]
    return out
