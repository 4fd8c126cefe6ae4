"""Lossless coding of the index maps: fixed-width bit packing, and context-model range coding.

Level 1 (coarse grid) is coded first, then level 0. Each row is coded in two passes, even columns
then odd columns, so every pass is one vectorised call and still sees rich context:
  even columns: the row above (up, up-left, up-right)
  odd columns:  the index above and both neighbours in the row (left, right: even columns)
  level 0 also: the level-1 index of its parent cell.
Each context gives a smoothed conditional table counted on the training split's indices; per
level and parity the tables and the marginal are mixed linearly, with weights fitted (EM) on the
validation split. The range coder is constriction's (exactly invertible fixed-point arithmetic).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"CRSE"
VERSION = 2
FILE_NAME = "entropy_model.npz"
CONTEXTS = {0: ("up", "ul", "ur"), 1: ("up", "l", "r")}   # by column parity
SMOOTHING = 4.0                                             # pseudo-counts toward the marginal


class StreamError(ValueError):
    """An entropy-coded stream is truncated, corrupt or of another format."""


def pack_fixed(idx0: np.ndarray, idx1: np.ndarray, k0: int, k1: int) -> bytes:
    """Both maps at ceil(log2 K) bits per index, as CORSA stores them."""
    bits = []
    for idx, k in ((idx1, k1), (idx0, k0)):
        width = int(np.ceil(np.log2(k)))
        shifts = np.arange(width - 1, -1, -1, dtype=np.uint32)
        bits.append(((idx.ravel()[:, None].astype(np.uint32) >> shifts) & 1).astype(np.uint8).ravel())
    return np.packbits(np.concatenate(bits)).tobytes()


def _row_contexts(prev: np.ndarray | None, cur: np.ndarray, parity: int, none: int) -> dict[str, np.ndarray]:
    """Contexts of the columns of one parity in a row: from the row above (``prev``, None on the
    first row) and, for odd columns, from the even columns of the row itself (``cur``)."""
    w = cur.shape[0]
    cols = np.arange(parity, w, 2)

    def take(row: np.ndarray | None, c: np.ndarray) -> np.ndarray:
        out = np.full(c.shape, none, np.int64)
        ok = (c >= 0) & (c < w)
        if row is not None:
            out[ok] = row[c[ok]]
        return out

    ctx = {"up": take(prev, cols)}
    if parity == 0:
        ctx["ul"], ctx["ur"] = take(prev, cols - 1), take(prev, cols + 1)
    else:
        ctx["l"], ctx["r"] = take(cur, cols - 1), take(cur, cols + 1)
    return ctx


def _rows(idx: np.ndarray, parent: np.ndarray | None, none: int):
    """(row, parity, symbols, contexts) for every pass over a whole map, in coding order."""
    for r in range(idx.shape[0]):
        prev = idx[r - 1] if r else None
        for parity in (0, 1):
            ctx = _row_contexts(prev, idx[r], parity, none)
            if parent is not None:
                ctx["par"] = parent[r // 2][np.arange(parity, idx.shape[1], 2) // 2].astype(np.int64)
            yield r, parity, idx[r, parity::2].astype(np.int64), ctx


@dataclass
class EntropyModel:
    k0: int
    k1: int
    marg: dict[int, np.ndarray] = field(default_factory=dict)                 # level -> (K,)
    tables: dict[tuple[int, int, str], np.ndarray] = field(default_factory=dict)  # (level, parity, ctx) -> (C, K)
    weights: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)      # (level, parity) -> (n ctx + 1,)

    def _k(self, level: int) -> int:
        return self.k0 if level == 0 else self.k1

    def _names(self, level: int, parity: int) -> tuple[str, ...]:
        return CONTEXTS[parity] + (("par",) if level == 0 else ())

    def _passes(self, level: int, idx0: np.ndarray, idx1: np.ndarray):
        if level == 1:
            return _rows(idx1, None, self.k1)
        return _rows(idx0, idx1, self.k0)

    # -- fitting ------------------------------------------------------------------------
    @classmethod
    def fit(cls, train: list[tuple[np.ndarray, np.ndarray]], heldout: list[tuple[np.ndarray, np.ndarray]],
            k0: int, k1: int) -> "EntropyModel":
        model = cls(k0, k1)
        counts: dict[tuple[int, int, str], np.ndarray] = {}
        for level in (1, 0):
            k = model._k(level)
            for parity in (0, 1):
                for name in model._names(level, parity):
                    counts[(level, parity, name)] = np.zeros((k1 if name == "par" else k + 1, k))
            for idx0, idx1 in train:
                for _, parity, sym, ctx in model._passes(level, idx0, idx1):
                    for name, c in ctx.items():
                        np.add.at(counts[(level, parity, name)], (c, sym), 1)
            total = sum(counts[(level, p, "up")].sum(0) for p in (0, 1))
            # Every symbol keeps some probability: a test image may use a code training never did.
            model.marg[level] = (total + 1) / (total.sum() + k)
            for parity in (0, 1):
                for name in model._names(level, parity):
                    c = counts[(level, parity, name)]
                    model.tables[(level, parity, name)] = (c + SMOOTHING * model.marg[level]) / \
                        (c.sum(1, keepdims=True) + SMOOTHING)
                model.weights[(level, parity)] = model._fit_weights(level, parity, heldout)
        return model

    def _components(self, level: int, parity: int, sym: np.ndarray, ctx: dict) -> np.ndarray:
        cols = [self.tables[(level, parity, n)][ctx[n], sym] for n in self._names(level, parity)]
        return np.stack(cols + [self.marg[level][sym]], 1)

    def _fit_weights(self, level: int, parity: int, heldout: list) -> np.ndarray:
        comps = np.concatenate([self._components(level, p, sym, ctx) for i0, i1 in heldout
                                for _, p, sym, ctx in self._passes(level, i0, i1) if p == parity])
        w = np.full(comps.shape[1], 1.0 / comps.shape[1])
        for _ in range(100):  # EM for the weights of a mixture of fixed components
            resp = comps * w
            w = (resp / resp.sum(1, keepdims=True)).mean(0)
        return w

    def _probs(self, level: int, parity: int, ctx: dict) -> np.ndarray:
        w = self.weights[(level, parity)]
        p = w[-1] * self.marg[level][None, :]
        for wi, name in zip(w, self._names(level, parity)):
            p = p + wi * self.tables[(level, parity, name)][ctx[name]]
        return p

    def bits(self, idx0: np.ndarray, idx1: np.ndarray) -> float:
        """Ideal code length in bits (what the range coder approaches)."""
        total = 0.0
        for level in (1, 0):
            for _, parity, sym, ctx in self._passes(level, idx0, idx1):
                total -= np.log2(self._components(level, parity, sym, ctx) @ self.weights[(level, parity)]).sum()
        return float(total)

    # -- coding -----------------------------------------------------------------------------
    def encode(self, idx0: np.ndarray, idx1: np.ndarray) -> bytes:
        import constriction

        h0, w0 = idx0.shape
        if (h0, w0) != (2 * idx1.shape[0], 2 * idx1.shape[1]):
            raise ValueError(f"level-0 grid {idx0.shape} does not nest level-1 grid {idx1.shape}")
        model = constriction.stream.model.Categorical(perfect=False)
        enc = constriction.stream.queue.RangeEncoder()
        for level in (1, 0):
            for _, parity, sym, ctx in self._passes(level, idx0, idx1):
                enc.encode(sym.astype(np.int32), model, self._probs(level, parity, ctx))
        words = enc.get_compressed()
        return MAGIC + struct.pack("<BII", VERSION, h0, w0) + words.astype("<u4").tobytes()

    def decode(self, stream: bytes, shape0: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        import constriction

        head = len(MAGIC) + struct.calcsize("<BII")
        if len(stream) < head or stream[:4] != MAGIC:
            raise StreamError("not a corsa index stream (bad magic or too short)")
        version, h0, w0 = struct.unpack("<BII", stream[4:head])
        if version != VERSION:
            raise StreamError(f"index stream version {version}, this reader knows {VERSION}")
        if shape0 is not None and (h0, w0) != tuple(shape0):
            raise StreamError(f"index stream holds a {h0}x{w0} grid, expected {tuple(shape0)}")
        if h0 % 2 or w0 % 2 or (len(stream) - head) % 4:
            raise StreamError("index stream header or length is inconsistent")
        words = np.frombuffer(stream[head:], dtype="<u4").astype(np.uint32)
        model = constriction.stream.model.Categorical(perfect=False)
        dec = constriction.stream.queue.RangeDecoder(words)
        idx1 = np.zeros((h0 // 2, w0 // 2), np.int64)
        idx0 = np.zeros((h0, w0), np.int64)
        try:
            for level, idx, parent, none in ((1, idx1, None, self.k1), (0, idx0, idx1, self.k0)):
                for r in range(idx.shape[0]):
                    for parity in (0, 1):
                        ctx = _row_contexts(idx[r - 1] if r else None, idx[r], parity, none)
                        if parent is not None:
                            ctx["par"] = parent[r // 2][np.arange(parity, idx.shape[1], 2) // 2]
                        idx[r, parity::2] = dec.decode(model, self._probs(level, parity, ctx))
        except Exception as e:  # constriction reports corrupt data as assorted errors
            raise StreamError(f"index stream is corrupt: {e}") from e
        return idx0.astype(np.uint16), idx1.astype(np.uint16)

    # -- storage ----------------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        path = Path(folder) / FILE_NAME
        arrays = {"k": np.array([self.k0, self.k1])}
        arrays |= {f"marg_{lv}": m for lv, m in self.marg.items()}
        # float32 halves the file; coder and decoder both use the stored values, so they agree.
        arrays |= {f"table_{lv}_{p}_{n}": t.astype(np.float32) for (lv, p, n), t in self.tables.items()}
        arrays |= {f"weights_{lv}_{p}": w for (lv, p), w in self.weights.items()}
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, folder: Path) -> "EntropyModel":
        with np.load(Path(folder) / FILE_NAME) as z:
            model = cls(int(z["k"][0]), int(z["k"][1]))
            for key in z.files:
                kind, *rest = key.split("_")
                if kind == "marg":
                    model.marg[int(rest[0])] = z[key]
                elif kind == "table":
                    model.tables[(int(rest[0]), int(rest[1]), rest[2])] = z[key]
                elif kind == "weights":
                    model.weights[(int(rest[0]), int(rest[1]))] = z[key]
        return model
