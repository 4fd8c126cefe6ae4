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


def context_counts(ints: np.ndarray) -> np.ndarray:
    """(CONTEXTS, L, ALPHABET) symbol counts of one latent (L, h, w), as the coder sees them."""
    L = ints.shape[0]
    sym = symbols(ints).reshape(L, -1)
    mag = _magnitude(sym)
    counts = np.zeros((CONTEXTS, L, ALPHABET), np.int64)
    cum = np.cumsum(mag, 0) - mag                         # activity of channels < c, every cell
    for c, part, layout in _walk(ints.shape):
        ctx = _contexts(mag, cum[c], layout, c, part)
        counts[:, c] += np.bincount(ctx * ALPHABET + sym[c, layout.cells[part]],
                                    minlength=CONTEXTS * ALPHABET).reshape(CONTEXTS, ALPHABET)
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
    """Integer tables of one model: freq[level] is (CONTEXTS, L, ALPHABET), sums 2**PRECISION."""

    freq: np.ndarray         # (levels, CONTEXTS, L, ALPHABET) uint32

    def __post_init__(self):
        if self.freq.ndim != 4 or self.freq.shape[1] != CONTEXTS or self.freq.shape[3] != ALPHABET:
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

    @property
    def levels(self) -> int:
        return self.freq.shape[0]

    @property
    def channels(self) -> int:
        return self.freq.shape[2]

    def _model(self, level: int, ctx: int, c: int):
        import constriction

        models = self._models.setdefault(level, [None] * (CONTEXTS * self.channels))
        key = ctx * self.channels + c
        if models[key] is None:
            # Exact dyadic probabilities (integers / 2**16): the same floats on every machine.
            probs = self.freq[level, ctx, c].astype(np.float64) / (1 << PRECISION)
            models[key] = constriction.stream.model.Categorical(probs, perfect=False)
        return models[key]

    def _check(self, level: int, channels: int) -> None:
        if not 0 <= level < self.levels:
            raise ValueError(f"quality level index {level} out of range 0..{self.levels - 1}")
        if channels != self.channels:
            raise ValueError(f"latent has {channels} channels, the tables {self.channels}")

    def encode(self, ints: np.ndarray, level: int) -> bytes:
        """(L, h, w) integer latent -> bytes (the shape is not stored: the product holds it)."""
        import constriction

        self._check(level, ints.shape[0])
        L = ints.shape[0]
        sym = symbols(ints).reshape(L, -1)
        mag = _magnitude(sym)
        cum = np.cumsum(mag, 0) - mag
        enc = constriction.stream.queue.RangeEncoder()
        for c, part, layout in _walk(ints.shape):
            cells = layout.cells[part]
            ctx = _contexts(mag, cum[c], layout, c, part)
            s = sym[c, cells]
            for k in np.unique(ctx):
                enc.encode(s[ctx == k], self._model(level, int(k), c))
        escaped = ints.reshape(L, -1)[sym == ESC].astype(np.int64)
        if escaped.size:
            if escaped.min() < INT16[0] or escaped.max() > INT16[1]:
                raise ValueError("latent values must fit in int16")
            enc.encode((escaped - INT16[0]).astype(np.int32), constriction.stream.model.Uniform(1 << 16))
        return enc.get_compressed().astype("<u4").tobytes()

    def decode(self, stream: bytes, level: int, shape: tuple[int, int, int]) -> np.ndarray:
        """bytes -> (L, h, w) int16 latent."""
        import constriction

        self._check(level, shape[0])
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
                ctx = _contexts(mag, cum, layout, c, part)
                s = np.empty(cells.size, np.int32)
                for k in np.unique(ctx):
                    sel = ctx == k
                    s[sel] = dec.decode(self._model(level, int(k), c), int(sel.sum()))
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

    def bits(self, ints: np.ndarray, level: int) -> float:
        """Ideal code length in bits of one latent (what the range coder approaches)."""
        counts = context_counts(ints)
        p = self.freq[level].astype(np.float64) / (1 << PRECISION)
        esc = int((symbols(ints) == ESC).sum())
        return float(-(counts * np.log2(p)).sum() + 16 * esc)

    # -- storage ----------------------------------------------------------------------------
    def save(self, folder: Path, **extra: np.ndarray) -> Path:
        """The tables (and the model's ``extra`` arrays, e.g. its gains) in FILE_NAME."""
        path = Path(folder) / FILE_NAME
        np.savez_compressed(path, freq=self.freq, precision=np.array(PRECISION), escape=np.array(M), **extra)
        return path

    @classmethod
    def load(cls, folder: Path) -> "LatentCoder":
        with np.load(Path(folder) / FILE_NAME) as z:
            if int(z["precision"]) != PRECISION or int(z["escape"]) != M:
                raise ValueError(f"latent tables in {folder} were made for another coder layout")
            return cls(z["freq"])
