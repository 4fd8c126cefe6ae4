"""Lossless coding of a codec's integer latents with counted context tables (corsa2 onward).

What the product stores is ``ints`` (L channels on the latent grid, int16) at one quality level.
Each latent is coded with a categorical table chosen by its level, channel and context; the tables
are integer frequencies (sum 2**16, none zero) counted on the training split's latents, and the
contexts are integer functions of latents already decoded. So the decoder rebuilds exactly the
encoder's probabilities on any CPU, thread count or onnxruntime build: no float network decides
which table is used (CompressAI's hyperprior coders are not portable for that reason).

Order (a checkerboard, every step one vectorised call per table):
  pass A, channel 0..L-1, the anchor cells ((y + x) even): context = activity of the channels
    already coded at the same cell (sum of magnitudes over channels < c), 8 buckets;
  pass B, channel 0..L-1, the other cells: context = (sum of the magnitudes of the 4 anchor
    neighbours in the same channel: 6 buckets) x (activity of channels < c: 4 buckets).
Symbols are ints clipped to [-M, M] plus an escape; escaped values follow at the end of the stream,
16 bit each. The range coder is constriction's (exactly invertible fixed-point arithmetic).

Temporal tables (a series of one place, ``corsa.formats.series``): a cell may also see a reference, the
integer of the same cell and channel on an earlier date. Its value clipped to [-REF_RANGE,
REF_RANGE] is one more context dimension, bucket NO_REF meaning "no reference" (those tables are
the stand-alone ones). The reference is an integer the decoder has already decoded, so the tables
stay exactly the encoder's on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

M = 31                       # symbols -M..M (at the best quality under 0.2% of latents escape)
ESC = 2 * M + 1              # escape: the value follows, 16 bit
ALPHABET = 2 * M + 2
ANCHOR_BUCKETS = 8
SPATIAL_BUCKETS, CHANNEL_BUCKETS = 6, 4
CONTEXTS = ANCHOR_BUCKETS + SPATIAL_BUCKETS * CHANNEL_BUCKETS
PRECISION = 16               # table frequencies sum to 2**PRECISION
FILE_NAME = "latent_model.npz"
TEMPORAL_FILE_NAME = "temporal_model.npz"
REF_RANGE = 3
NO_REF = 2 * REF_RANGE + 1     # the reference bucket of a cell without a reference
REF_BUCKETS = NO_REF + 1
INT16 = (-(1 << 15), (1 << 15) - 1)


class StreamError(ValueError):
    """A latent stream is truncated or corrupt."""


def _bucket_table(n: int, size: int = 1 << 12) -> np.ndarray:
    """Bucket of an activity a: bit length of a, capped at n - 1 (integer, no float log)."""
    return np.minimum([int(a).bit_length() for a in range(size)], n - 1).astype(np.int64)


_ANCHOR = _bucket_table(ANCHOR_BUCKETS)
_SPATIAL = _bucket_table(SPATIAL_BUCKETS)
_CHANNEL = _bucket_table(CHANNEL_BUCKETS)


def _bucket(table: np.ndarray, activity: np.ndarray) -> np.ndarray:
    return table[np.minimum(activity, table.size - 1)]


def symbols(ints: np.ndarray) -> np.ndarray:
    """ints -> symbols 0..ALPHABET-1 (ESC for |v| > M)."""
    sym = np.clip(ints, -M, M).astype(np.int32) + M
    sym[np.abs(ints.astype(np.int32)) > M] = ESC
    return sym


def _magnitude(sym: np.ndarray) -> np.ndarray:
    """|value| as the contexts see it: escapes count as M + 1, so contexts need no escaped value."""
    return np.where(sym == ESC, M + 1, np.abs(sym - M)).astype(np.int64)


class _Layout:
    """Anchor / non-anchor cells of a (h, w) grid and the anchor neighbours of each non-anchor."""

    def __init__(self, h: int, w: int):
        yy, xx = np.mgrid[0:h, 0:w]
        anchor = (yy + xx) % 2 == 0
        self.cells = {0: np.flatnonzero(anchor), 1: np.flatnonzero(~anchor)}
        y, x = yy.ravel()[self.cells[1]], xx.ravel()[self.cells[1]]
        nbrs = []
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            ny, nx = y + dy, x + dx
            ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            nbrs.append(np.where(ok, np.clip(ny, 0, h - 1) * w + np.clip(nx, 0, w - 1), -1))
        self.neighbours = np.stack(nbrs)                  # (4, n non-anchors), -1 outside


def _contexts(mag: np.ndarray, activity: np.ndarray, layout: _Layout, c: int, part: int) -> np.ndarray:
    """Context ids of channel c's cells of one part, from magnitudes decoded so far.

    mag: (L, h*w) magnitudes (valid where decoded); activity: (h*w,) sum of magnitudes of channels < c."""
    act = activity[layout.cells[part]]
    if part == 0:
        return _bucket(_ANCHOR, act)
    padded = np.append(mag[c], 0)                         # index -1 -> 0: outside the grid
    spatial = padded[layout.neighbours].sum(0)
    return ANCHOR_BUCKETS + _bucket(_SPATIAL, spatial) * CHANNEL_BUCKETS + _bucket(_CHANNEL, act)


def _walk(shape: tuple[int, int, int]):
    """(channel, part, layout) in coding order."""
    layout = _Layout(shape[1], shape[2])
    for part in (0, 1):
        for c in range(shape[0]):
            yield c, part, layout


def reference_buckets(ref: np.ndarray | None, has_ref: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray | None:
    """(L, h*w) reference bucket of every cell: its reference clipped to +-REF_RANGE, or NO_REF
    where ``has_ref`` (h, w) is False; None without a reference."""
    if ref is None:
        return None
    if ref.shape != shape or has_ref is None or has_ref.shape != shape[1:]:
        raise ValueError(f"a reference of shape {ref.shape} (mask {getattr(has_ref, 'shape', None)}) for a latent of {shape}")
    rb = np.clip(ref.reshape(shape[0], -1).astype(np.int64), -REF_RANGE, REF_RANGE) + REF_RANGE
    rb[:, ~has_ref.ravel()] = NO_REF
    return rb


def _table_ids(mag: np.ndarray, cum: np.ndarray, layout: _Layout, c: int, part: int, rb: np.ndarray | None) -> np.ndarray:
    ctx = _contexts(mag, cum, layout, c, part)
    return ctx if rb is None else rb[c, layout.cells[part]] * CONTEXTS + ctx


def _by_table(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The coding order of one step's cells: by table id, ascending, and by position within a table
    (a stable sort), with the tables used and their cell counts."""
    counts = np.bincount(ids)
    tables = np.flatnonzero(counts)
    # uint16 (ids < REF_BUCKETS * CONTEXTS): numpy's stable sort of 16-bit integers is a radix sort
    return np.argsort(ids.astype(np.uint16), kind="stable"), tables, counts[tables]


