"""Product format versions 3 to 13: the entropy-coded stream of a variable-rate model, one file a date.

    <folder>/corsa_<date>.corsa

A file is a small binary header, the latent's blocks (each an independent stream of
``corsa.codec.latent_coder``, so a block can be decoded alone), the nodata mask when the input had
nodata, and a CRC-32 of everything before it. The header is kept small because on a 120 px patch at
CF 120 the whole file is about 1.3 kB: a georeferenced UTM date with an EPSG code costs 55-60 bytes
(about 4%), where the two GeoTIFF headers of format 2 cost several kB. All integers little-endian;
varint = LEB128:

    magic      b"CRS" + version byte: 5 (a date coded alone), 6 (with references), 7 (alone, with the class
               tables of the model it names: 4-bit channel maps), 8 and 9 (7 and 6 with a refinement stream
               a block, ``corsa.codec.refine_coder``), 10 and 11 (8 and 9 whose refinement streams of a
               model with a loop filter start with a byte: the phase of the block's 20 m bands' 2 x 2
               cells, ``corsa_udf.grid20_phase``), 12 and 13 (10 and 11 with a residual layer a block,
               ``corsa.codec.residual_coder``: the levels a model's card gives a ``layer``); the older
               3 and 4 are 5 and 6 but for the
               block streams, which have no channel map (``corsa.codec.latent_coder``)
    varint     header length (bytes that follow up to the payload)
    u8         quality level       u8  flags (1 nodata mask, 2 georeferenced, 4 north-up,
                                          8 pixel size fits float32, 16 CRS is an EPSG code)
    u8 + str   model id            4 bytes: start of the decoder's sha256
    varints    input height, width (10 m pixels), block side (latent cells)
    transform  if georeferenced: north-up: f64 x origin, f64 y origin, pixel width and height
               (f32 when exact, else f64); otherwise the 6 coefficients as f64
    CRS        EPSG code as u32, or u16 + WKT text (length 0: none)
    u16        date as days since 1970-01-01 (0xFFFF: undated)
    (versions 4 and 6, a date of a series coded with references to earlier dates, ``corsa.formats.series``:)
    varint     number of reference dates n >= 1;  u16 x n  their dates (days, as above)
    bytes      per block (row-major), per sub-block of SUB x SUB cells (row-major): the index of
               the reference date its cells are coded with, 0xFF: none (coded alone)
    varints    byte length of each block stream (row-major), (versions 8 to 13:) of each block's
               refinement stream, then of the mask
    (versions 12 and 13:)
    u8         the level the layer makes of the date (the quality field above is its base's)
    varints    byte length of each block's residual layer
    payload    block streams, (8 to 13:) refinement streams, mask (zlib of packbits, 10 m grid), (12, 13:) layers
    u32        CRC-32 of all bytes before it

Format 1 and 2 products (GeoTIFF index grids of codebook models) are read by ``corsa.formats.codebook_product``.
Files are written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rasterio.transform import Affine

import corsa_udf
from corsa.core.files import writing
from corsa.core.scene import BANDS, to_uint16
from corsa.codec import residual_coder
from corsa.codec.latent_coder import StreamError
from corsa.codec.refine_coder import BlockRefinement, RefineCoder

VERSION = 5
TEMPORAL_VERSION = 6           # a date coded with references (a series); otherwise the bytes of version 5
CLASS_VERSION = 7              # a date coded alone with class tables; otherwise the bytes of version 5
MAPLESS = {3: VERSION, 4: TEMPORAL_VERSION}   # older versions: the same, their streams without channel maps
REFINED = {8: CLASS_VERSION, 9: TEMPORAL_VERSION,   # the same, with a refinement stream a block
           10: CLASS_VERSION, 11: TEMPORAL_VERSION,  # 8 and 9 with a 20 m grid's phase in those streams
           12: CLASS_VERSION, 13: TEMPORAL_VERSION}  # 10 and 11 with a residual layer a block
LAYERED = {10: 12, 11: 13}
GRID20_VERSIONS = (10, 11, 12, 13)
WITH_REFINEMENT = {CLASS_VERSION: 10, TEMPORAL_VERSION: 11}   # written (then ``with_layer``: 12 and 13)
VERSIONS = (*MAPLESS, VERSION, TEMPORAL_VERSION, CLASS_VERSION, *REFINED)
MAGIC = b"CRS" + bytes([VERSION])
SUB = 32                       # latent cells per side of a sub-block: each chooses its own reference
NO_REFERENCE = 0xFF
SUFFIX = ".corsa"
BLOCK = 128                    # latent cells per block side: 512 px at 40 m cells
HAS_MASK, GEOREFERENCED, NORTH_UP, PIXEL_F32, EPSG = 1, 2, 4, 8, 16
SHA_BYTES = 4                  # identifies the decoder; integrity is the CRC's job
UNDATED = 0xFFFF
EPOCH = np.datetime64("1970-01-01", "D")
MAX_INPUT_PIXELS = 1 << 30     # as format 2: a corrupt header must not make us allocate without bound


class ProductError(ValueError):
    """A product file is missing, truncated, corrupt or inconsistent."""


def shown(value: str | None) -> str:
    """A stored value as an error message quotes it: a corrupt one may be long."""
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


@dataclass
class StreamDate:
    """One date of a stream-format product, decoded down to the stored integers."""

    date: str
    quality: int
    ints: np.ndarray               # (L, ceil(H/4), ceil(W/4)) int16
    nodata: np.ndarray | None      # True where the input was nodata, on the input grid
    shape: tuple[int, int]
    transform: Affine | None
    crs: str | None
    model_id: str
    model_sha256_prefix: str       # hex, 8 characters
    refinement: list[BlockRefinement] | None = None   # each block's refinement (versions 8 to 13)
    layer_quality: int | None = None   # the level a residual layer makes of the date (versions 12, 13)


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


def tables_of(version: int) -> int:
    """The version whose tables a file's block streams need: 5 (plain, alone), 6 (temporal) or 7 (class)."""
    return REFINED.get(version, MAPLESS.get(version, version))


