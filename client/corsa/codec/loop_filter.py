"""A block's loop filter: fitted by the encoder, stored with the block's refinement, applied by every reader.

The decoder network is trained on other places: on a scene unlike them it gets each band's contrast
and sharpness a little wrong, the same way across a block. The encoder knows the truth, so per block
and band it fits by least squares a small filter of the decoding: the differences of the 5 x 5
neighbours of the band to the pixel, every band's value at the pixel, and a bias
(``corsa_udf.loop_filter``, which every reader applies), stores its weights as integers (the
refinement stream's head, ``corsa.codec.refine_coder``), and computes the refinement's cells on the
filtered decoding. As a video codec's adaptive loop filter; here 350 integers a block of 512 px.

Stream of one block's filter: a varint, the count of integers that follow (0: the block is not
filtered, else 10 x ``corsa_udf.filter_taps``), then each as a zigzag varint.
"""
from __future__ import annotations

import numpy as np

import corsa_udf
from corsa.codec.latent_coder import StreamError

# The fit reads one latent cell (4 x 4 px) in SAMPLE x SAMPLE: a ninth of the pixels, every phase of the
# network's pixel shuffles among them (every other pixel would fit the even ones' behaviour only: -1.5 dB)
SAMPLE = 3
RIDGE = 1e-7    # of the normal equations' mean diagonal: a flat block's equations stay solvable


def fit(truth: np.ndarray, decoded: np.ndarray, rows: slice, cols: slice, valid: np.ndarray | None,
        radius: int) -> np.ndarray | None:
    """The loop filter's integer weights (10, taps) of a block, from its input ``truth`` (10, h, w) and a
    decoded window (10, H, W) in which the block is ``rows`` x ``cols`` (its neighbours around it as the
    readers decode them); None where too few of its pixels are ``valid`` to fit one."""
    offs = corsa_udf.filter_offsets(radius)
    taps = corsa_udf.filter_taps(radius)
    near = corsa_udf.neighbourhood(decoded, rows, cols, radius)
    h, w = truth.shape[1:]
    keep = (np.arange(h) // 4 % SAMPLE == 0)[:, None] & (np.arange(w) // 4 % SAMPLE == 0)[None]
    if valid is not None:
        keep &= valid
    y, x = np.nonzero(keep)
    if len(y) < 4 * taps:
        return None
    # Each band's neighbours gathered by flat index, in one step a band.
    width = near.shape[2]
    at = (y + radius) * width + x + radius
    shifts = np.array([dy * width + dx for dy, dx in offs])[:, None]
    flat = near.reshape(len(near), -1)
    own = flat[:, at].astype(np.float64)                                                    # (10, n)
    errors = truth[:, y, x].astype(np.float64) - own
    out = np.zeros((len(truth), taps), np.int64)
    a = np.empty((taps, len(y)))
    a[len(offs):-1], a[-1] = own, 1.0
    for b in range(len(truth)):
        np.subtract(flat[b][at + shifts], own[b], out=a[:len(offs)])
        g = a @ a.T
        g[np.diag_indices(taps)] += RIDGE * np.trace(g) / taps
        try:
            sol = np.linalg.solve(g, a @ errors[b])
        except np.linalg.LinAlgError:
            return None
        out[b, :-1] = np.rint(sol[:-1] * (1 << corsa_udf.FILTER_SHIFT))
        out[b, -1] = np.rint(sol[-1])
    return np.clip(out, 1 - corsa_udf.FILTER_LIMIT, corsa_udf.FILTER_LIMIT - 1)


def encode(weights: np.ndarray | None) -> bytes:
    """A block's filter (None: not filtered) -> its bytes."""
    if weights is None:
        return _varint(0)
    flat = weights.ravel().astype(np.int64)
    return _varint(flat.size) + b"".join(_varint(int(v) * 2 if v >= 0 else -int(v) * 2 - 1) for v in flat)


def decode(data: bytes, radius: int, bands: int) -> tuple[np.ndarray | None, int]:
    """A block's filter from the head of its refinement stream -> (weights or None, bytes read)."""
    pos, count = _read_varint(data, 0)
    if count == 0:
        return None, pos
    taps = corsa_udf.filter_taps(radius, bands)
    if count != bands * taps:
        raise StreamError(f"loop filter of {count} integers, not {bands * taps}")
    values = np.empty(count, np.int64)
    for i in range(count):
        pos, z = _read_varint(data, pos)
        values[i] = z >> 1 if not z & 1 else -((z + 1) >> 1)
    if np.abs(values).max() >= corsa_udf.FILTER_LIMIT:
        raise StreamError("loop filter weight out of range")
    return values.reshape(bands, taps), pos


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n, shift = 0, 0
    while True:
        if pos >= len(data):
            raise StreamError("loop filter ends early")
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return pos, n
        shift += 7
        if shift > 35:
            raise StreamError("loop filter integer too long")