def _symbol_tables(ints: np.ndarray, rb: np.ndarray | None):
    """(channel, cells, table ids, symbols) of every coding step of one latent."""
    L = ints.shape[0]
    sym = symbols(ints).reshape(L, -1)
    mag = _magnitude(sym)
    cum = np.cumsum(mag, 0) - mag                         # activity of channels < c, every cell
    for c, part, layout in _walk(ints.shape):
        cells = layout.cells[part]
        yield c, cells, _table_ids(mag, cum[c], layout, c, part, rb), sym[c, cells]


def context_counts(ints: np.ndarray, ref: np.ndarray | None = None, has_ref: np.ndarray | None = None) -> np.ndarray:
    """(tables, L, ALPHABET) symbol counts of one latent (L, h, w), as the coder sees them: CONTEXTS
    tables, or REF_BUCKETS * CONTEXTS with a reference (see ``reference_buckets``)."""
    L = ints.shape[0]
    n = CONTEXTS if ref is None else REF_BUCKETS * CONTEXTS
    counts = np.zeros((n, L, ALPHABET), np.int64)
    for c, _, ids, sym in _symbol_tables(ints, reference_buckets(ref, has_ref, ints.shape)):
        counts[:, c] += np.bincount(ids * ALPHABET + sym, minlength=n * ALPHABET).reshape(n, ALPHABET)
    return counts


