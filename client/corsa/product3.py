"""Product format version 3: the entropy-coded stream of a variable-rate model, one file a date.

    <folder>/corsa_<date>.corsa

A file is a small binary header, the latent's blocks (each an independent stream of
``corsa.latent_coder``, so a block can be decoded alone), the nodata mask when the input had
nodata, and a CRC-32 of everything before it. The header is about 100 bytes plus the CRS text:
on a 160 px scene at CF 30 (9 kB) that is about 1%, where the two GeoTIFF headers of format 2 cost
several kB. All integers little-endian:

    magic      b"CRS" + version byte (3)
    u16        header length (bytes that follow up to the payload)
    u8         quality level       u8  flags (1: nodata mask, 2: georeferenced)
    u8 + str   model id            8 bytes: start of the decoder's sha256
    u32 u32    input height, width (10 m pixels)
    u16        block side (latent cells)
    6 x f64    transform (if georeferenced)
    u16 + str  CRS (EPSG:n or WKT; empty: none)
    u8 + str   date (YYYY-MM-DD or "undated")
    varints    byte length of each block stream (row-major), then of the mask
    payload    block streams, mask (zlib of packbits, 10 m grid)
    u32        CRC-32 of all bytes before it

Format 1 and 2 products (GeoTIFF index grids of codebook models) are read by ``corsa.product``.
Files are written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.transform import Affine

from .latent_coder import StreamError

VERSION = 3
MAGIC = b"CRS" + bytes([VERSION])
SUFFIX = ".corsa"
BLOCK = 128                    # latent cells per block side: 512 px at 40 m cells
HAS_MASK, GEOREFERENCED = 1, 2
MAX_INPUT_PIXELS = 1 << 30     # as format 2: a corrupt header must not make us allocate without bound


class ProductError(ValueError):
    """A product file is missing, truncated, corrupt or inconsistent."""


@dataclass
class StreamDate:
    """One date of a format-3 product, decoded down to the stored integers."""

    date: str
    quality: int
    ints: np.ndarray               # (L, ceil(H/4), ceil(W/4)) int16
    nodata: np.ndarray | None      # True where the input was nodata, on the input grid
    shape: tuple[int, int]
    transform: Affine | None
    crs: str | None
    model_id: str
    model_sha256_prefix: str       # hex, 16 characters


def file_name(date: str) -> str:
    return f"corsa_{date}{SUFFIX}"


def dates_in(folder: Path) -> list[str]:
    return sorted(p.name[len("corsa_"):-len(SUFFIX)] for p in Path(folder).glob(f"corsa_*{SUFFIX}"))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def block_slices(cells: tuple[int, int], block: int = BLOCK) -> list[tuple[slice, slice]]:
    """The blocks of a latent grid, row-major: the order their streams have in a file."""
    return [(slice(y, min(y + block, cells[0])), slice(x, min(x + block, cells[1])))
            for y in range(0, cells[0], block) for x in range(0, cells[1], block)]


def latent_cells(shape: tuple[int, int]) -> tuple[int, int]:
    """The latent grid (4 px cells) covering an input grid."""
    return -(-shape[0] // 4), -(-shape[1] // 4)


def assemble(streams: list[bytes], nodata: np.ndarray, quality: int, transform: Affine | None, crs: str | None,
             date: str, model_id: str, model_sha256: str, block: int = BLOCK) -> bytes:
    """The bytes of one date's file from its block streams (in ``block_slices`` order) and the
    nodata mask on the input grid (True = nodata), whose shape the file records."""
    shape = nodata.shape
    if len(streams) != len(block_slices(latent_cells(shape), block)):
        raise ValueError(f"{len(streams)} block streams for an input grid of {shape} in blocks of {block} cells")
    mask = zlib.compress(np.packbits(nodata).tobytes(), 9) if nodata.any() else b""
    ident, crs_text, label = model_id.encode(), (crs or "").encode(), date.encode()
    flags = (HAS_MASK if mask else 0) | (GEOREFERENCED if transform is not None else 0)
    head = struct.pack("<BBB", quality, flags, len(ident)) + ident + bytes.fromhex(model_sha256[:16])
    head += struct.pack("<IIH", shape[0], shape[1], block)
    if transform is not None:
        head += struct.pack("<6d", *list(transform)[:6])
    head += struct.pack("<H", len(crs_text)) + crs_text + struct.pack("<B", len(label)) + label
    head += b"".join(_varint(len(s)) for s in streams) + (_varint(len(mask)) if mask else b"")
    body = MAGIC + struct.pack("<H", len(head)) + head + b"".join(streams) + mask
    return body + struct.pack("<I", zlib.crc32(body))


def encode_date(coder, ints: np.ndarray, level: int, quality: int, nodata: np.ndarray,
                transform: Affine | None, crs: str | None, date: str, model_id: str, model_sha256: str,
                block: int = BLOCK) -> bytes:
    """The bytes of one date's file from its whole latent. ``coder`` is the model's LatentCoder,
    ``level`` the index of ``quality`` in its tables."""
    if ints.shape[1:] != latent_cells(nodata.shape):
        raise ValueError(f"latent grid {ints.shape[1:]} does not cover the input grid {nodata.shape} in 4 px cells")
    streams = [coder.encode(ints[:, ys, xs], level) for ys, xs in block_slices(ints.shape[1:], block)]
    return assemble(streams, nodata, quality, transform, crs, date, model_id, model_sha256, block)


def write_date(folder: Path, data: bytes, date: str) -> Path:
    """Write one date's bytes under a temporary name, then rename: a .corsa file is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / file_name(date)
    part = final.with_name(final.name + ".part")
    try:
        part.write_bytes(data)
        part.replace(final)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return final


