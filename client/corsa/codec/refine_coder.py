"""A coarse correction of a decoded date's low frequencies, coded next to its latent (formats 8 to 11).

The decoder network gets a scene's fine detail right but can miss its local brightness: on snow, on
L1C scenes and on places unlike the training data by hundreds of DN, and everywhere by a few DN more
than the latent's bits would allow (BENCHMARKS.md, issue 28, twelfth part). The encoder knows the
truth, so it decodes each block as the decoder will and stores, per band and cell of GRID x GRID
pixels, the mean error over the cell's valid pixels, quantised with the level's step (DN); the
decoder adds those means back, interpolated bilinearly between cell centres inside the block (a
block stays decodable alone).

Stream of one block (constriction's range coder, like ``corsa.codec.latent_coder``): per band a
table class (0: the band's cells are all 0, nothing else follows for it), then a flag and, if set,
the band's offset (the median symbol, 16 bit), then the cells' symbols minus the offset, row-major,
with the class's table (a discretised Laplace of one of TABLES scales, integer frequencies stored
with the model: the same probabilities on every machine), values beyond +-M escaped at 16 bit.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

import corsa_udf
from corsa.codec import loop_filter
from corsa.codec.latent_coder import PRECISION, StreamError, quantise_tables

FILE_NAME = "refine_model.npz"
FILTER_NET = "loop_filter.onnx"
M = 31
ESC = 2 * M + 1
ALPHABET = 2 * M + 2
TABLES = 15
OFFSET = 1 << 15              # offsets and escaped values are stored as value + OFFSET in 16 bits
LIMIT = corsa_udf.REFINE_LIMIT  # |cell symbol| at most: a symbol minus the offset fits those 16 bits


def laplace_tables(scales: np.ndarray) -> np.ndarray:
    """(len(scales), ALPHABET) integer frequencies of discretised Laplace laws of ``scales`` (symbols),
    the escape at 1e-4. Computed once when a model is made: the coder only reads the integers."""
    d = np.arange(-M, M + 1)
    p = np.exp(-np.abs(d)[None] / np.asarray(scales, np.float64)[:, None])
    p = p / p.sum(1, keepdims=True) * (1 - 1e-4)
    return quantise_tables(np.concatenate([p, np.full((len(p), 1), 1e-4)], 1) * 1e6, None, 0.0)


@functools.lru_cache(maxsize=16)
def _bilinear(n: int, cells: int, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``n`` pixels along an axis: its two nearest cell centres and the second one's weight
    (the end cells' values held beyond their centres)."""
    p = np.clip((np.arange(n) + 0.5) / grid - 0.5, 0, cells - 1)
    i0 = np.floor(p).astype(np.intp)
    return i0, np.minimum(i0 + 1, cells - 1), (p - i0).astype(np.float32)


class BlockRefinement(NamedTuple):
    """What a block's refinement stream holds: its cells' symbols (10, ch, cw) and, for a model with a
    loop filter, the block's filter weights (None: not filtered) and the phase of its 20 m bands' 2 x 2
    cells (``corsa_udf.grid20_phase``; 0: none, and always in format 8 and 9 products or a block
    under ``corsa_udf.FILTER_MIN_PX`` a side)."""

    cells: np.ndarray
    weights: np.ndarray | None = None
    grid20: int = 0

    def same(self, other: "BlockRefinement") -> bool:
        return np.array_equal(self.cells, other.cells) and (self.weights is None) == (other.weights is None) and \
            (self.weights is None or np.array_equal(self.weights, other.weights)) and self.grid20 == other.grid20


