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

Channel map (the streams of product formats 5 and 6): a stream starts with u32 words holding b bits a
channel (little-endian, channel 0 first): 0 where the channel is not coded, because its integers are
all zero (at the default quality three quarters of a block's channels are, and the coder spent most
of its time on them); its symbols are zeros, as decoded ones would be, so every other channel's
contexts stay the same. b = 1 (1: coded) for plain tables. Class tables (``classes`` K > 1, a model
from ``training.fit_classes`` on): b = CLASS_BITS, value v >= 1 = coded with the tables of class v,
which the encoder picks as the class whose tables code the channel's symbols in the block in the
fewest bits (a forward-adaptive model: a calm sea block and a city block of the same channel get
different tables; the decoder reads the class, it never computes one). corsa3.8's and corsa3.9's
tables were fitted with each channel in the class of its share of nonzero integers (``class_counts``),
which is also how products were coded before the encoder searched the classes (issue 28, thirteenth
part); later ones by the encoder's own choice. Older streams have no map and code every channel
(``channel_map=False``).

Temporal tables (a series of one place, ``corsa.formats.series``): a cell may also see a reference, the
integer of the same cell and channel on an earlier date. Its value clipped to [-REF_RANGE,
REF_RANGE] is one more context dimension, bucket NO_REF meaning "no reference" (those tables are
the stand-alone ones). The reference is an integer the decoder has already decoded, so the tables
stay exactly the encoder's on any machine.
"""
from __future__ import annotations

import functools
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
# the code length of each frequency 1..2**PRECISION, in 1/2**16 bit (``LatentCoder.code_lengths``)
_LENGTHS = np.rint(-np.log2(np.arange(1, (1 << PRECISION) + 1, dtype=np.float64) / (1 << PRECISION)) * (1 << 16)).astype(np.int32)
FILE_NAME = "latent_model.npz"
TEMPORAL_FILE_NAME = "temporal_model.npz"
REF_RANGE = 3
NO_REF = 2 * REF_RANGE + 1     # the reference bucket of a cell without a reference
REF_BUCKETS = NO_REF + 1
INT16 = (-(1 << 15), (1 << 15) - 1)
MAP_WORD_BITS = 32
CLASS_BITS = 4               # bits a channel of a class coder's map: classes 1..15


class StreamError(ValueError):
    """A latent stream is truncated or corrupt."""


def _bucket_table(n: int) -> np.ndarray:
    """Bucket of an activity a: bit length of a, capped at n - 1 (integer, no float log). Every
    a >= 2**(n - 2) is in the last bucket, so the table stops there (``_bucket`` clips to it)."""
    return np.array([min(a.bit_length(), n - 1) for a in range((1 << (n - 2)) + 1)], np.uint16)


_ANCHOR = _bucket_table(ANCHOR_BUCKETS)
_SPATIAL = _bucket_table(SPATIAL_BUCKETS)
_CHANNEL = _bucket_table(CHANNEL_BUCKETS)


def _bucket(table: np.ndarray, activity: np.ndarray) -> np.ndarray:
    return table[np.minimum(activity, table.size - 1)]


def symbols(ints: np.ndarray) -> np.ndarray:
    """ints -> symbols 0..ALPHABET-1 (ESC for |v| > M)."""
    sym = np.clip(ints, -M, M).astype(np.int32) + M
    sym[(ints > M) | (ints < -M)] = ESC
    return sym


def map_words(channels: int, bits: int = 1) -> int:
    """u32 words of a stream's channel map of ``bits`` bits a channel."""
    return -(-channels * bits // MAP_WORD_BITS)


def _map(values: np.ndarray, bits: int) -> np.ndarray:
    """(L,) values < 2**bits -> the channel map's words."""
    flat = np.zeros(map_words(len(values), bits) * MAP_WORD_BITS, np.uint8)
    flat[:len(values) * bits] = ((values[:, None].astype(np.int64) >> np.arange(bits)) & 1).ravel()
    return np.packbits(flat, bitorder="little").view("<u4")


def _unmap(words: np.ndarray, channels: int, bits: int) -> np.ndarray:
    """The channel map's words -> (L,) values; a bit beyond the channels is a corrupt stream."""
    flat = np.unpackbits(words.astype("<u4").view(np.uint8), bitorder="little")
    if flat[channels * bits:].any():
        raise StreamError(f"the channel map names channels beyond the {channels} of the latent")
    return (flat[:channels * bits].reshape(channels, bits).astype(np.int64) << np.arange(bits)).sum(1)


def _magnitude(sym: np.ndarray) -> np.ndarray:
    """|value| as the contexts see it: escapes count as M + 1 (ESC - M), so contexts need no escaped
    value. int16: a cell's activity is at most L * (M + 1)."""
    return np.abs(sym - M).astype(np.int16)


class _Layout:
    """Anchor (part 0) / non-anchor (part 1) cells of a (h, w) grid; ``joined`` takes the two parts'
    (L, n0) and (L, n1) arrays side by side back to the grid's order."""

    def __init__(self, h: int, w: int):
        yy, xx = np.mgrid[0:h, 0:w]
        self.shape = (h, w)
        anchor = ((yy + xx) % 2 == 0).ravel()
        self.cells = (np.flatnonzero(anchor), np.flatnonzero(~anchor))
        self.joined = np.argsort(np.concatenate(self.cells))

    def parts(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.take(a, self.cells[0], 1), np.take(a, self.cells[1], 1)

    def grid(self, part0: np.ndarray, part1: np.ndarray) -> np.ndarray:
        return np.take(np.concatenate([part0, part1], 1), self.joined, 1)


@functools.lru_cache(maxsize=8)
def _layout(h: int, w: int) -> _Layout:
    return _Layout(h, w)


def _spatial_base(mag0: np.ndarray, layout: _Layout) -> np.ndarray:
    """(L, n1) context of each non-anchor before its channel activity, from the anchors' (L, n0)
    magnitudes: ANCHOR_BUCKETS + the bucket of its four anchor neighbours' sum * CHANNEL_BUCKETS."""
    m = layout.grid(mag0, np.zeros((len(mag0), layout.cells[1].size), mag0.dtype)).reshape(len(mag0), *layout.shape)
    s = np.zeros_like(m)
    s[:, 1:] += m[:, :-1]
    s[:, :-1] += m[:, 1:]
    s[:, :, 1:] += m[:, :, :-1]
    s[:, :, :-1] += m[:, :, 1:]
    spatial = np.take(s.reshape(len(m), layout.shape[0] * layout.shape[1]), layout.cells[1], 1)
    return ANCHOR_BUCKETS + _bucket(_SPATIAL, spatial) * CHANNEL_BUCKETS


def _part_ids(sym: np.ndarray, layout: _Layout, rb: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Table ids (L, n0) of the anchors and (L, n1) of the others, of every symbol (L, h*w): the
    context, and with a reference its bucket * CONTEXTS. Every channel at once: the encoder knows them all."""
    mag = _magnitude(sym)
    act = np.zeros_like(mag)                              # magnitudes of the channels before, per cell
    for c in range(1, len(mag)):
        np.add(act[c - 1], mag[c - 1], out=act[c])
    (mag0, _), (act0, act1) = layout.parts(mag), layout.parts(act)
    ids = (_bucket(_ANCHOR, act0), _spatial_base(mag0, layout) + _bucket(_CHANNEL, act1))
    return ids if rb is None else tuple(r * CONTEXTS + i for r, i in zip(layout.parts(rb), ids))


def reference_buckets(ref: np.ndarray | None, has_ref: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray | None:
    """(L, h*w) reference bucket of every cell: its reference clipped to +-REF_RANGE, or NO_REF
    where ``has_ref`` (h, w) is False; None without a reference."""
    if ref is None:
        return None
    if ref.shape != shape or has_ref is None or has_ref.shape != shape[1:]:
        raise ValueError(f"a reference of shape {ref.shape} (mask {getattr(has_ref, 'shape', None)}) for a latent of {shape}")
    rb = (np.clip(ref.reshape(shape[0], -1), -REF_RANGE, REF_RANGE) + REF_RANGE).astype(np.uint16)
    rb[:, ~has_ref.ravel()] = NO_REF
    return rb


def table_ids(ints: np.ndarray, ref: np.ndarray | None = None, has_ref: np.ndarray | None = None) -> np.ndarray:
    """(L, h*w) the table id each integer of a latent (L, h, w) is coded with (see ``reference_buckets``)."""
    layout = _layout(*ints.shape[1:])
    return layout.grid(*_part_ids(symbols(ints).reshape(ints.shape[0], -1), layout,
                                  reference_buckets(ref, has_ref, ints.shape)))


def context_counts(ints: np.ndarray, ref: np.ndarray | None = None, has_ref: np.ndarray | None = None) -> np.ndarray:
    """(tables, L, ALPHABET) symbol counts of one latent (L, h, w), as the coder sees them: CONTEXTS
    tables, or REF_BUCKETS * CONTEXTS with a reference (see ``reference_buckets``)."""
    L = ints.shape[0]
    n = CONTEXTS if ref is None else REF_BUCKETS * CONTEXTS
    ids = table_ids(ints, ref, has_ref).astype(np.intp)
    bins = (ids * L + np.arange(L)[:, None]) * ALPHABET + symbols(ints).reshape(L, -1)
    return np.bincount(bins.ravel(), minlength=n * L * ALPHABET).reshape(n, L, ALPHABET)


def channel_classes(sym: np.ndarray, edges: np.ndarray | None) -> np.ndarray:
    """(L,) the channel map's value of each channel of (L, n) symbols: 0 all zero (not coded), else
    its class: 1 with plain tables (``edges`` None), with class tables 1 + the number of edges at or
    below its share of nonzero symbols."""
    share = (sym != M).mean(1)
    if edges is None:
        return (share > 0).astype(np.int64)
    return np.where(share > 0, 1 + np.searchsorted(edges, share, side="right"), 0)


def class_offsets(values: np.ndarray) -> np.ndarray:
    """Where the tables of each channel's class start (map values as ``channel_classes``; a channel
    not coded at 0)."""
    return (np.maximum(values, 1) - 1) * CONTEXTS


def class_counts(ints: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(K, CONTEXTS, L, ALPHABET) symbol counts of one block's latent (L, h, w) by the class its
    channels are coded with (K = len(edges) + 1; channels all zero count nowhere)."""
    L = ints.shape[0]
    sym = symbols(ints).reshape(L, -1)
    cls = channel_classes(sym, np.asarray(edges, np.float64))
    ids = table_ids(ints).astype(np.intp) + class_offsets(cls)[:, None]
    bins = ((ids * L + np.arange(L)[:, None]) * ALPHABET + sym)[cls > 0]
    K = len(edges) + 1
    return np.bincount(bins.ravel(), minlength=K * CONTEXTS * L * ALPHABET).reshape(K, CONTEXTS, L, ALPHABET)


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
    CONTEXTS tables (stand-alone), REF_BUCKETS * CONTEXTS (temporal: with a reference), or with
    ``classes`` K > 1 K * CONTEXTS (class k's tables at (k - 1) * CONTEXTS)."""

    freq: np.ndarray         # (levels, tables, L, ALPHABET) uint32
    classes: int = 1         # table classes a channel of a block may be coded with (1: plain tables)

    def __post_init__(self):
        if not 1 <= self.classes < 1 << CLASS_BITS:
            raise ValueError(f"a coder has 1 to {(1 << CLASS_BITS) - 1} table classes, not {self.classes}")
        tables = (CONTEXTS, REF_BUCKETS * CONTEXTS) if self.classes == 1 else (self.classes * CONTEXTS,)
        if self.freq.ndim != 4 or self.freq.shape[1] not in tables or self.freq.shape[3] != ALPHABET:
            raise ValueError(f"latent tables of shape {self.freq.shape} do not fit this coder")
        self._models: dict[int, list] = {}
        self._code_lengths: dict[int, np.ndarray] = {}
        self._checked: set[int] = set()

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
        return self.classes == 1 and self.freq.shape[1] != CONTEXTS

    @classmethod
    def classes_from_counts(cls, counts: np.ndarray, plain: "LatentCoder", smoothing: float = 16.0) -> "LatentCoder":
        """Class tables from (levels, K, CONTEXTS, L, ALPHABET) counts (``class_counts``): rare
        contexts lean on ``plain``'s table of the same context."""
        if plain.temporal or plain.classes != 1 or counts.shape[2] != CONTEXTS:
            raise ValueError("class tables are fitted on class counts, next to plain stand-alone tables")
        prior = np.broadcast_to(plain.freq[:, None].astype(np.float64) / (1 << PRECISION), counts.shape)
        freq = quantise_tables(counts, prior, smoothing)
        return cls(freq.reshape(freq.shape[0], -1, *freq.shape[3:]), counts.shape[1])

    def _model(self, level: int, ctx: int, c: int):
        models = self._models.get(level)
        if models is None:          # setdefault: two threads starting a level share one list
            models = self._models.setdefault(level, [None] * (self.freq.shape[1] * self.channels))
        key = ctx * self.channels + c
        if models[key] is None:
            import constriction

            # Exact dyadic probabilities (integers / 2**16): the same floats on every machine.
            probs = self.freq[level, ctx, c].astype(np.float64) / (1 << PRECISION)
            models[key] = constriction.stream.model.Categorical(probs, perfect=False)
        return models[key]

    def _check(self, level: int, shape: tuple[int, int, int], ref: np.ndarray | None,
               has_ref: np.ndarray | None, channel_map: bool = True) -> np.ndarray | None:
        if not channel_map and self.classes > 1:
            raise ValueError("class tables code streams with a channel map (formats 5 and 6)")
        if not 0 <= level < self.levels:
            raise ValueError(f"quality level index {level} out of range 0..{self.levels - 1}")
        if level not in self._checked:
            # a level's tables checked when first coded with, not all at loading: a process codes one or
            # two levels, and checking all 9 took 0.13 s of every command's start
            freq = self.freq[level]
            if np.any(freq == 0) or np.any(freq.sum(-1, dtype=np.int64) != 1 << PRECISION):
                raise ValueError(f"latent tables must be non-zero and sum to 2**{PRECISION}")
            self._checked.add(level)
        if shape[0] != self.channels:
            raise ValueError(f"latent has {shape[0]} channels, the tables {self.channels}")
        if (ref is not None) != self.temporal:
            raise ValueError("temporal tables code a latent with a reference, stand-alone tables without one")
        return reference_buckets(ref, has_ref, shape)

    @property
    def map_bits(self) -> int:
        return 1 if self.classes == 1 else CLASS_BITS

    def code_lengths(self, level: int) -> np.ndarray:
        """(tables, L, ALPHABET) code lengths of a level's tables in 1/2**16 bit, as integers: their sums
        are exact, so the encoder's choices are the same on every machine."""
        lengths = self._code_lengths.get(level)
        if lengths is None:
            # every frequency is one of 1..2**PRECISION: the lengths of those, looked up (a level's 3 million
            # logarithms took 0.07-0.17 s in each compress)
            lengths = self._code_lengths.setdefault(level, _LENGTHS[self.freq[level] - 1])
        return lengths

    def best_classes(self, sym: np.ndarray, chans: np.ndarray, ids: np.ndarray, level: int) -> np.ndarray:
        """(n,) for the symbols (n, h*w) of channels ``chans`` and their context table ids (n, h*w),
        each one's class (1..K) whose tables code it in the fewest bits: the class tables' channel map
        (the encoder's choice, which the decoder reads)."""
        n = len(chans)
        counts = np.bincount(((np.arange(n)[:, None] * CONTEXTS + ids) * ALPHABET + sym).ravel(),
                             minlength=n * CONTEXTS * ALPHABET).reshape(n, 1, CONTEXTS * ALPHABET)
        lengths = self.code_lengths(level).reshape(self.classes, CONTEXTS, self.channels, ALPHABET)[:, :, chans]
        per_class = lengths.transpose(2, 0, 1, 3).reshape(n, self.classes, CONTEXTS * ALPHABET)
        return 1 + np.argmin((counts * per_class).sum(2), 1)

    def encode(self, ints: np.ndarray, level: int, ref: np.ndarray | None = None,
               has_ref: np.ndarray | None = None, channel_map: bool = True) -> bytes:
        """(L, h, w) integer latent -> bytes (the shape is not stored: the product holds it). Temporal
        tables take ``ref`` (L, h, w), the reference integers, valid where ``has_ref`` (h, w).
        ``channel_map``: all-zero channels left out (the layout of formats 5 and 6, see above)."""
        import constriction

        rb = self._check(level, ints.shape, ref, has_ref, channel_map)
        L = ints.shape[0]
        layout = _layout(*ints.shape[1:])
        sym = symbols(ints).reshape(L, -1)
        values = channel_classes(sym, None) if channel_map else np.ones(L, np.int64)
        # the coded channels only: a left-out one adds nothing to the others' contexts
        chans = np.flatnonzero(values)
        part_ids = _part_ids(sym[chans], layout, None if rb is None else rb[chans])
        if channel_map and self.classes > 1 and len(chans):
            values[chans] = self.best_classes(sym[chans], chans, layout.grid(*part_ids), level)
        offsets = class_offsets(values[chans]).tolist()
        enc = constriction.stream.queue.RangeEncoder()
        for ids, syms in zip(part_ids, layout.parts(sym[chans])):
            for j, c in enumerate(chans.tolist()):
                # the step's order: by table, stably (positions ascending within a table)
                counts = np.bincount(ids[j])
                stops = np.cumsum(counts)
                ordered = syms[j][np.argsort(ids[j], kind="stable")]
                for k in np.flatnonzero(counts).tolist():
                    enc.encode(ordered[stops[k] - counts[k]:stops[k]], self._model(level, offsets[j] + k, c))
        escaped = ints.reshape(L, -1)[sym == ESC].astype(np.int64)
        if escaped.size:
            if escaped.min() < INT16[0] or escaped.max() > INT16[1]:
                raise ValueError("latent values must fit in int16")
            enc.encode((escaped - INT16[0]).astype(np.int32), constriction.stream.model.Uniform(1 << 16))
        words = enc.get_compressed().astype("<u4")
        return (np.concatenate([_map(values, self.map_bits), words]) if channel_map else words).tobytes()

    def _decode_part(self, dec, level: int, base: np.ndarray, buckets: np.ndarray, chans: list[int],
                     offsets: list[int]) -> np.ndarray:
        """(len(chans), n) symbols of one part, channel by channel: table id = ``base`` + the bucket of
        the activity of the channels decoded before at the cell (+ the channel's class offset)."""
        out = np.empty(base.shape, np.int32)
        act = np.zeros(base.shape[1], np.int16)
        bucket = np.zeros(base.shape[1], np.uint16)       # of act; most symbols are 0 and change neither
        for j, c in enumerate(chans):
            ids = base[j] + bucket + offsets[j]
            counts = np.bincount(ids)
            used = np.flatnonzero(counts)
            if used.size == 1:
                out[j] = dec.decode(self._model(level, int(used[0]), c), ids.size)
            elif used.size:
                out[j, np.argsort(ids, kind="stable")] = np.concatenate(
                    [dec.decode(self._model(level, k, c), n) for k, n in zip(used.tolist(), counts[used].tolist())])
            moved = np.flatnonzero(out[j] != M)
            act[moved] += _magnitude(out[j, moved])
            bucket[moved] = _bucket(buckets, act[moved])
        return out

    def decode(self, stream: bytes, level: int, shape: tuple[int, int, int], ref: np.ndarray | None = None,
               has_ref: np.ndarray | None = None, channel_map: bool = True) -> np.ndarray:
        """bytes -> (L, h, w) int16 latent (with the reference it was coded with, if any);
        ``channel_map``: as the stream was encoded."""
        import constriction

        rb = self._check(level, shape, ref, has_ref, channel_map)
        if len(stream) % 4:
            raise StreamError("latent stream length is not a whole number of 32-bit words")
        L, h, w = shape
        words = np.frombuffer(stream, "<u4")
        n = map_words(L, self.map_bits) if channel_map else 0
        if words.size < n:
            raise StreamError("latent stream is shorter than its channel map")
        values = _unmap(words[:n], L, self.map_bits) if channel_map else np.ones(L, np.int64)
        if values.max(initial=0) > self.classes:
            raise StreamError(f"the channel map names table class {values.max()}, the model has {self.classes}")
        chans = np.flatnonzero(values)
        offsets = class_offsets(values[chans]).tolist()
        layout = _layout(h, w)
        base = [np.zeros((chans.size, cells.size), np.uint16) for cells in layout.cells] if rb is None \
            else layout.parts(rb[chans] * CONTEXTS)
        dec = constriction.stream.queue.RangeDecoder(words[n:].astype(np.uint32))
        try:
            anchors = self._decode_part(dec, level, base[0], _ANCHOR, chans.tolist(), offsets)
            others = self._decode_part(dec, level, base[1] + _spatial_base(_magnitude(anchors), layout), _CHANNEL,
                                       chans.tolist(), offsets)
            sym = layout.grid(anchors, others)
            ints = np.zeros((L, h * w), np.int16)
            ints[chans] = sym - M
            rows, cells = np.nonzero(sym == ESC)
            if rows.size:
                ints[chans[rows], cells] = dec.decode(constriction.stream.model.Uniform(1 << 16), rows.size) + INT16[0]
        except Exception as e:  # constriction reports corrupt data as assorted errors
            raise StreamError(f"latent stream is corrupt: {e}") from e
        return ints.reshape(shape)

    def cell_bits(self, ints: np.ndarray, level: int, ref: np.ndarray | None = None,
                  has_ref: np.ndarray | None = None) -> np.ndarray:
        """(h, w) ideal code length in bits of each cell (escapes at 16 bit more): every channel with
        plain tables (the map's leaving out of all-zero channels is not counted), the coded ones with
        class tables."""
        rb = self._check(level, ints.shape, ref, has_ref)
        L = ints.shape[0]
        logp = -np.log2(self.freq[level].astype(np.float64) / (1 << PRECISION))
        sym = symbols(ints).reshape(L, -1)
        layout = _layout(*ints.shape[1:])
        ids = layout.grid(*_part_ids(sym, layout, rb))
        cls = channel_classes(sym, None)
        chans = np.flatnonzero(cls)
        if self.classes > 1 and len(chans):
            cls[chans] = self.best_classes(sym[chans], chans, ids[chans], level)
        ids = ids + class_offsets(cls)[:, None]
        bits = (logp[ids, np.arange(L)[:, None], sym] + 16 * (sym == ESC)) * (cls > 0)[:, None]
        return bits.sum(0).reshape(ints.shape[1:])

    def bits(self, ints: np.ndarray, level: int, ref: np.ndarray | None = None,
             has_ref: np.ndarray | None = None) -> float:
        """Ideal code length in bits of one latent (what the range coder approaches)."""
        return float(self.cell_bits(ints, level, ref, has_ref).sum())

    # -- storage ----------------------------------------------------------------------------
    def save(self, folder: Path, name: str = FILE_NAME, **extra: np.ndarray) -> Path:
        """The tables (and the model's ``extra`` arrays, e.g. its gains) in ``name``."""
        path = Path(folder) / name
        if self.classes > 1:
            extra = {**extra, "classes": np.array(self.classes)}
        np.savez_compressed(path, freq=self.freq, precision=np.array(PRECISION), escape=np.array(M), **extra)
        return path

    @classmethod
    def load(cls, folder: Path, name: str = FILE_NAME) -> "LatentCoder":
        with np.load(Path(folder) / name) as z:
            if int(z["precision"]) != PRECISION or int(z["escape"]) != M:
                raise ValueError(f"latent tables in {folder} were made for another coder layout")
            # corsa3.8 and corsa3.9 store the shares their classes were fitted by (K - 1 edges)
            classes = int(z["classes"]) if "classes" in z else z["class_edges"].size + 1 if "class_edges" in z else 1
            return cls(z["freq"], classes)