def quantise_tables(counts: np.ndarray, prior: np.ndarray | None = None, smoothing: float = 2.0) -> np.ndarray:
    """Counts (..., ALPHABET) -> integer frequencies summing to 2**PRECISION, none zero.

    Rare contexts lean on ``prior`` (same shape, e.g. the channel's marginal) with ``smoothing``
    pseudo-counts. Done once when a model is exported: the coder itself only reads the integers."""
    counts = counts.astype(np.float64)
    if prior is None:
        prior = np.ones_like(counts) / counts.shape[-1]
    p = (counts + smoothing * prior) / (counts.sum(-1, keepdims=True) + smoothing)
    total = 1 << PRECISION
    freq = np.floor(p * (total - ALPHABET)).astype(np.int64) + 1
    short = total - freq.sum(-1)
    top = np.argmax(freq, -1)
    np.put_along_axis(freq, top[..., None], np.take_along_axis(freq, top[..., None], -1) + short[..., None], -1)
    return freq.astype(np.uint32)


@dataclass
class LatentCoder:
    """Integer tables of one model: freq[level] is (tables, L, ALPHABET), each sums 2**PRECISION;
    CONTEXTS tables (stand-alone), or REF_BUCKETS * CONTEXTS (temporal: with a reference)."""

    freq: np.ndarray         # (levels, tables, L, ALPHABET) uint32

    def __post_init__(self):
        if self.freq.ndim != 4 or self.freq.shape[1] not in (CONTEXTS, REF_BUCKETS * CONTEXTS) \
                or self.freq.shape[3] != ALPHABET:
            raise ValueError(f"latent tables of shape {self.freq.shape} do not fit this coder")
        if np.any(self.freq == 0) or np.any(self.freq.sum(-1, dtype=np.int64) != 1 << PRECISION):
            raise ValueError(f"latent tables must be non-zero and sum to 2**{PRECISION}")
        self._models: dict[int, list] = {}

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> "LatentCoder":
        """Tables from (levels, CONTEXTS, L, ALPHABET) counts; rare contexts lean on the channel's marginal."""
        marginal = counts.sum(1, keepdims=True).astype(np.float64)
        marginal = (marginal + 1) / (marginal + 1).sum(-1, keepdims=True)
        return cls(quantise_tables(counts, np.broadcast_to(marginal, counts.shape)))

    @classmethod
    def temporal_from_counts(cls, counts: np.ndarray, alone: "LatentCoder", smoothing: float = 8.0) -> "LatentCoder":
        """Temporal tables from (levels, REF_BUCKETS * CONTEXTS, L, ALPHABET) counts: rare contexts
        lean on the stand-alone table of the same context, and NO_REF is that table exactly (a cell
        without a reference costs what it costs alone)."""
        if alone.temporal or counts.shape[1] != REF_BUCKETS * CONTEXTS:
            raise ValueError("temporal tables are fitted on reference counts, next to stand-alone tables")
        prior = np.tile(alone.freq.astype(np.float64) / (1 << PRECISION), (1, REF_BUCKETS, 1, 1))
        freq = quantise_tables(counts, prior, smoothing)
        freq[:, NO_REF * CONTEXTS:] = alone.freq
        return cls(freq)

    @property
    def levels(self) -> int:
        return self.freq.shape[0]

    @property
    def channels(self) -> int:
        return self.freq.shape[2]

    @property
    def temporal(self) -> bool:
        return self.freq.shape[1] != CONTEXTS

    def _model(self, level: int, ctx: int, c: int):
        import constriction

        models = self._models.setdefault(level, [None] * (self.freq.shape[1] * self.channels))
        key = ctx * self.channels + c
        if models[key] is None:
            # Exact dyadic probabilities (integers / 2**16): the same floats on every machine.
            probs = self.freq[level, ctx, c].astype(np.float64) / (1 << PRECISION)
            models[key] = constriction.stream.model.Categorical(probs, perfect=False)
        return models[key]

    def _check(self, level: int, shape: tuple[int, int, int], ref: np.ndarray | None,
               has_ref: np.ndarray | None) -> np.ndarray | None:
        if not 0 <= level < self.levels:
            raise ValueError(f"quality level index {level} out of range 0..{self.levels - 1}")
        if shape[0] != self.channels:
            raise ValueError(f"latent has {shape[0]} channels, the tables {self.channels}")
        if (ref is not None) != self.temporal:
            raise ValueError("temporal tables code a latent with a reference, stand-alone tables without one")
        return reference_buckets(ref, has_ref, shape)

    def encode(self, ints: np.ndarray, level: int, ref: np.ndarray | None = None,
               has_ref: np.ndarray | None = None) -> bytes:
        """(L, h, w) integer latent -> bytes (the shape is not stored: the product holds it). Temporal
        tables take ``ref`` (L, h, w), the reference integers, valid where ``has_ref`` (h, w)."""
        import constriction

        rb = self._check(level, ints.shape, ref, has_ref)
        enc = constriction.stream.queue.RangeEncoder()
        for c, _, ids, s in _symbol_tables(ints, rb):
            order, tables, counts = _by_table(ids)
            for k, part in zip(tables, np.split(s[order], np.cumsum(counts)[:-1])):
                enc.encode(part, self._model(level, int(k), c))
        L = ints.shape[0]
        escaped = ints.reshape(L, -1)[symbols(ints).reshape(L, -1) == ESC].astype(np.int64)
        if escaped.size:
            if escaped.min() < INT16[0] or escaped.max() > INT16[1]:
                raise ValueError("latent values must fit in int16")
            enc.encode((escaped - INT16[0]).astype(np.int32), constriction.stream.model.Uniform(1 << 16))
        return enc.get_compressed().astype("<u4").tobytes()

    def decode(self, stream: bytes, level: int, shape: tuple[int, int, int], ref: np.ndarray | None = None,
               has_ref: np.ndarray | None = None) -> np.ndarray:
        """bytes -> (L, h, w) int16 latent (with the reference it was coded with, if any)."""
        import constriction

        rb = self._check(level, shape, ref, has_ref)
        if len(stream) % 4:
            raise StreamError("latent stream length is not a whole number of 32-bit words")
        L, h, w = shape
        sym = np.zeros((L, h * w), np.int32)
        mag = np.zeros((L, h * w), np.int64)
        cum = np.zeros(h * w, np.int64)
        dec = constriction.stream.queue.RangeDecoder(np.frombuffer(stream, "<u4").astype(np.uint32))
        try:
            for c, part, layout in _walk(shape):
                if c == 0:
                    cum[:] = 0
                cells = layout.cells[part]
                ids = _table_ids(mag, cum, layout, c, part, rb)
                s = np.empty(cells.size, np.int32)
                order, tables, counts = _by_table(ids)
                s[order] = np.concatenate([dec.decode(self._model(level, int(k), c), int(n))
                                           for k, n in zip(tables, counts)])
                sym[c, cells] = s
                mag[c, cells] = _magnitude(s)
                cum += mag[c]
            ints = (sym - M).astype(np.int64)
            esc = sym == ESC
            if esc.any():
                ints[esc] = dec.decode(constriction.stream.model.Uniform(1 << 16), int(esc.sum())) + INT16[0]
        except Exception as e:  # constriction reports corrupt data as assorted errors
            raise StreamError(f"latent stream is corrupt: {e}") from e
        return ints.reshape(shape).astype(np.int16)

    def cell_bits(self, ints: np.ndarray, level: int, ref: np.ndarray | None = None,
                  has_ref: np.ndarray | None = None) -> np.ndarray:
        """(h, w) ideal code length in bits of each cell, all channels (escapes at 16 bit more)."""
        rb = self._check(level, ints.shape, ref, has_ref)
        logp = -np.log2(self.freq[level].astype(np.float64) / (1 << PRECISION))
        out = np.zeros(ints.shape[1] * ints.shape[2])
        for c, cells, ids, s in _symbol_tables(ints, rb):
            out[cells] += logp[ids, c, s] + 16 * (s == ESC)
        return out.reshape(ints.shape[1:])

    def bits(self, ints: np.ndarray, level: int, ref: np.ndarray | None = None,
             has_ref: np.ndarray | None = None) -> float:
        """Ideal code length in bits of one latent (what the range coder approaches)."""
        return float(self.cell_bits(ints, level, ref, has_ref).sum())

    # -- storage ----------------------------------------------------------------------------
    def save(self, folder: Path, name: str = FILE_NAME, **extra: np.ndarray) -> Path:
        """The tables (and the model's ``extra`` arrays, e.g. its gains) in ``name``."""
        path = Path(folder) / name
        np.savez_compressed(path, freq=self.freq, precision=np.array(PRECISION), escape=np.array(M), **extra)
        return path

    @classmethod
    def load(cls, folder: Path, name: str = FILE_NAME) -> "LatentCoder":
        with np.load(Path(folder) / name) as z:
            if int(z["precision"]) != PRECISION or int(z["escape"]) != M:
                raise ValueError(f"latent tables in {folder} were made for another coder layout")
            return cls(z["freq"])