@dataclass
class RefineCoder:
    """A model's refinement: ``steps[level]`` the DN step of each quality level (0: none at that
    level), ``grid`` the cell side in 10 m pixels, ``freq`` the tables (TABLES, ALPHABET);
    ``filter_shape`` set: each block's stream starts with a loop filter of that support
    (``corsa.codec.loop_filter``), fitted at the levels where ``filter_levels`` is set (the others store none)."""

    steps: np.ndarray
    grid: int
    freq: np.ndarray
    filter_shape: corsa_udf.FilterShape | None = None
    filter_levels: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    filter_net: Path | None = None      # the model's loop_filter.onnx (checked by the codec that loads it)
    filter_lambda: np.ndarray | None = None   # each level's DN^2 a bit, where the encoder weighs a filter's cost (card)

    def __post_init__(self):
        self.steps = np.asarray(self.steps, np.int64)
        self.filter_levels = np.zeros(len(self.steps), bool) if not self.filter_shape else \
            np.asarray(self.filter_levels, bool)
        if len(self.filter_levels) != len(self.steps) or np.any(self.filter_levels & (self.steps == 0)):
            raise ValueError("a loop filter's levels are refined levels, one flag a level")
        if self.freq.shape != (TABLES, ALPHABET) or np.any(self.freq == 0) \
                or np.any(self.freq.sum(-1, dtype=np.int64) != 1 << PRECISION):
            raise ValueError(f"refinement tables must be {TABLES} x {ALPHABET}, non-zero, summing to 2**{PRECISION}")
        if self.grid < 1 or np.any(self.steps < 0):
            raise ValueError(f"a refinement needs a cell side >= 1 and steps >= 0, not {self.grid}, {self.steps}")
        self._models: list = [None] * TABLES

    def at(self, level: int) -> bool:
        """Whether dates of this level are refined."""
        return bool(self.steps[level])

    def filters(self, level: int) -> bool:
        """Whether the encoder fits a loop filter for each block of this level."""
        return bool(self.filter_levels[level])

    def block(self, truth: np.ndarray, decoded: np.ndarray, rows: slice, cols: slice, valid: np.ndarray | None,
              level: int) -> BlockRefinement:
        """A block's refinement from its input ``truth`` (10, h, w) and a decoded window (10, H, W) in which
        the block is ``rows`` x ``cols``, as the readers decode it: its loop filter where this level has
        one, then the cells of what is left of the error."""
        lam = 0.0 if self.filter_lambda is None else float(self.filter_lambda[level])
        weights = corsa_udf.filter_fit(truth, decoded, rows, cols, valid, self.filter_shape, lam) if self.filters(level) else None
        filtered = self.filtered(decoded, weights, rows, cols)
        grid20 = corsa_udf.grid20_phase(truth, valid) if self.filter_shape else 0
        return BlockRefinement(self.symbols(truth.astype(np.float32) - filtered, valid, level), weights, grid20)

    def filtered(self, decoded: np.ndarray, weights: np.ndarray | None, rows: slice, cols: slice) -> np.ndarray:
        """A block's pixels ``rows`` x ``cols`` of a decoded window after its loop filter (``weights``
        None: as they are)."""
        if weights is None:
            return decoded[:, rows, cols]
        if self.filter_net is None:
            raise ValueError("a loop filter needs the model's loop_filter.onnx")
        return corsa_udf.loop_filter(corsa_udf.session(str(self.filter_net), 1), decoded, weights, rows, cols,
                                     self.filter_shape)

    def cells(self, shape: tuple[int, int]) -> tuple[int, int]:
        return -(-shape[0] // self.grid), -(-shape[1] // self.grid)

    def symbols(self, error: np.ndarray, valid: np.ndarray | None, level: int) -> np.ndarray:
        """(10, h, w) error (truth - decoded, DN) of one block -> (10, ch, cw) int32 cell symbols: the
        mean over each cell's ``valid`` pixels (all if None) in steps, rounded (0 where none is valid),
        as the services' compress UDF computes them."""
        return corsa_udf.refine_symbols(error, valid, float(self.steps[level]), self.grid)

    def field(self, sym: np.ndarray, level: int, shape: tuple[int, int], rows: slice = slice(None),
              cols: slice = slice(None), out: np.ndarray | None = None, add: bool = False) -> np.ndarray:
        """(10, ch, cw) cell symbols of a block of ``shape`` px -> its (10, h, w) float32 correction in DN
        (or that of its pixels ``rows`` x ``cols``; into ``out`` if given, ``add``: added to it), bilinear
        between cell centres: along x on the cells' rows first (small), then along y. No BLAS: its
        threads would spin beside the decoder's (a date read through xarray 0.9 s slower with a matrix
        product here)."""
        ys = tuple(a[rows] for a in _bilinear(shape[0], sym.shape[1], self.grid))
        xs = tuple(a[cols] for a in _bilinear(shape[1], sym.shape[2], self.grid))
        return corsa_udf.bilinear_field(sym.astype(np.float32) * np.float32(self.steps[level]), ys, xs, out, add)

    def _model(self, k: int):
        if self._models[k] is None:
            import constriction

            # Exact dyadic probabilities (integers / 2**16): the same floats on every machine.
            self._models[k] = constriction.stream.model.Categorical(self.freq[k].astype(np.float64) / (1 << PRECISION),
                                                                    perfect=False)
        return self._models[k]

    def encode(self, sym: np.ndarray, weights: np.ndarray | None = None, grid20: int = 0) -> bytes:
        """(10, ch, cw) cell symbols (and a model with a loop filter: the block's weights or None, and
        its ``grid20`` phase, a byte before them) -> bytes (the grid's shape is the block's, known to the reader)."""
        import constriction

        if (weights is not None or grid20) and not self.filter_shape:
            raise ValueError("a loop filter or a 20 m grid for a model without a loop filter")
        if grid20 not in range(len(corsa_udf.GRID20_PHASES) + 1):
            raise ValueError(f"a 20 m grid's phase is 0 to {len(corsa_udf.GRID20_PHASES)}, not {grid20}")
        head = bytes([grid20]) + loop_filter.encode(weights, self.filter_shape) if self.filter_shape else b""
        logp = -np.log2(self.freq.astype(np.float64) / (1 << PRECISION))
        enc = constriction.stream.queue.RangeEncoder()
        for band in sym.reshape(len(sym), -1).astype(np.int64):
            if not band.any():
                enc.encode(np.array([0], np.int32), constriction.stream.model.Uniform(TABLES + 1))
                continue
            offset = int(np.median(band))
            d = band - offset
            s = np.where(np.abs(d) > M, ESC, np.clip(d, -M, M) + M).astype(np.int32)
            k = int(np.argmin(logp[:, s].sum(1)))
            enc.encode(np.array([k + 1], np.int32), constriction.stream.model.Uniform(TABLES + 1))
            enc.encode(np.array([offset != 0], np.int32), constriction.stream.model.Uniform(2))
            if offset:
                enc.encode(np.array([offset + OFFSET], np.int32), constriction.stream.model.Uniform(1 << 16))
            enc.encode(s, self._model(k))
            if (s == ESC).any():
                enc.encode((d[s == ESC] + OFFSET).astype(np.int32), constriction.stream.model.Uniform(1 << 16))
        return head + enc.get_compressed().astype("<u4").tobytes()

    def decode(self, stream: bytes, bands: int, cells: tuple[int, int], grid20: bool = True) -> BlockRefinement:
        """bytes -> the block's (bands, ch, cw) int32 cell symbols and loop filter (and its 20 m grid's
        phase where ``grid20``: format 10 and 11)."""
        import constriction

        weights, phase = None, 0
        if self.filter_shape:
            if grid20:
                if not stream or stream[0] > len(corsa_udf.GRID20_PHASES):
                    raise StreamError("refinement stream is corrupt: its 20 m grid's phase is out of range")
                phase, stream = stream[0], stream[1:]
            weights, n = loop_filter.decode(stream, self.filter_shape, bands)
            stream = stream[n:]
        if len(stream) % 4:
            raise StreamError("refinement stream length is not a whole number of 32-bit words")
        out = np.zeros((bands, cells[0] * cells[1]), np.int64)
        dec = constriction.stream.queue.RangeDecoder(np.frombuffer(stream, "<u4").astype(np.uint32))
        try:
            for b in range(bands):
                k = int(dec.decode(constriction.stream.model.Uniform(TABLES + 1), 1)[0])
                if not k:
                    continue
                offset = int(dec.decode(constriction.stream.model.Uniform(2), 1)[0])
                if offset:
                    offset = int(dec.decode(constriction.stream.model.Uniform(1 << 16), 1)[0]) - OFFSET
                s = dec.decode(self._model(k - 1), out.shape[1]).astype(np.int64)
                out[b] = s - M + offset
                escaped = np.flatnonzero(s == ESC)
                if escaped.size:
                    out[b, escaped] = dec.decode(constriction.stream.model.Uniform(1 << 16), escaped.size) - OFFSET + offset
        except Exception as e:  # constriction reports corrupt data as assorted errors
            raise StreamError(f"refinement stream is corrupt: {e}") from e
        if np.abs(out).max(initial=0) > LIMIT:
            raise StreamError("refinement stream is corrupt: a cell's correction is out of range")
        return BlockRefinement(out.reshape(bands, *cells).astype(np.int32), weights, phase)

    # -- storage ----------------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        path = Path(folder) / FILE_NAME
        np.savez_compressed(path, freq=self.freq, steps=self.steps, grid=np.array(self.grid),
                            precision=np.array(PRECISION), escape=np.array(M), filter_radius=np.array(self.filter_shape.radius if self.filter_shape else 0),
                            filter_cross=np.array(self.filter_shape.cross if self.filter_shape else 0),
                            filter_levels=self.filter_levels)
        return path

    @classmethod
    def load(cls, folder: Path) -> "RefineCoder":
        with np.load(Path(folder) / FILE_NAME) as z:
            if int(z["precision"]) != PRECISION or int(z["escape"]) != M:
                raise ValueError(f"refinement tables in {folder} were made for another coder layout")
            radius = int(z["filter_radius"]) if "filter_radius" in z else 0
            shape = corsa_udf.FilterShape(radius, int(z["filter_cross"]) if "filter_cross" in z else 0) if radius else None
            return cls(z["steps"], int(z["grid"]), z["freq"], shape, z["filter_levels"] if radius else np.zeros(0, bool),
                       Path(folder) / FILTER_NET if radius else None)
