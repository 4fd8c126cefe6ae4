"""A block's loop filter: fitted by the encoder, stored with the block's refinement, applied by every reader.
Its fit and its application are ``corsa_udf.filter_fit`` and ``corsa_udf.loop_filter`` (the services run
them); here its bytes.

The decoder network is trained on other places: on a scene unlike them it gets each band's contrast
and sharpness a little wrong, the same way across a block. The encoder knows the truth, so per block
and band it fits by least squares a small filter of the decoding: the differences of the 5 x 5
neighbours of the band to the pixel, with a model's ``cross`` those of every band's 4 nearest
neighbours (the 10 m bands' edges sharpen the 20 m ones), every band's value at the pixel, and a bias
(``corsa_udf.loop_filter``, which every reader applies), stores its weights as integers (the
refinement stream's head, ``corsa.codec.refine_coder``), and computes the refinement's cells on the
filtered decoding. As a video codec's adaptive loop filter (and its cross-component filter): 350
integers a block of 512 px (corsa3.11), 710 with every band's neighbours (corsa3.12), whose encoder
weighs them against their bits and may store the own neighbours' 350 or none.

Stream of one block's filter: a varint, the count of integers that follow (0: the block is not
filtered, else 10 x ``corsa_udf.filter_taps``, or for a filter of every band's neighbours whose block
weighs only its own, 10 x the ``corsa_udf.own_taps`` of a band), then each as a zigzag varint.
"""
from __future__ import annotations

import numpy as np

import corsa_udf
from corsa.codec.latent_coder import StreamError


def encode(weights: np.ndarray | None, shape: corsa_udf.FilterShape) -> bytes:
    """A block's filter (None: not filtered) of a model's filter ``shape`` -> its bytes."""
    if weights is None:
        return varint(0)
    flat = weights.ravel().astype(np.int64)
    if shape.cross:
        own = corsa_udf.own_mask(shape, len(weights))
        if not weights[~own].any():
            flat = weights[own].astype(np.int64)
    return varint(flat.size) + b"".join(varint(int(v) * 2 if v >= 0 else -int(v) * 2 - 1) for v in flat)


def decode(data: bytes, shape: corsa_udf.FilterShape, bands: int) -> tuple[np.ndarray | None, int]:
    """A block's filter from the head of its refinement stream -> (weights or None, bytes read)."""
    pos, count = read_varint(data, 0)
    if count == 0:
        return None, pos
    taps = corsa_udf.filter_taps(shape, bands)
    own = corsa_udf.own_mask(shape, bands) if shape.cross else None
    if count != bands * taps and (own is None or count != own.sum()):
        raise StreamError(f"loop filter of {count} integers, not {bands * taps}"
                          + (f" or {own.sum()}" if own is not None else ""))
    values = np.empty(count, np.int64)
    for i in range(count):
        pos, z = read_varint(data, pos)
        values[i] = z >> 1 if not z & 1 else -((z + 1) >> 1)
    if np.abs(values).max() >= corsa_udf.FILTER_LIMIT:
        raise StreamError("loop filter weight out of range")
    if count == bands * taps:
        return values.reshape(bands, taps), pos
    weights = np.zeros((bands, taps), np.int64)
    weights[own] = values
    return weights, pos


def varint(n: int) -> bytes:
    """``n`` >= 0 as LEB128 (the residual layer's lengths too)."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def read_varint(data: bytes, pos: int, what: str = "loop filter") -> tuple[int, int]:
    """(position after it, value) of the LEB128 integer at ``pos``; ``what``: the stream errors name."""
    n, shift = 0, 0
    while True:
        if pos >= len(data):
            raise StreamError(f"{what} ends early")
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return pos, n
        shift += 7
        if shift > 35:
            raise StreamError(f"{what}: an integer too long")
