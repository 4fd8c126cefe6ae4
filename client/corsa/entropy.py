"""Lossless coding of the index maps: fixed-width bit packing, and context-model range coding.

The context model predicts each index from what the decoder already has, row by row, so a whole
row is coded in one vectorised call:
  level 1 (coarse grid): the index above it;
  level 0 (fine grid):   the index above it and the level-1 index of its parent cell.
Each context gives a smoothed conditional table counted on the training split's indices; the
tables are mixed linearly with the marginal, with weights chosen on the validation split. The
range coder is constriction's (exactly invertible fixed-point arithmetic).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"CRSE"
VERSION = 1
FILE_NAME = "entropy_model.npz"


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


def _up(idx: np.ndarray, none: int) -> np.ndarray:
    """The index above each position; ``none`` on the first row."""
    return np.vstack([np.full((1, idx.shape[1]), none, idx.dtype), idx[:-1]])


def _parent(idx1: np.ndarray, ratio: int = 2) -> np.ndarray:
    return np.repeat(np.repeat(idx1, ratio, 0), ratio, 1)


def _normalise(counts: np.ndarray, prior: np.ndarray, strength: float) -> np.ndarray:
    """Rows of counts smoothed toward ``prior`` with ``strength`` pseudo-counts."""
    return (counts + strength * prior) / (counts.sum(1, keepdims=True) + strength)


@dataclass
class EntropyModel:
    marg1: np.ndarray   # (K1,)
    up1: np.ndarray     # (K1 + 1, K1): P(s1 | index above; row K1 = none)
    marg0: np.ndarray   # (K0,)
    par0: np.ndarray    # (K1, K0): P(s0 | parent level-1 index)
    up0: np.ndarray     # (K0 + 1, K0): P(s0 | index above)
    w1: np.ndarray      # weights of (up1, marg1)
    w0: np.ndarray      # weights of (par0, up0, marg0)

    @property
    def k0(self) -> int:
        return self.marg0.size

    @property
    def k1(self) -> int:
        return self.marg1.size

    # -- fitting ------------------------------------------------------------------------
    @classmethod
    def fit(cls, train: list[tuple[np.ndarray, np.ndarray]], heldout: list[tuple[np.ndarray, np.ndarray]],
            k0: int, k1: int, strength: float = 4.0) -> "EntropyModel":
        c1 = np.zeros((k1 + 1, k1))
        c0p = np.zeros((k1, k0))
        c0u = np.zeros((k0 + 1, k0))
        for idx0, idx1 in train:
            np.add.at(c1, (_up(idx1, k1).ravel(), idx1.ravel()), 1)
            np.add.at(c0p, (_parent(idx1).ravel(), idx0.ravel()), 1)
            np.add.at(c0u, (_up(idx0, k0).ravel(), idx0.ravel()), 1)
        # Every symbol keeps some probability: a test image may use a code training never did.
        marg1 = (c1.sum(0) + 1) / (c1.sum() + k1)
        marg0 = (c0p.sum(0) + 1) / (c0p.sum() + k0)
        model = cls(marg1, _normalise(c1, marg1, strength), marg0, _normalise(c0p, marg0, strength),
                    _normalise(c0u, marg0, strength), np.array([0.5, 0.5]), np.array([0.4, 0.4, 0.2]))
        model._fit_weights(heldout)
        return model

    def _fit_weights(self, heldout: list[tuple[np.ndarray, np.ndarray]]) -> None:
        comps1 = [np.concatenate(x) for x in zip(*(self._components1(i1) for _, i1 in heldout))]
        comps0 = [np.concatenate(x) for x in zip(*(self._components0(i0, i1) for i0, i1 in heldout))]
        grid = np.linspace(0.0, 1.0, 21)
        best1 = min(grid[:-1], key=lambda a: -np.log(a * comps1[0] + (1 - a) * comps1[1]).sum())
        self.w1 = np.array([best1, 1 - best1])
        cands = [(a, b) for a in grid for b in grid if a + b < 1.0 - 1e-9]
        a, b = min(cands, key=lambda ab: -np.log(ab[0] * comps0[0] + ab[1] * comps0[1]
                                                  + (1 - ab[0] - ab[1]) * comps0[2]).sum())
        self.w0 = np.array([a, b, 1 - a - b])

    def _components1(self, idx1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = idx1.ravel()
        return self.up1[_up(idx1, self.k1).ravel(), s], self.marg1[s]

    def _components0(self, idx0: np.ndarray, idx1: np.ndarray) -> tuple[np.ndarray, ...]:
        s = idx0.ravel()
        return (self.par0[_parent(idx1).ravel(), s], self.up0[_up(idx0, self.k0).ravel(), s], self.marg0[s])

    def bits(self, idx0: np.ndarray, idx1: np.ndarray) -> float:
        """Ideal code length in bits (what the range coder approaches)."""
        c1, c0 = self._components1(idx1), self._components0(idx0, idx1)
        p1 = self.w1[0] * c1[0] + self.w1[1] * c1[1]
        p0 = self.w0[0] * c0[0] + self.w0[1] * c0[1] + self.w0[2] * c0[2]
        return float(-np.log2(p1).sum() - np.log2(p0).sum())

    # -- per-row probabilities: the same arithmetic on both sides ---------------------------
    def _probs1(self, up_row: np.ndarray) -> np.ndarray:
        return self.w1[0] * self.up1[up_row] + self.w1[1] * self.marg1[None, :]

    def _probs0(self, up_row: np.ndarray, parent_row: np.ndarray) -> np.ndarray:
        return (self.w0[0] * self.par0[parent_row] + self.w0[1] * self.up0[up_row]
                + self.w0[2] * self.marg0[None, :])

    # -- coding -----------------------------------------------------------------------------
    def encode(self, idx0: np.ndarray, idx1: np.ndarray) -> bytes:
        import constriction

        h0, w0 = idx0.shape
        if (h0, w0) != (2 * idx1.shape[0], 2 * idx1.shape[1]):
            raise ValueError(f"level-0 grid {idx0.shape} does not nest level-1 grid {idx1.shape}")
        model = constriction.stream.model.Categorical(perfect=False)
        enc = constriction.stream.queue.RangeEncoder()
        s1, s0 = idx1.astype(np.int32), idx0.astype(np.int32)
        up1, up0, par = _up(s1, self.k1), _up(s0, self.k0), _parent(s1)
        for r in range(s1.shape[0]):
            enc.encode(s1[r], model, self._probs1(up1[r]))
        for r in range(h0):
            enc.encode(s0[r], model, self._probs0(up0[r], par[r]))
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
        s1 = np.empty((h0 // 2, w0 // 2), np.int32)
        s0 = np.empty((h0, w0), np.int32)
        try:
            for r in range(s1.shape[0]):
                up = s1[r - 1] if r else np.full(s1.shape[1], self.k1)
                s1[r] = dec.decode(model, self._probs1(up))
            par = _parent(s1)
            for r in range(h0):
                up = s0[r - 1] if r else np.full(w0, self.k0)
                s0[r] = dec.decode(model, self._probs0(up, par[r]))
        except Exception as e:  # constriction reports corrupt data as assorted errors
            raise StreamError(f"index stream is corrupt: {e}") from e
        return s0.astype(np.uint16), s1.astype(np.uint16)

    # -- storage ----------------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        path = Path(folder) / FILE_NAME
        np.savez_compressed(path, **{k: getattr(self, k) for k in self.__dataclass_fields__})
        return path

    @classmethod
    def load(cls, folder: Path) -> "EntropyModel":
        with np.load(Path(folder) / FILE_NAME) as z:
            return cls(**{k: z[k] for k in cls.__dataclass_fields__})
