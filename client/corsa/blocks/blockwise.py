"""The CLI's local data path for variable-rate models, block by block, without the process-graph engine.

    load -> 512 px blocks (+ the network's reach) -> encode -> entropy-code -> product file, and back:
    product file -> entropy-decode the blocks a window needs -> decode -> GeoTIFF, window by window.

It runs the UDF's own functions (``corsa_udf.analyse`` / ``synthesise``, quantised and masked as
the UDF does) on exactly the windows the services' apply_neighborhood gives the UDF (chunks of
``windows.CHUNK`` px overlapping by ``windows.OVERLAP`` / the encoder's reach), so a product
and a decoded file are byte for byte those of the engine path (a test checks it). What it leaves
out is the engine's cost around the networks: the latent replicated over the 10 m grid and
resampled back, dask's scheduling, the job's intermediate GeoTIFFs, and the importing of
openeo-processes-dask. Blocks are independent, so two run at a time (onnxruntime releases the GIL;
constriction's range coder holds it, so one thread's entropy decoding runs beside the other's network,
not beside another entropy decoding), or each on a worker of a dask cluster (``corsa.core.cluster``: the worker reads
its own window and opens its own sessions); memory stays flat in the area: a window's pixels, a
few block rows of integers, the streams and the nodata mask.
"""
from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property, partial
from pathlib import Path
from contextlib import closing, nullcontext
from typing import TYPE_CHECKING, Callable, Iterator

import corsa_udf
import numpy as np
from rasterio.windows import Window

if TYPE_CHECKING:         # the decompress path runs without xarray (its import: 0.5 s)
    import xarray as xr

from corsa.blocks import shared_ints
from corsa.core import cluster
from corsa.openeo import windows
from corsa.formats import product
from corsa.formats import stream_format
from corsa.core import progress
from corsa.formats import results
from corsa.formats import series
from corsa.codec import residual_coder
from corsa.codec.latent_coder import StreamError
from corsa.codec.models import VariableRateCodec, checked_session
from corsa.codec.refine_coder import BlockRefinement
from corsa.core.files import writing
from corsa.core.scene import BANDS, to_uint16

BLOCK_PX = 4 * stream_format.BLOCK       # a stream-format block, and the services' chunk
if not BLOCK_PX == windows.CHUNK == corsa_udf.BLOCK_PX:
    raise ImportError("a stream-format block must be the services' apply_neighborhood chunk, or the paths differ")
DECODED_PREFIX = "corsa_decoded"


def _spans(n: int, overlap: int) -> Iterator[tuple[int, int, int, int]]:
    """(block start, block stop, window start, window stop) along one axis of ``n`` px."""
    for start in range(0, n, BLOCK_PX):
        stop = min(start + BLOCK_PX, n)
        yield start, stop, max(0, start - overlap), min(n, stop + overlap)


@functools.lru_cache(maxsize=8)
def _session(model: str, entry: str):
    """A model's network by its card's files entry (or heads entry "heads/<name>"), opened once per
    process: where the block runs, on this machine or a worker. One intra-op thread: the blocks,
    not the layers, are what runs in parallel."""
    codec = series.model_codec(model)
    kind, _, name = entry.rpartition("/")
    return checked_session(codec.path, (codec.card["heads"] if kind else codec.card["files"])[name], 1)


def _sessions(codec: VariableRateCodec, name: str):
    return _session(str(codec.path), name)


def network_session(codec: VariableRateCodec, quality: int, network: str = "decoder"):
    """The decoder (or encoder) of ``quality`` as ``VariableRateCodec`` chooses it, opened once per process."""
    return corsa_udf.network_session(codec.card, {"kernels": codec.kernels}, quality, partial(_sessions, codec),
                                     network)


def compress_overlap(codec: VariableRateCodec, quality: int) -> int:
    """The window a block is encoded in reaches this far beyond it: the encoder's reach, and where the
    date is refined, the decoder's on top (the block is decoded as ``DateDecoder`` will)."""
    reach = windows.reach_overlap(codec.card, "encoder")
    return reach + windows.reach_overlap(codec.card, "decoder") if codec.refines(quality) else reach