class _Reader:
    def __init__(self, data: bytes, name: str):
        self.data, self.pos, self.name = data, 0, name

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProductError(f"{self.name} is truncated (header or payload ends early)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def varint(self) -> int:
        n, shift = 0, 0
        while True:
            (byte,) = self.unpack("<B")
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise ProductError(f"{self.name}: a length field is corrupt")


def read_header(data: bytes, name: str) -> dict:
    """The header fields and the payload's stream lengths, checked against the file's CRC-32."""
    if len(data) < len(MAGIC) + 6 or data[:3] != MAGIC[:3]:
        raise ProductError(f"{name} is not a corsa stream product (bad magic)")
    if data[3] != VERSION:
        raise ProductError(f"{name} has stream format version {data[3]}, this reader knows {VERSION}")
    if zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise ProductError(f"{name} does not match its CRC-32 (damaged or truncated file)")
    r = _Reader(data[:-4], name)
    r.take(len(MAGIC))
    (head_len,) = r.unpack("<H")
    quality, flags, n = r.unpack("<BBB")
    model_id = r.take(n).decode("utf-8", "replace")
    sha_prefix = r.take(8).hex()
    height, width, block = r.unpack("<IIH")
    if not height or not width or height * width > MAX_INPUT_PIXELS or not block:
        raise ProductError(f"{name} declares an input grid of {height} x {width} px in blocks of {block}")
    transform = Affine(*r.unpack("<6d")) if flags & GEOREFERENCED else None
    (n,) = r.unpack("<H")
    crs = r.take(n).decode("utf-8", "replace") or None
    (n,) = r.unpack("<B")
    date = r.take(n).decode("ascii", "replace")
    cells = latent_cells((height, width))
    blocks = block_slices(cells, block)
    lengths = [r.varint() for _ in blocks]
    mask_len = r.varint() if flags & HAS_MASK else 0
    if r.pos != len(MAGIC) + 2 + head_len:
        raise ProductError(f"{name}: header length field disagrees with its content")
    if r.pos + sum(lengths) + mask_len != len(data) - 4:
        raise ProductError(f"{name}: payload length disagrees with the header")
    return {"quality": quality, "model_id": model_id, "sha_prefix": sha_prefix, "shape": (height, width),
            "block": block, "transform": transform, "crs": crs, "date": date, "cells": cells,
            "blocks": blocks, "lengths": lengths, "mask_len": mask_len, "payload": r.pos}


def stream_offsets(h: dict) -> list[tuple[int, int]]:
    """(start, length) of each block stream in the file, in ``block_slices`` order."""
    starts = np.cumsum([h["payload"]] + h["lengths"][:-1]).tolist() if h["lengths"] else []
    return list(zip(starts, h["lengths"]))


def read_mask(data: bytes, h: dict, name: str) -> np.ndarray | None:
    """The nodata mask on the input grid (True = nodata), None when the input had none."""
    if not h["mask_len"]:
        return None
    start = h["payload"] + sum(h["lengths"])
    try:
        bits = np.frombuffer(zlib.decompress(data[start:start + h["mask_len"]]), np.uint8)
    except zlib.error as e:
        raise ProductError(f"{name}: nodata mask is corrupt: {e}") from e
    size = h["shape"][0] * h["shape"][1]
    if bits.size != -(-size // 8):
        raise ProductError(f"{name}: nodata mask has {bits.size * 8} bits for {size} pixels")
    return np.unpackbits(bits)[:size].reshape(h["shape"]).astype(bool)


def decode_block(coder, stream: bytes, level: int, cells: tuple[slice, slice], name: str) -> np.ndarray:
    """One block's integers (L, h, w) from its stream."""
    shape = (coder.channels, cells[0].stop - cells[0].start, cells[1].stop - cells[1].start)
    try:
        return coder.decode(stream, level, shape)
    except StreamError as e:
        raise ProductError(f"{name}: {e}") from e


def read_date(folder: Path, date: str, coder, level_of) -> StreamDate:
    """Decode one date down to its integers, all blocks at once. ``level_of(quality)`` maps the
    stored quality to the index of the model's tables (and refuses a quality it does not have)."""
    path = Path(folder) / file_name(date)
    if not path.is_file():
        raise ProductError(f"{path.name} is missing from {folder}")
    data = path.read_bytes()
    h = read_header(data, path.name)
    if h["date"] != date:
        raise ProductError(f"{path.name} holds date {h['date']!r}, not {date}")
    level = level_of(h["quality"])
    ints = np.zeros((coder.channels,) + h["cells"], np.int16)
    for cells, (start, n) in zip(h["blocks"], stream_offsets(h)):
        ints[:, cells[0], cells[1]] = decode_block(coder, data[start:start + n], level, cells, path.name)
    return StreamDate(date, h["quality"], ints, read_mask(data, h, path.name), h["shape"], h["transform"],
                      h["crs"], h["model_id"], h["sha_prefix"])