def block_slices(cells: tuple[int, int], block: int = BLOCK) -> list[tuple[slice, slice]]:
    """The blocks of a latent grid, row-major: the order their streams have in a file."""
    return [(slice(y, min(y + block, cells[0])), slice(x, min(x + block, cells[1])))
            for y in range(0, cells[0], block) for x in range(0, cells[1], block)]


def block_pixels(cells: tuple[slice, slice], shape: tuple[int, int]) -> tuple[slice, slice]:
    """The pixels of the input grid ``shape`` that a block of latent cells covers."""
    return slice(4 * cells[0].start, min(4 * cells[0].stop, shape[0])), slice(4 * cells[1].start, min(4 * cells[1].stop, shape[1]))


def refinement_cells(refiner: RefineCoder, level: int, truth: np.ndarray, decoded: np.ndarray,
                     valid: np.ndarray | None, block: int = BLOCK) -> list[BlockRefinement]:
    """Each block's refinement of a whole date (its loop filter and cells): its input (10, H, W) DN,
    its decoding (float, before rounding) and where it is valid (None: everywhere)."""
    shape = truth.shape[1:]
    out = []
    for cells in block_slices(latent_cells(shape), block):
        py, px = block_pixels(cells, shape)
        out.append(refiner.block(truth[:, py, px], decoded, py, px, None if valid is None else valid[py, px], level))
    return out