def _window_ints(scene: xr.DataArray, codec: VariableRateCodec, quality: int, ints_over: Callable[[slice, slice], np.ndarray],
                 ys: tuple[int, ...], xs: tuple[int, ...], lam: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray, BlockRefinement | None, bytes | None]:
    """One block of one date (bands, y, x): its integers and its nodata, as the UDF computes them, where
    the quality is refined, its refinement (None otherwise), and with ``lam``, its residual layer at that
    lambda on its decoding (``corsa.codec.residual_coder``; None without). ``ints_over(rows, cols)``: the
    integers of the cells under a window of px, as the UDF's encoder gives them for its chunk."""
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = ys, xs
    ints = ints_over(slice(wy0, wy1), slice(wx0, wx1))
    block = shared_ints.read_window(scene, slice(y0, y1), slice(x0, x1))
    nodata = corsa_udf.nodata_of(block)
    cy, cx = (y0 - wy0) // 4, (x0 - wx0) // 4
    own = ints[:, cy:cy + -(-(y1 - y0) // 4), cx:cx + -(-(x1 - x0) // 4)]
    if not codec.refines(quality):
        return own, nodata, None, None
    # The block decoded as DateDecoder.block will: over its decompress window, from the integers of
    # the neighbours' cells too (within the decoder's reach they are those the neighbours store).
    d = windows.OVERLAP["decompress"]
    dy0, dy1, dx0, dx1 = max(y0 - d, wy0), min(y1 + d, wy1), max(x0 - d, wx0), min(x1 + d, wx1)
    z = codec.dequantise(ints[:, (dy0 - wy0) // 4:-(-(dy1 - wy0) // 4), (dx0 - wx0) // 4:-(-(dx1 - wx0) // 4)], quality)
    rec = corsa_udf.synthesise(network_session(codec, quality), z, windows.UDF_TILE, d)[:, :dy1 - dy0, :dx1 - dx0]
    rows, cols = slice(y0 - dy0, y1 - dy0), slice(x0 - dx0, x1 - dx0)
    cells = codec.refiner.block(block, rec, rows, cols, ~nodata, codec.level(quality))
    if lam is None:
        return own, nodata, cells, None
    # The block refined as readers refine it (the refinement over its own pixels, ``window_refinement``): no
    # second pass decodes the written date.
    valid = np.ones(rec.shape[1:], bool)
    valid[rows, cols] = ~nodata
    refinement = stream_format.refinement_window(codec.refiner, codec.level(quality), scene.shape[-2:], lambda _: cells,
                                                 (y0, y1), (x0, x1)).at(y0 - dy0, x0 - dx0)
    pixels = to_uint16(refinement.apply(rec, valid)[:, rows, cols])
    pixels[:, nodata] = 0
    layer = residual_coder.encode_block(block, pixels, ~nodata, lam, residual_coder.cells_phase(cells.grid20))
    return own, nodata, cells, layer


def _analysed(scene: xr.DataArray, codec: VariableRateCodec, quality: int, overlap: int, rows: slice,
              cols: slice) -> np.ndarray:
    """The integers of a window encoded alone, as the UDF encodes its chunk (where the block runs on a
    worker of a cluster: no other block's units at hand)."""
    win = shared_ints.read_window(scene, rows, cols)
    # The UDF gets this window as one chunk and, being under its tile size, analyses it in one piece.
    return codec.quantise(corsa_udf.analyse(network_session(codec, quality, "encoder"), win, windows.UDF_TILE, overlap),
                          quality)


def compress(cube: xr.DataArray, codec: VariableRateCodec, quality: int, out: Path, append: bool = False,
             key_every: int = series.KEY_EVERY, run: cluster.Local | cluster.Cluster | None = None) -> list[Path]:
    """A (t, bands, y, x) cube (``Catalogue.load``) -> one stream-format file a date in ``out``; the
    dates of a series coded with references to earlier ones (``corsa.formats.series``) where the model
    has temporal tables. ``append``: after the dates already in ``out``, which stay as they are.
    Block by block, every date of a block position together: a block's references are at hand.
    ``run``: where the blocks run (``corsa.core.cluster``; default two local threads)."""
    out = Path(out)
    layered, layer = quality, codec.layer(quality)
    if layer is not None:      # the base level's product first, then each block's layer on its decoding
        residual_coder.encoder()
        quality = layer[0]
    transform = results.transform_of(cube)
    crs = cube.rio.crs.to_string() if cube.rio.crs else None
    new = [product.date_label(t) for t in cube["t"].values]
    old = stream_format.dates_in(out) if append else []
    heads = [series.header(out, d)[1] for d in old]
    h, w = cube.sizes["y"], cube.sizes["x"]
    for d, hd in zip(old, heads):
        try:
            series.check_model(hd, codec)
        except product.ProductError as e:
            raise product.ProductError(f"cannot append to {out} with model {codec.model_id!r}: its date {d}: {e} "
                                       "(without --model the product's own is used)") from None
        if (hd["shape"], hd["transform"], hd["crs"]) != ((h, w), transform, crs):
            raise ValueError(f"cannot append to {out}: its date {d} has the grid {hd['shape']} {hd['crs']} "
                             f"{tuple(hd['transform'] or ())[:6]}, the input {(h, w)} {crs} {tuple(transform or ())[:6]}")
    if old and new and min(new) <= old[-1]:
        raise ValueError(f"appending adds dates after the product's last date ({old[-1]}), not {min(new)}")
    planned = series.plan(old + new, [hd["quality"] for hd in heads] + [quality] * len(new),
                          [hd["refs"] for hd in heads], key_every, temporal=codec.temporal)
    fresh = list(range(len(old), len(planned)))
    overlap = compress_overlap(codec, quality)
    network_session(codec, quality, "encoder")       # checked here, before any block runs
    if codec.refines(quality):
        network_session(codec, quality)
    scenes = [cube.isel(t=i).sel(bands=list(BANDS)) for i in range(len(new))]
    positions = [(ys, xs) for ys in _spans(h, overlap) for xs in _spans(w, overlap)]
    if run is None and len(scenes) * shared_ints.held_bytes((h, w), codec.channels) <= shared_ints.BUDGET:
        reach = windows.reach_overlap(codec.card, "encoder")
        shared = [shared_ints.SharedInts(s, network_session(codec, quality, "encoder"), reach,
                                         partial(codec.quantise, quality=quality)) for s in scenes]
        ints_over = [s.window for s in shared]
    else:
        shared, ints_over = [], [partial(_analysed, s, codec, quality, overlap) for s in scenes]

    def position(k: int) -> tuple[dict, dict[int, np.ndarray], dict[int, bytes]]:
        """A block position of every new date: its streams, the nodata of the dates that have some, and at a
        layered level each date's residual layer."""
        nodata, cells, layers = {}, {}, {}

        def ints_of(i: int, kk: int) -> np.ndarray:
            if i < len(old):
                return series.block_ints(out, old[i], kk, codec)
            ints, nodata_i, cells[i], layers[i] = _window_ints(scenes[i - len(old)], codec, quality,
                                                               ints_over[i - len(old)], *positions[kk],
                                                               None if layer is None else layer[1])
            if nodata_i.any():
                nodata[i] = nodata_i
            return ints

        return series.encode_block(codec, planned, fresh, k, ints_of, cells.get), nodata, layers

    masks: dict[int, np.ndarray] = {}
    coded, layers = [], []
    progress.grow(len(positions))
    with cluster.runner() if run is None else nullcontext(run) as where, \
            shared_ints.chunk_rows_cached(scenes) if shared else nullcontext():
        for (ys, xs), (streams, nodata, block_layers) in zip(positions, _positions_run(where, position, positions, shared)):
            coded.append(streams)
            layers.append(block_layers)
            for i, m in nodata.items():
                masks.setdefault(i, np.zeros((h, w), bool))[ys[0]:ys[1], xs[0]:xs[1]] = m
            progress.advance()
    written = series.write_dates(out, codec, planned, fresh, coded, masks, (h, w), transform, crs)
    if layer is None:
        return written
    try:
        for i in fresh:
            _rewritten(out, planned[i].date, layered, [b[i] for b in layers])
    except BaseException:      # no date left at its base level as if it were complete
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return written


def _rewritten(out: Path, date: str, quality: int, layers: list[bytes]) -> Path:
    """A date written at its base level rewritten with its blocks' residual layers, which make it level ``quality``."""
    path = out / stream_format.file_name(date)
    return stream_format.write_date(out, stream_format.with_layer(path.read_bytes(), path.name, quality, layers), date)


def _decoded_block(decoder: "DateDecoder", ys: tuple[int, ...], xs: tuple[int, ...]) -> np.ndarray:
    return decoder.block(ys, xs, *decoder.inputs(ys, xs, None))[2]


def decoded_blocks(folder: Path, date: str, codec: VariableRateCodec) -> Callable:
    """``(ys, xs) ->`` a block of a stored date as readers decode it (a reduced product's truth)."""
    return partial(_decoded_block, DateDecoder(folder, date, codec))


def _block_layer(decoder: "DateDecoder", truth_of: Callable, lam: float, job: tuple) -> bytes:
    """A block's residual layer: ``truth_of(ys, xs)`` against the block's decoding without it."""
    ys, xs = job
    mask = decoder.ints.mask
    return residual_coder.encode_block(truth_of(*job), _decoded_block(decoder, ys, xs),
                                       None if mask is None else ~mask[ys[0]:ys[1], xs[0]:xs[1]], lam,
                                       decoder.cells_phase(decoder.block_index(ys[0], xs[0])))


def with_layer(out: Path, date: str, truth_of: Callable, codec: VariableRateCodec, quality: int,
               run: cluster.Local | cluster.Cluster | None) -> Path:
    """A date written at its base level rewritten with the residual layer that makes it level ``quality``, each
    block's from ``truth_of(ys, xs)`` (the input's pixels, or a stored product's decoding)."""
    decoder = DateDecoder(out, date, codec)
    ys_all, xs_all = decoder.spans()
    jobs = [(ys, xs) for ys in ys_all for xs in xs_all]
    progress.grow(len(jobs))
    layers = []
    with cluster.runner() if run is None else nullcontext(run) as where:
        for layer in where.map(partial(_block_layer, decoder, truth_of, codec.layer(quality)[1]), jobs):
            layers.append(layer)
            progress.advance()
    return _rewritten(out, date, quality, layers)


def _positions_run(where: cluster.Local | cluster.Cluster, position: Callable[[int], tuple], positions: list,
                   shared: list[shared_ints.SharedInts]) -> Iterator[tuple]:
    """``position(k)`` of every block position, in order, where they run; with shared integers, each row of
    units queued before the blocks of the row above it, on the same threads (FIFO: a block seldom waits)."""
    if not shared:
        return where.map(position, range(len(positions)))
    for s in shared:
        s.queue(0, where.pool.submit)
    futures = []
    for k, (ys, xs) in enumerate(positions):
        if xs[0] == 0:
            for s in shared:
                s.queue(ys[0] // BLOCK_PX + 1, where.pool.submit)
        futures.append(where.pool.submit(position, k))
    return (f.result() for f in futures)


class _Integers:
    """A date's integers, entropy-decoded block row by block row on demand (its references' blocks
    first, ``corsa.formats.series``), the row after the ones a window needs decoded ahead, and kept for
    the block rows that the next windows still need (a window reaches at most one block into its
    neighbours). Sent to a dask worker as its names: there it reads the file itself, and each block's
    window decodes its own blocks (no pool, no row cache shared between tasks; ``series.block_ints``
    caches per process)."""

    def __init__(self, folder: Path, date: str, codec: VariableRateCodec):
        self.folder, self.date, self.codec = folder, date, codec
        self.data, self.head = series.header(folder, date)
        series.check_model(self.head, codec)
        codec.level(self.head["quality"])
        self.per_row = -(-self.head["cells"][1] // self.head["block"])
        self.row_count = -(-self.head["cells"][0] // self.head["block"])
        self.rows: dict[int, Future] = {}

    def __reduce__(self):
        return type(self), (self.folder, self.date, self.codec)

    @cached_property
    def mask(self) -> np.ndarray | None:
        """The date's nodata mask on its 10 m grid (None: no nodata)."""
        return stream_format.read_mask(self.data, self.head, stream_format.file_name(self.date))

    def _row(self, r: int, pool: ThreadPoolExecutor) -> Future:
        # One task a row, its blocks in turn: the range coder holds the GIL, so blocks decoded side by
        # side only take turns (and slow the networks' threads down).
        if r not in self.rows:
            ks = range(r * self.per_row, (r + 1) * self.per_row)
            self.rows[r] = pool.submit(lambda: [series.block_ints(self.folder, self.date, k, self.codec) for k in ks])
        return self.rows[r]

    def layer(self, k: int) -> bytes | None:
        """Block ``k``'s residual layer; None for a date without."""
        return series.block_layer(self.folder, self.date, k)

    def refinement(self, rows: tuple[int, int], cols: tuple[int, int]) -> stream_format.WindowRefinement | None:
        """The refinement over a window of the date's pixels, each block's part from its own stream;
        None for a date without."""
        if self.head["refine_lengths"] is None:
            return None
        return stream_format.refinement_window(
            self.codec.refiner, self.codec.level(self.head["quality"]), self.head["shape"],
            lambda k: series.block_refinement(self.folder, self.date, k, self.codec), rows, cols, self.head["block"])

    def _block(self, r: int, c: int, pool: ThreadPoolExecutor | None) -> np.ndarray:
        if pool is None:
            return series.block_ints(self.folder, self.date, r * self.per_row + c, self.codec)
        return self._row(r, pool).result()[c]

    def window(self, cells_y: slice, cells_x: slice, pool: ThreadPoolExecutor | None) -> np.ndarray:
        """The integers of a window of latent cells, assembled from the blocks it touches
        (``pool`` None: on a worker, as said above); ``pool`` then decodes the next row ahead."""
        b = self.head["block"]
        rows = range(cells_y.start // b, (cells_y.stop - 1) // b + 1)
        for r in [r for r in self.rows if r < rows.start]:
            del self.rows[r]
        out = shared_ints.cells_window(cells_y, cells_x, (b, b), lambda r, c: self._block(r, c, pool))
        if pool is not None and rows.stop < self.row_count:
            self._row(rows.stop, pool)
        return out


def dated(folder: Path) -> tuple[list[str], list[float]]:
    """A product's dated dates and their day numbers."""
    dates = [d for d in stream_format.dates_in(folder) if d != "undated"]
    return dates, [float(np.datetime64(d, "D").astype(np.int64)) for d in dates]


class StoredDates:
    """Some stored dates of a product (those --fill or a date in between reads), their integers
    and nodata masks."""

    def __init__(self, folder: Path, dates: list[str], shape: tuple[int, int], codec: VariableRateCodec, why: str):
        self.dates, self.args = dates, (folder, dates, shape, codec, why)
        self.ints = [_Integers(folder, d, codec) for d in dates]
        for n in self.ints:
            if n.head["shape"] != shape:
                raise ValueError(f"{folder}: date {n.date} is on another grid than the others: it cannot {why}")

    def __reduce__(self):
        return type(self), self.args

    @property
    def masks(self) -> list[np.ndarray | None]:
        return [n.mask for n in self.ints]

    def latents(self, cy: slice, cx: slice, pool: ThreadPoolExecutor | None, codec: VariableRateCodec) -> list[np.ndarray]:
        """The dequantised latents of the dates over a window of cells."""
        return [codec.dequantise(n.window(cy, cx, pool), n.head["quality"]) for n in self.ints]

    def refinements(self, ys: tuple[int, ...], xs: tuple[int, ...]) -> list[stream_format.WindowRefinement | None]:
        """The dates' refinements over a block's whole window (``_spans``; None: a date without)."""
        return [window_refinement(n, ys, xs, whole=True) for n in self.ints]


def window_refinement(ints, ys: tuple[int, ...], xs: tuple[int, ...], whole: bool = False) -> stream_format.WindowRefinement | None:
    """A date's refinement over a block's window (``_spans``: block start, stop, window start, stop along
    each axis), its loop filter on the block's pixels only (the decompress UDF's chunks have no other);
    its field on the block's pixels only too, the only ones kept, unless ``whole`` (--fill reads the
    window's other pixels refined)."""
    if whole:
        r = ints.refinement(ys[2:], xs[2:])
        return None if r is None else r.within(slice(ys[0] - ys[2], ys[1] - ys[2]), slice(xs[0] - xs[2], xs[1] - xs[2]))
    r = ints.refinement(ys[:2], xs[:2])
    return None if r is None else r.at(ys[0] - ys[2], xs[0] - xs[2])


def refined(decoded: np.ndarray, refinement: stream_format.WindowRefinement | None,
            mask: np.ndarray | None = None) -> np.ndarray:
    """A window's decoding refined (in place), if the date has a refinement: each block's loop filter,
    then the cells' field, then its 20 m grids over the pixels with data (``mask``: the window's nodata)."""
    return decoded if refinement is None else refinement.apply(decoded, None if mask is None else ~mask)


def _fill_dates(folder: Path, date: str) -> list[str]:
    """The stored dates that may fill a date's gaps (``corsa_udf.fill_candidates``)."""
    dates, days = dated(folder)
    if date not in dates or len(dates) < 2:
        raise ValueError(f"--fill predicts a date's gaps from the other dates: {folder} holds no other dated date")
    return [dates[j] for j in corsa_udf.fill_candidates(days, dates.index(date))]


class DateDecoder:
    """One date of a stream-format product (formats 3-13) decoded block by block, each block exactly as the decompress
    service's UDF decodes the window apply_neighborhood gives it: the integers of the block and its
    overlap (``windows.OVERLAP["decompress"]``) entropy-decoded, dequantised, synthesised, the
    nodata set to 0 (or filled from the other dates, ``fill_gaps``); then, at a level made of a base and a
    residual layer (formats 12 and 13), the block's layer added, which the services do not store. What ``corsa
    decompress`` writes (``decompress_date``) and what a window read through xarray gets (``window``) are these
    blocks. Pickles as its names: a dask worker opens the product and the sessions itself."""

    def __init__(self, folder: Path, date: str, codec: VariableRateCodec, fill_gaps: bool = False, ints=None,
                 clear: bool = False):
        """``ints``: where the integers come from, if not the product in ``folder`` (a compress job's
        download: ``job_files.DateIntegers``). ``clear``: the pixels the model's scene classes call cloud or
        cloud shadow are gaps too (0, or with ``fill_gaps`` filled where the other dates show the ground)."""
        self.args = (folder, date, codec, fill_gaps, ints, clear)
        self.ints = ints or _Integers(folder, date, codec)
        self.head, self.codec, self.clear = self.ints.head, codec, clear
        self.overlap = windows.OVERLAP["decompress"]
        self.around = StoredDates(folder, _fill_dates(folder, date), self.head["shape"], codec, f"fill {date}") \
            if fill_gaps and (self.ints.mask is not None or clear) else None

    def __reduce__(self):
        return type(self), self.args

    def spans(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """The block spans along y and along x: (start, stop, window start, window stop)."""
        (h, w) = self.head["shape"]
        return list(_spans(h, self.overlap)), list(_spans(w, self.overlap))

    def _nearby(self, ys: tuple[int, ...], xs: tuple[int, ...], pool: ThreadPoolExecutor | None) -> tuple | None:
        """The candidates' latents and refinements over a window whose block has gaps (--fill)."""
        if self.around is None or (not self.clear and not self.ints.mask[ys[0]:ys[1], xs[0]:xs[1]].any()):
            return None
        return (self.around.latents(slice(ys[2] // 4, -(-ys[3] // 4)), slice(xs[2] // 4, -(-xs[3] // 4)), pool,
                                    self.codec), self.around.refinements(ys, xs))

    def inputs(self, ys: tuple[int, ...], xs: tuple[int, ...], pool: ThreadPoolExecutor | None) -> tuple:
        """A block's integers over its window, its fill candidates' latents and refinements, and its
        refinement over the window."""
        cells = slice(ys[2] // 4, -(-ys[3] // 4)), slice(xs[2] // 4, -(-xs[3] // 4))
        nearby = self._nearby(ys, xs, pool)
        return self.ints.window(*cells, pool), nearby, window_refinement(self.ints, ys, xs, nearby is not None)

    def block(self, ys: tuple[int, ...], xs: tuple[int, ...], latent: np.ndarray, nearby: tuple | None,
              refinement: np.ndarray | None = None) -> tuple[int, int, np.ndarray]:
        """A block's pixels (10, y, x) uint16 and where they go (y0, x0): the window decoded and refined,
        nodata (and with ``clear`` cloud and cloud shadow) set to 0 or filled from the other dates' refined
        decodings."""
        (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = ys, xs
        z = self.codec.dequantise(latent, self.head["quality"])
        dec, mask = network_session(self.codec, self.head["quality"]), self.ints.mask
        win = None if mask is None else mask[wy0:wy1, wx0:wx1]
        rec = refined(corsa_udf.synthesise(dec, z, windows.UDF_TILE, self.overlap)[:, :wy1 - wy0, :wx1 - wx0], refinement, win)
        gaps = self._with_clouds(z, rec.shape[1:], win) if self.clear else win
        inside = slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0)
        if gaps is not None:
            rec[:, gaps] = 0
            if nearby is not None and gaps[inside].any():
                # The window the decompress service's UDF gets as one chunk: the same tiles, the same fill.
                holes = [np.zeros(gaps.shape, bool) if m is None else m[wy0:wy1, wx0:wx1] for m in self.around.masks]
                others = [refined(corsa_udf.synthesise(dec, zn, windows.UDF_TILE, self.overlap)[:, :wy1 - wy0, :wx1 - wx0], fn, g)
                          for zn, fn, g in zip(*nearby, holes)]
                if self.clear:      # another date's clouds do not fill this one's
                    holes = [self._with_clouds(zn, g.shape, g) for zn, g in zip(nearby[0], holes)]
                rec = corsa_udf.fill_date(rec, gaps, others, holes)
        return y0, x0, self._layered(y0, x0, to_uint16(rec[(slice(None), *inside)]), None if gaps is None else gaps[inside])

    def _with_clouds(self, z: np.ndarray, shape: tuple[int, int], nodata: np.ndarray | None) -> np.ndarray:
        """A window's gaps with ``clear``: its ``nodata`` and the pixels the model's scene classes, from its
        dequantised latent ``z``, call cloud or cloud shadow (each 20 m cell over its 10 m pixels). On a block the
        classes of the classify service's windows (``windows.OVERLAP["classify"]``: the head reaches no farther)."""
        unusable = corsa_udf.replicate(_head_classes(self.codec, "scl", z) > corsa_udf.LAST_USABLE_CLASS, 2, shape)
        return unusable if nodata is None else unusable | nodata

    def block_index(self, y0: int, x0: int) -> int:
        """The index of the block at (``y0``, ``x0``) in the file's order (``stream_format.block_slices``)."""
        return y0 // BLOCK_PX * len(self.spans()[1]) + x0 // BLOCK_PX

    def cells_phase(self, k: int) -> tuple[int, int] | None:
        """Where block ``k``'s 20 m bands are 2 x 2 cells, their phase (its refinement's); None where not."""
        refinement = series.block_refinement(self.args[0], self.head["date"], k, self.codec)
        return None if refinement is None else residual_coder.cells_phase(refinement.grid20)

    def _layered(self, y0: int, x0: int, pixels: np.ndarray, gaps: np.ndarray | None) -> np.ndarray:
        """A block's pixels with its residual layer added, where the date has one (not on its ``gaps``: nodata,
        cleared or filled pixels)."""
        k = self.block_index(y0, x0)
        layer = self.ints.layer(k)
        if layer is None:
            return pixels
        try:
            return residual_coder.add(pixels, layer, gaps, self.cells_phase(k))
        except StreamError as e:
            raise stream_format.ProductError(f"{stream_format.file_name(self.head['date'])}: block {k}: {e}") from e

    def window(self, rows: slice, cols: slice) -> np.ndarray:
        """The pixels (10, rows, cols) of a window of the date's grid, from the blocks under it only."""
        ys_all, xs_all = self.spans()
        ys_all = [ys for ys in ys_all if ys[1] > rows.start and ys[0] < rows.stop]
        xs_all = [xs for xs in xs_all if xs[1] > cols.start and xs[0] < cols.stop]
        if len(ys_all) * len(xs_all) > 1:
            # Blocks rendered side by side; the integers decoded in this thread (``series.block_ints``
            # keeps the recent blocks), not a row ahead: a window may be one of many read at once.
            blocks = (b for row in rendered_rows(ys_all, xs_all, self.inputs, self.block, ahead=False) for b in row)
        else:
            blocks = (self.block(ys, xs, *self.inputs(ys, xs, None)) for ys in ys_all for xs in xs_all)
        out = np.zeros((len(BANDS), rows.stop - rows.start, cols.stop - cols.start), np.uint16)
        for y0, x0, v in blocks:
            _place(out, rows, cols, y0, x0, v)
        return out

    def classes(self, rows: slice, cols: slice, classes: str = "scl") -> np.ndarray:
        """The scene classes or land cover (``classes``; uint8, 0 = nodata) of a window of the date's 10 m grid, each
        20 m cell over its 10 m pixels (as the classify service gives them): from the integers of the blocks under
        the window, over the classify service's windows (``block_classes``), without decoding."""
        (h, w), c = self.head["shape"], windows.OVERLAP["classify"]
        out = np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.uint8)
        for ys in (s for s in _spans(h, c) if s[1] > rows.start and s[0] < rows.stop):
            for xs in (s for s in _spans(w, c) if s[1] > cols.start and s[0] < cols.stop):
                ints = self.ints.window(slice(ys[2] // 4, -(-ys[3] // 4)), slice(xs[2] // 4, -(-xs[3] // 4)), None)
                cells = block_classes(self.codec, classes, self.head["quality"], ints, ys, xs, self.ints.mask)
                _place(out, rows, cols, ys[0], xs[0], corsa_udf.replicate(cells, 2, (ys[1] - ys[0], xs[1] - xs[0])))
        return out


def _place(out: np.ndarray, rows: slice, cols: slice, y0: int, x0: int, v: np.ndarray) -> None:
    """A block ``v`` (..., y, x) whose corner is at (``y0``, ``x0``) written into its part of ``out``, the window
    ``rows`` x ``cols`` of the grid."""
    ry, rx = slice(max(y0, rows.start), min(y0 + v.shape[-2], rows.stop)), \
        slice(max(x0, cols.start), min(x0 + v.shape[-1], cols.stop))
    out[..., ry.start - rows.start:ry.stop - rows.start, rx.start - cols.start:rx.stop - cols.start] = \
        v[..., ry.start - y0:ry.stop - y0, rx.start - x0:rx.stop - x0]


def reduced_refinement(folder: Path, date: str, codec: VariableRateCodec, to: int, k: int) -> BlockRefinement | None:
    """Block ``k``'s refinement of a date brought to quality ``to`` without its source (``corsa
    reduce``; None where ``to`` is not refined): the stored date's decoding (refined where it is) stands
    in for the scene, against the decoding of the reduced integers, each over the block's window as
    ``DateDecoder`` decodes it."""
    if not codec.refines(to):
        return None
    stored = DateDecoder(folder, date, codec)
    ys_all, xs_all = stored.spans()
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = ys, xs = ys_all[k // len(xs_all)], xs_all[k % len(xs_all)]
    latent, _, refinement = stored.inputs(ys, xs, None)
    truth = stored.block(ys, xs, latent, None, refinement)[2]
    quality = stored.head["quality"]
    z = codec.dequantise(codec.requantise(latent, quality, to), to)
    rec = corsa_udf.synthesise(network_session(codec, to), z, windows.UDF_TILE, stored.overlap)[:, :wy1 - wy0, :wx1 - wx0]
    mask = stored.ints.mask
    return codec.refiner.block(truth, rec, slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0),
                               None if mask is None else ~mask[y0:y1, x0:x1], codec.level(to))


def decompress_date(folder: Path, date: str, codec: VariableRateCodec, out: Path, fill_gaps: bool = False,
                    run: cluster.Cluster | None = None, clear: bool = False) -> Path:
    """One date of a stream-format product -> a GeoTIFF of the 10 bands (uint16 DN, nodata 0), as the
    decompress service's save_result writes it; under a temporary name until complete. ``fill_gaps``:
    nodata pixels get values from the other dates (``corsa_udf.fill_date``), the others are kept.
    ``run``: a cluster whose workers decode the blocks (default: local threads). ``clear``: cloud and
    cloud-shadow pixels are gaps too, set to 0 or filled (``DateDecoder``)."""
    decoder = DateDecoder(folder, date, codec, fill_gaps, clear=clear)
    network_session(codec, decoder.head["quality"])       # checked here, before any block runs
    if clear:
        _sessions(codec, "heads/scl")
    return write_blocks(out, decoder.head, decoder.overlap, decoder.inputs, decoder.block, run)


def _head_classes(codec: VariableRateCodec, classes: str, z: np.ndarray) -> np.ndarray:
    """The class values (uint8, from 1) on the 20 m grid that the model's head for ``classes`` gives a dequantised
    latent window ``z``, as the classify service's UDF takes them."""
    (logits,) = _sessions(codec, f"heads/{classes}").run(None, {"latent": z[None]})
    return (logits[0].argmax(0) + 1).astype(np.uint8)


def block_classes(codec: VariableRateCodec, classes: str, quality: int, ints: np.ndarray, ys: tuple[int, ...],
                  xs: tuple[int, ...], mask: np.ndarray | None) -> np.ndarray:
    """A block's classes (uint8, 0 = nodata) on the 20 m grid by the model's head for ``classes``, from the integers
    ``ints`` of its window (``ys``, ``xs``: block and window spans), as the classify service's UDF gives them."""
    (y0, y1, wy0, _), (x0, x1, wx0, _) = ys, xs
    out = _head_classes(codec, classes, codec.dequantise(ints, quality))
    out = out[(y0 - wy0) // 2:(y0 - wy0) // 2 + -(-(y1 - y0) // 2), (x0 - wx0) // 2:(x0 - wx0) // 2 + -(-(x1 - x0) // 2)]
    if mask is not None:      # the service zeroes a 10 m pixel of nodata; a 20 m cell is its first pixel
        out[mask[y0:y1:2, x0:x1:2]] = 0
    return out


def classify_date(folder: Path, date: str, codec: VariableRateCodec, classes: str = "scl",
                  run: cluster.Cluster | None = None) -> np.ndarray:
    """One date of a stream-format product -> its classes (uint8, 0 = nodata) on the 20 m grid by the
    model's head for ``classes``, no decoding: block by block over the windows the classify
    service's apply_neighborhood gives its UDF (``windows.OVERLAP["classify"]``), so the classes
    are those of the service. ``run``: a cluster whose workers classify the blocks."""
    ints = _Integers(folder, date, codec)
    h = ints.head
    overlap = windows.OVERLAP["classify"]
    _sessions(codec, f"heads/{classes}")

    def block(ys: tuple[int, ...], xs: tuple[int, ...], pool: ThreadPoolExecutor | None) -> tuple[int, int, np.ndarray]:
        cells = ints.window(slice(ys[2] // 4, -(-ys[3] // 4)), slice(xs[2] // 4, -(-xs[3] // 4)), pool)
        return ys[0] // 2, xs[0] // 2, block_classes(codec, classes, h["quality"], cells, ys, xs, ints.mask)

    hh, ww = h["shape"]
    result = np.zeros((-(-hh // 2), -(-ww // 2)), np.uint8)
    jobs = [(ys, xs) for ys in _spans(hh, overlap) for xs in _spans(ww, overlap)]
    with cluster.runner() if run is None else nullcontext(run) as where:
        for r0, c0, v in where.map(partial(_without_pool, block), jobs):
            result[r0:r0 + v.shape[0], c0:c0 + v.shape[1]] = v
    return result


def _without_pool(fn, job: tuple):
    """``fn(*job, None)``: each block decodes the integers it needs itself (``_Integers``)."""
    return fn(*job, None)


def block_rows(shape: tuple[int, int]) -> int:
    """Rows of blocks ``write_blocks`` writes for a grid of ``shape``."""
    return -(-shape[0] // BLOCK_PX)


def _remote(inputs, render, job: tuple):
    """A block entirely where it runs (a worker): its inputs, then its pixels."""
    return render(*job, *inputs(*job, None))


def write_blocks(out: Path, head: dict, overlap: int, inputs, render, run: cluster.Cluster | None = None) -> Path:
    """A date's cloud-optimised GeoTIFF of the 10 bands (uint16 DN, nodata 0) on the grid of a
    product's ``head``, block by block: ``inputs(ys, xs, pool)`` gathers a block's data (entropy
    decoding in ``pool``), ``render(ys, xs, *data)`` -> (y0, x0, block) runs two blocks at a time;
    each row of blocks done is a unit of progress (``block_rows``). Under a temporary name until
    complete. ``run``: a cluster, whose workers gather and render whole blocks."""
    (hh, ww) = head["shape"]
    profile = {"count": len(BANDS), "dtype": "uint16", "height": hh, "width": ww}
    if head["transform"] is not None:
        profile["transform"] = head["transform"]
    if head["crs"]:
        profile["crs"] = head["crs"]
    with results.cog_writer(out, profile) as dst:
        for i, b in enumerate(BANDS, 1):
            dst.set_band_description(i, b)
        if run is None:
            rows = rendered_rows(list(_spans(hh, overlap)), list(_spans(ww, overlap)), inputs, render)
        else:
            rows = (run.map(partial(_remote, inputs, render), [(ys, xs) for xs in _spans(ww, overlap)])
                    for ys in _spans(hh, overlap))
        with closing(rows):
            for row in rows:
                for y0, x0, v in row:
                    with writing(out):
                        dst.write(v, window=Window(x0, y0, v.shape[2], v.shape[1]))
                progress.advance()
    return out


def rendered_rows(ys_spans: list, xs_spans: list, inputs, render, ahead: bool = True) -> Iterator[Iterator[tuple]]:
    """The blocks of ``ys_spans`` x ``xs_spans``, row by row, each row an iterator of its blocks'
    ``render(ys, xs, *inputs(ys, xs, pool))`` -> (y0, x0, pixels) in order, two blocks rendering at
    a time. ``ahead``: entropy decoding of block rows (the date's, and its neighbours' or candidates')
    has a thread of its own, a row ahead of the renderings (queued behind them in one pool, it left them
    idle at every row's end; the range coder holds the GIL, so one thread is all it can use); else it
    runs in this thread (``pool`` None), as the renderings of the row before run. A row is handed over
    once the next row's blocks are queued behind it, so that no rendering thread waits at a row's end
    for the caller (writing the last block)."""
    pool, decoding = ThreadPoolExecutor(cluster.THREADS), ThreadPoolExecutor(1) if ahead else None
    try:
        rendering = None
        for ys in ys_spans:
            queued = [pool.submit(render, ys, xs, *inputs(ys, xs, decoding)) for xs in xs_spans]
            if rendering is not None:
                yield (f.result() for f in rendering)
            rendering = queued
        if rendering is not None:
            yield (f.result() for f in rendering)
    finally:
        # on an error (or a caller that stops early) nothing queued runs on
        pool.shutdown(cancel_futures=True)
        if decoding is not None:
            decoding.shutdown(cancel_futures=True)