class WindowRefinement(NamedTuple):
    """A refinement over a window of a date's pixels at ``level``: the cells of the blocks under it, each
    (rows, cols of the window, (cells, the block's shape, the rows and cols of the block)), whose field
    ``refiner`` adds (computed as it is added: a date's field is as large as the date), and the loop
    filters of the blocks that have one, each (rows, cols of the window, weights), which ``refiner`` applies;
    ``grids``: the blocks whose 20 m bands are on 2 x 2 cells, each (rows, cols of the window, phase);
    ``corner``: the date's row and column of the window's first pixel (the cells' phase is the date's)."""

    fields: list
    filters: list
    refiner: RefineCoder
    level: int
    grids: list = []
    corner: tuple[int, int] = (0, 0)

    def within(self, rows: slice, cols: slice) -> "WindowRefinement":
        """The same with the loop filters and 20 m grids of the window's pixels ``rows`` x ``cols`` only: a
        block decoded over its window, as the decompress UDF filters its chunk's middle block only."""
        def cut(parts: list) -> list:
            kept = [(slice(max(ry.start, rows.start), min(ry.stop, rows.stop)),
                     slice(max(rx.start, cols.start), min(rx.stop, cols.stop)), v) for ry, rx, v in parts]
            return [p for p in kept if p[0].start < p[0].stop and p[1].start < p[1].stop]

        return self._replace(filters=cut(self.filters), grids=cut(self.grids))

    def at(self, y: int, x: int) -> "WindowRefinement":
        """The same refining the part of a larger window that starts at (``y``, ``x``) of it."""
        def shift(parts: list) -> list:
            return [(slice(ry.start + y, ry.stop + y), slice(rx.start + x, rx.stop + x), v) for ry, rx, v in parts]

        return self._replace(fields=shift(self.fields), filters=shift(self.filters), grids=shift(self.grids),
                             corner=(self.corner[0] - y, self.corner[1] - x))

    def apply(self, decoded: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """The window's decoding (float (10, rows, cols), the network's) refined in place: each block's
        loop filter (its neighbours read from the window as decoded), then the field, then the 20 m grids
        (each cell the mean of its ``valid`` pixels: those with data, (rows, cols); None: all), as the
        decompress UDF refines a chunk (its nodata pixels the readers then set to 0)."""
        # every block filtered from the decoding as it is (its neighbours' pixels unfiltered), then written
        for ry, rx, out in [(ry, rx, self.refiner.filtered(decoded, w, ry, rx)) for ry, rx, w in self.filters]:
            decoded[:, ry, rx] = out
        for ry, rx, (cells, shape, by, bx) in self.fields:
            self.refiner.field(cells, self.level, shape, by, bx, decoded[:, ry, rx], add=True)
        for ry, rx, code in self.grids:
            corsa_udf.grid20_project(decoded, ry, rx, code, (self.corner[0] + ry.start, self.corner[1] + rx.start), valid)
        return decoded


def refinement_window(refiner: RefineCoder, level: int, shape: tuple[int, int], refinement_of, rows: tuple[int, int],
                      cols: tuple[int, int], block: int = BLOCK) -> WindowRefinement:
    """The refinement over a window of a date of ``shape`` px, each block's part from its own
    ``refinement_of(k)`` (a ``BlockRefinement``, block k in ``block_slices`` order; asked only for the
    blocks under the window)."""
    fields, filters, grids = [], [], []
    for k, cells in enumerate(block_slices(latent_cells(shape), block)):
        py, px = block_pixels(cells, shape)
        ry, rx = slice(max(py.start, rows[0]), min(py.stop, rows[1])), slice(max(px.start, cols[0]), min(px.stop, cols[1]))
        if ry.start < ry.stop and rx.start < rx.stop:
            r = refinement_of(k)
            wy, wx = slice(ry.start - rows[0], ry.stop - rows[0]), slice(rx.start - cols[0], rx.stop - cols[0])
            fields.append((wy, wx, (r.cells, (py.stop - py.start, px.stop - px.start),
                                    slice(ry.start - py.start, ry.stop - py.start), slice(rx.start - px.start, rx.stop - px.start))))
            if r.weights is not None:
                filters.append((wy, wx, r.weights))
            if r.grid20:
                grids.append((wy, wx, r.grid20))
    return WindowRefinement(fields, filters, refiner, level, grids=grids, corner=(rows[0], cols[0]))


def refine(decoded: np.ndarray, refinement: list[BlockRefinement], refiner: RefineCoder, level: int,
           valid: np.ndarray | None = None, block: int = BLOCK) -> np.ndarray:
    """A whole date's decoding (float, (10, H, W)) refined by its blocks' refinements (``valid``: its pixels
    with data, for the 20 m grids)."""
    h, w = decoded.shape[1:]
    return refinement_window(refiner, level, (h, w), refinement.__getitem__, (0, h), (0, w), block).apply(decoded, valid)


def decode_refinement(refiner: RefineCoder | None, stream: bytes, pixels: tuple[slice, slice], name: str,
                      version: int) -> BlockRefinement:
    """One block's refinement (cells, loop filter, 20 m grid) from its stream (``pixels``: the block's,
    ``block_pixels``; ``version``: the file's)."""
    if refiner is None:
        raise ProductError(f"{name} is refined (format 8 to 13): decode it with the model it names")
    shape = (pixels[0].stop - pixels[0].start, pixels[1].stop - pixels[1].start)
    try:
        out = refiner.decode(stream, len(BANDS), refiner.cells(shape), version in GRID20_VERSIONS)
    except StreamError as e:
        raise ProductError(f"{name}: {e}") from e
    if (out.weights is not None or out.grid20) and min(shape) < corsa_udf.FILTER_MIN_PX:
        raise ProductError(f"{name}: a loop filter or a 20 m grid for a block of {shape[0]} x {shape[1]} px (none "
                           f"under {corsa_udf.FILTER_MIN_PX} px a side)")
    return out


def latent_cells(shape: tuple[int, int]) -> tuple[int, int]:
    """The latent grid (4 px cells) covering an input grid."""
    return -(-shape[0] // 4), -(-shape[1] // 4)


def sub_blocks(cells: tuple[slice, slice]) -> tuple[int, int]:
    """Sub-blocks (rows, columns) of one block's cells."""
    return -(-(cells[0].stop - cells[0].start) // SUB), -(-(cells[1].stop - cells[1].start) // SUB)


def assemble(streams: list[bytes], nodata: np.ndarray, quality: int, transform: Affine | None, crs: str | None,
             date: str, model_id: str, model_sha256: str, block: int = BLOCK, refs: list[str] | None = None,
             choices: list[np.ndarray] | None = None, class_tables: bool = False,
             refinement: list[bytes] | None = None) -> bytes:
    """The bytes of one date's file from its block streams (in ``block_slices`` order) and the
    nodata mask on the input grid (True = nodata), whose shape the file records. A date coded with
    references names their dates (``refs``) and, per block, the reference of each sub-block
    (``choices``: uint8 (sub-block rows, columns), an index into refs or NO_REFERENCE); one coded
    alone with a model's class tables says so (``class_tables``: version 7). ``refinement``: a
    refinement stream a block (versions 8 to 11; a layer: ``with_layer``)."""
    if refs and class_tables:
        raise ValueError("a date coded with references is coded with the temporal tables, not class tables")
    if refinement is not None and not (refs or class_tables):
        raise ValueError("a refined date is coded with class tables or with references (versions 8 to 11)")
    shape = nodata.shape
    blocks = block_slices(latent_cells(shape), block)
    if len(streams) != len(blocks):
        raise ValueError(f"{len(streams)} block streams for an input grid of {shape} in blocks of {block} cells")
    if refinement is not None and len(refinement) != len(blocks):
        raise ValueError(f"{len(refinement)} refinement streams for {len(blocks)} blocks")
    if bool(refs) != (choices is not None):
        raise ValueError("a date coded with references needs its reference dates and the choice of each block")
    if refs and (len(choices) != len(blocks) or any(c.shape != sub_blocks(b) for c, b in zip(choices, blocks))
                 or any(((c >= len(refs)) & (c != NO_REFERENCE)).any() for c in choices) or len(refs) >= NO_REFERENCE):
        raise ValueError(f"reference choices do not fit {len(blocks)} blocks and {len(refs)} reference dates")
    mask = zlib.compress(np.packbits(nodata).tobytes(), 9) if nodata.any() else b""
    ident = model_id.encode()
    flags = HAS_MASK if mask else 0
    grid = _varint(shape[0]) + _varint(shape[1]) + _varint(block)
    if transform is not None:
        flags |= GEOREFERENCED
        a, b, c, d, e, f = list(transform)[:6]
        if b == 0 and d == 0:
            flags |= NORTH_UP
            exact = float(np.float32(a)) == a and float(np.float32(e)) == e  # (NumPy 2 would compare in float32)
            flags |= PIXEL_F32 if exact else 0
            grid += struct.pack("<2d", c, f) + struct.pack("<2f" if exact else "<2d", a, e)
        else:
            grid += struct.pack("<6d", a, b, c, d, e, f)
    code = _epsg(crs)
    if code is not None:
        flags |= EPSG
        grid += struct.pack("<I", code)
    else:
        grid += struct.pack("<H", len((crs or "").encode())) + (crs or "").encode()
    grid += struct.pack("<H", _days(date))
    if refs:
        grid += _varint(len(refs)) + b"".join(struct.pack("<H", _days(r)) for r in refs)
        grid += b"".join(c.astype(np.uint8).tobytes() for c in choices)
    head = struct.pack("<BBB", quality, flags, len(ident)) + ident + bytes.fromhex(model_sha256[:2 * SHA_BYTES]) + grid
    extra = refinement or []
    head += b"".join(_varint(len(s)) for s in streams + extra) + (_varint(len(mask)) if mask else b"")
    version = TEMPORAL_VERSION if refs else CLASS_VERSION if class_tables else VERSION
    magic = MAGIC[:3] + bytes([WITH_REFINEMENT[version] if refinement is not None else version])
    body = magic + _varint(len(head)) + head + b"".join(streams + extra) + mask
    return body + struct.pack("<I", zlib.crc32(body))


def with_layer(data: bytes, name: str, quality: int, layers: list[bytes]) -> bytes:
    """A refined date's file (version 10 or 11) with a residual layer a block (``layers``, in ``block_slices``
    order) that makes it level ``quality``: version 12 or 13, the rest of its bytes as they were."""
    h = read_header(data, name)
    if h["version"] not in LAYERED:
        raise ValueError(f"{name}: a residual layer goes on a refined date of format 10 or 11, not {h['version']}")
    if len(layers) != len(h["blocks"]):
        raise ValueError(f"{len(layers)} residual layers for {len(h['blocks'])} blocks")
    r = _Reader(data, name)
    r.take(len(MAGIC))
    head_len = r.varint()
    head = data[r.pos:r.pos + head_len] + bytes([quality]) + b"".join(_varint(len(s)) for s in layers)
    body = MAGIC[:3] + bytes([LAYERED[h["version"]]]) + _varint(len(head)) + head + data[r.pos + head_len:-4] + b"".join(layers)
    return body + struct.pack("<I", zlib.crc32(body))


def _epsg(crs: str | None) -> int | None:
    """The EPSG code of a CRS written as "EPSG:n" (what the readers give for UTM and WGS 84)."""
    if crs and crs.upper().startswith("EPSG:") and crs[5:].isdigit() and int(crs[5:]) < 1 << 32:
        return int(crs[5:])
    return None


def _days(date: str) -> int:
    """A date label (YYYY-MM-DD or "undated", as product.date_label writes them) as u16 days."""
    if date == "undated":
        return UNDATED
    try:
        days = int((np.datetime64(date, "D") - EPOCH).astype(int))
    except ValueError as e:
        raise ValueError(f"a product date is YYYY-MM-DD or 'undated', not {date!r}") from e
    if not 0 <= days < UNDATED or str(EPOCH + days) != date:
        raise ValueError(f"a product date is YYYY-MM-DD between 1970 and 2149, not {date!r}")
    return days


def encode_date(coder, ints: np.ndarray, level: int, quality: int, nodata: np.ndarray,
                transform: Affine | None, crs: str | None, date: str, model_id: str, model_sha256: str,
                block: int = BLOCK, refinement: list[bytes] | None = None) -> bytes:
    """The bytes of one date's file from its whole latent. ``coder`` is the model's LatentCoder,
    ``level`` the index of ``quality`` in its tables; ``refinement``: a refinement stream a block."""
    if ints.shape[1:] != latent_cells(nodata.shape):
        raise ValueError(f"latent grid {ints.shape[1:]} does not cover the input grid {nodata.shape} in 4 px cells")
    streams = [coder.encode(ints[:, ys, xs], level) for ys, xs in block_slices(ints.shape[1:], block)]
    return assemble(streams, nodata, quality, transform, crs, date, model_id, model_sha256, block,
                    class_tables=coder.classes > 1, refinement=refinement)


def encode_refined(codec, dn: np.ndarray, ints: np.ndarray, quality: int, nodata: np.ndarray, transform: Affine | None,
                   crs: str | None, date: str) -> tuple[bytes, np.ndarray, list[np.ndarray] | None]:
    """A whole date's file bytes (refined where ``codec``, a VariableRateCodec, refines ``quality``), from its
    input ``dn`` (10, H, W) and integers: (bytes, its decoding before the refinement (float DN), the
    refinement cells or None). ``refine`` adds the cells; what a reader gets is that, rounded."""
    level = codec.level(quality)
    rec = codec.synthesis(ints, quality, dn.shape[1:])
    cells = refinement_cells(codec.refiner, level, dn, rec, ~nodata) if codec.refines(quality) else None
    data = encode_date(codec.coder, ints, level, quality, nodata, transform, crs, date, codec.model_id,
                       codec.card["files"]["decoder"]["sha256"],
                       refinement=None if cells is None else [codec.refiner.encode(*c) for c in cells])
    return data, rec, cells


def decoded_date(codec, dn: np.ndarray, ints: np.ndarray, quality: int, nodata: np.ndarray, crs: str | None = None,
                 date: str = "undated", transform: Affine | None = None) -> tuple[bytes, np.ndarray]:
    """A whole date's file bytes (``encode_refined``) and what a reader decodes from
    them: uint16, refined where ``quality`` is, nodata 0; at a level made of a base and a residual layer
    (``codec.layer``), ``ints`` are the base's and each block gets its layer."""
    layer = codec.layer(quality)
    base = quality if layer is None else layer[0]
    data, rec, cells = encode_refined(codec, dn, ints, base, nodata, transform, crs, date)
    if cells is not None:
        refine(rec, cells, codec.refiner, codec.level(base), ~nodata)
    out = to_uint16(rec)
    out[:, nodata] = 0
    if layer is not None:
        layers = []
        for k, block in enumerate(block_slices(latent_cells(nodata.shape))):
            py, px = block_pixels(block, nodata.shape)
            phase = residual_coder.cells_phase(cells[k].grid20)
            layers.append(residual_coder.encode_block(dn[:, py, px], out[:, py, px], ~nodata[py, px], layer[1], phase))
            out[:, py, px] = residual_coder.add(out[:, py, px], layers[-1], nodata[py, px], phase)
        data = with_layer(data, date, quality, layers)
    return data, out


def write_date(folder: Path, data: bytes, date: str) -> Path:
    """Write one date's bytes under a temporary name, then rename: a .corsa file is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / file_name(date)
    part = final.with_name(final.name + ".part")
    try:
        with writing(final):
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
    if data[3] not in VERSIONS:
        raise ProductError(f"{name} has stream format version {data[3]}, this reader knows 3 to {max(VERSIONS)}")
    if zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise ProductError(f"{name} does not match its CRC-32 (damaged or truncated file)")
    r = _Reader(data[:-4], name)
    r.take(len(MAGIC))
    head_len = r.varint()
    start = r.pos
    quality, flags, n = r.unpack("<BBB")
    model_id = r.take(n).decode("utf-8", "replace")
    sha_prefix = r.take(SHA_BYTES).hex()
    height, width, block = r.varint(), r.varint(), r.varint()
    if not height or not width or height * width > MAX_INPUT_PIXELS or not block or block > 1 << 16:
        raise ProductError(f"{name} declares an input grid of {height} x {width} px in blocks of {block}")
    transform = None
    if flags & GEOREFERENCED and flags & NORTH_UP:
        c, f = r.unpack("<2d")
        a, e = r.unpack("<2f" if flags & PIXEL_F32 else "<2d")
        transform = Affine(a, 0.0, c, 0.0, e, f)
    elif flags & GEOREFERENCED:
        transform = Affine(*r.unpack("<6d"))
    if flags & EPSG:
        crs = f"EPSG:{r.unpack('<I')[0]}"
    else:
        (n,) = r.unpack("<H")
        crs = r.take(n).decode("utf-8", "replace") or None
    date = _date_of(r.unpack("<H")[0])
    cells = latent_cells((height, width))
    blocks = block_slices(cells, block)
    refs, choices = [], None
    if tables_of(data[3]) == TEMPORAL_VERSION:
        n = r.varint()
        if not 0 < n < NO_REFERENCE:
            raise ProductError(f"{name} declares {n} reference dates")
        refs = [_date_of(r.unpack("<H")[0]) for _ in range(n)]
        choices = []
        for b in blocks:
            rows, cols = sub_blocks(b)
            c = np.frombuffer(r.take(rows * cols), np.uint8).reshape(rows, cols)
            if ((c >= n) & (c != NO_REFERENCE)).any():
                raise ProductError(f"{name}: a block names a reference date it does not list")
            choices.append(c)
        if date == "undated" or any(ref == "undated" or ref >= date for ref in refs):
            raise ProductError(f"{name}: a date refers to dates {refs}, which are not all before it ({date})")
    lengths = [r.varint() for _ in blocks]
    refine_lengths = [r.varint() for _ in blocks] if data[3] in REFINED else None
    mask_len = r.varint() if flags & HAS_MASK else 0
    layer_quality, layer_lengths = None, None
    if data[3] in LAYERED.values():
        (layer_quality,) = r.unpack("<B")
        layer_lengths = [r.varint() for _ in blocks]
        if layer_quality <= quality:
            raise ProductError(f"{name}: a residual layer makes level {layer_quality} of a date of level {quality}")
    if r.pos != start + head_len:
        raise ProductError(f"{name}: header length field disagrees with its content")
    if r.pos + sum(lengths) + sum(refine_lengths or []) + mask_len + sum(layer_lengths or []) != len(data) - 4:
        raise ProductError(f"{name}: payload length disagrees with the header")
    return {"quality": quality, "model_id": model_id, "sha_prefix": sha_prefix, "shape": (height, width),
            "block": block, "transform": transform, "crs": crs, "date": date, "cells": cells,
            "blocks": blocks, "lengths": lengths, "mask_len": mask_len, "payload": r.pos,
            "refs": refs, "choices": choices, "version": data[3], "refine_lengths": refine_lengths,
            "layer_quality": layer_quality, "layer_lengths": layer_lengths}


def _date_of(days: int) -> str:
    return "undated" if days == UNDATED else str(EPOCH + days)


def stream_offsets(h: dict) -> list[tuple[int, int]]:
    """(start, length) of each block stream in the file, in ``block_slices`` order."""
    starts = np.cumsum([h["payload"]] + h["lengths"][:-1]).tolist() if h["lengths"] else []
    return list(zip(starts, h["lengths"]))


def refine_offsets(h: dict) -> list[tuple[int, int]] | None:
    """(start, length) of each block's refinement stream (versions 8 to 13), None for a date without."""
    if h["refine_lengths"] is None:
        return None
    starts = np.cumsum([h["payload"] + sum(h["lengths"])] + h["refine_lengths"][:-1]).tolist()
    return list(zip(starts, h["refine_lengths"]))


def level_of(h: dict) -> int:
    """The quality level a date's header says it is at: its layer's, or its own (the header's ``quality`` is
    the level of the integers it stores; a compress job's date has no layer)."""
    return h["quality"] if h.get("layer_quality") is None else h["layer_quality"]


def layer_offsets(h: dict) -> list[tuple[int, int]] | None:
    """(start, length) of each block's residual layer (versions 12 and 13), None for a date without."""
    if h["layer_lengths"] is None:
        return None
    starts = np.cumsum([h["payload"] + sum(h["lengths"]) + sum(h["refine_lengths"]) + h["mask_len"]]
                       + h["layer_lengths"][:-1]).tolist()
    return list(zip(starts, h["layer_lengths"]))


def read_mask(data: bytes, h: dict, name: str) -> np.ndarray | None:
    """The nodata mask on the input grid (True = nodata), None when the input had none."""
    if not h["mask_len"]:
        return None
    start = h["payload"] + sum(h["lengths"]) + sum(h["refine_lengths"] or [])
    try:
        bits = np.frombuffer(zlib.decompress(data[start:start + h["mask_len"]]), np.uint8)
    except zlib.error as e:
        raise ProductError(f"{name}: nodata mask is corrupt: {e}") from e
    size = h["shape"][0] * h["shape"][1]
    if bits.size != -(-size // 8):
        raise ProductError(f"{name}: nodata mask has {bits.size * 8} bits for {size} pixels")
    return np.unpackbits(bits)[:size].reshape(h["shape"]).astype(bool)


def check_tables(version: int, coder, name: str) -> None:
    """Refuse a date coded alone whose streams need other tables than ``coder``'s: class tables
    (versions 7 and 8) or plain ones (3 and 5)."""
    tables = tables_of(version)
    if tables != TEMPORAL_VERSION and (tables == CLASS_VERSION) != (coder.classes > 1):
        raise ProductError(f"{name} is coded with {'class' if tables == CLASS_VERSION else 'plain'} tables, the "
                           f"model's are {'class' if coder.classes > 1 else 'plain'} tables: decoding would give "
                           f"wrong reflectances (decode it with the model it names)")


def decode_block(coder, stream: bytes, level: int, cells: tuple[slice, slice], name: str, version: int) -> np.ndarray:
    """One block of a date coded alone: its integers (L, h, w) from its stream (``version``: the file's)."""
    check_tables(version, coder, name)
    shape = (coder.channels, cells[0].stop - cells[0].start, cells[1].stop - cells[1].start)
    try:
        return coder.decode(stream, level, shape, channel_map=version not in MAPLESS)
    except StreamError as e:
        raise ProductError(f"{name}: {e}") from e


def read_date(folder: Path, date: str, coder, level_of, refiner: RefineCoder | None = None) -> StreamDate:
    """Decode one date down to its integers (and its refinement), all blocks at once. ``level_of(quality)``
    maps the stored quality to the index of the model's tables (and refuses a quality it does not have)."""
    path = Path(folder) / file_name(date)
    if not path.is_file():
        raise ProductError(f"{path.name} is missing from {folder}")
    data = path.read_bytes()
    h = read_header(data, path.name)
    if h["date"] != date:
        raise ProductError(f"{path.name} holds date {h['date']!r}, not {date}")
    if h["refs"]:
        raise ProductError(f"{path.name} is coded with references to dates {h['refs']}: read it with corsa.formats.series")
    level = level_of(h["quality"])
    ints = np.zeros((coder.channels,) + h["cells"], np.int16)
    for cells, (start, n) in zip(h["blocks"], stream_offsets(h)):
        ints[:, cells[0], cells[1]] = decode_block(coder, data[start:start + n], level, cells, path.name, h["version"])
    refinement = None if h["refine_lengths"] is None else [
        decode_refinement(refiner, data[start:start + n], block_pixels(cells, h["shape"]), path.name, h["version"])
        for cells, (start, n) in zip(h["blocks"], refine_offsets(h))]
    return StreamDate(date, h["quality"], ints, read_mask(data, h, path.name), h["shape"], h["transform"],
                      h["crs"], h["model_id"], h["sha_prefix"], refinement, h["layer_quality"])
