"""A level's residual coded by JPEG 2000: what holds the gain over the classical codecs toward CF 10, where the
decoder saturates (BENCHMARKS.md, issue 28, twenty-third part; ``benchmarks.residual_layer`` measures it).

One band of one block at a time: its residual (truth - the product's decoding, DN; a 20 m band on its 2 x 2 means)
rounded to int16 and coded by OpenJPEG's fixed-quality mode at the target of ``targets`` that costs it least (found downhill),
squared error plus lambda (DN² a bit) times the bits, or not at all (an empty stream) where no codestream takes
off more than it costs. A codestream is a raw J2K codestream (no JP2 box): the encoder needs imagecodecs, whose
OpenJPEG binding has the fixed-quality mode; readers decode with GDAL's JP2OpenJPEG driver, there with rasterio,
which gives the same integers.

A block's layer (``encode_block``): per band, in ``BANDS`` order, a byte saying on which grid its residual is
coded (0 none, 1 its 2 x 2 means, added back on the 2 x 2 pixels: a 20 m band only; 2 the 10 m grid), then,
unless none, the codestream's length (LEB128) and the codestream. A 20 m band takes whichever grid costs it least:
its source's 20 m pixels may hold 10 m detail (resampled L1C, other grids).
"""
from __future__ import annotations

import warnings

import numpy as np

import corsa_udf
from corsa.codec.latent_coder import StreamError
from corsa.codec.loop_filter import read_varint, varint
from corsa.core.scene import to_uint16

TARGETS_DB = (56.0, 59.0, 62.0, 65.0, 68.0, 71.0, 74.0)   # OpenJPEG's PSNR targets against the 16-bit peak
NONE, MEANS2, FULL = 0, 1, 2                               # a band's grid in a block's layer


def _int16(residual: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(residual), -(1 << 15), (1 << 15) - 1).astype(np.int16))


def encoder():
    """imagecodecs, whose OpenJPEG binding encodes the layers (the engine extra has it; readers do not need it)."""
    try:
        import imagecodecs
    except ImportError as e:
        raise RuntimeError("coding a residual layer (the levels a model's card gives a layer) needs imagecodecs: "
                           "pip install 'corsa-openeo[engine]' or imagecodecs") from e
    return imagecodecs


def encode(residual: np.ndarray, lam: float, weight: float = 1.0,
           targets: tuple[float, ...] = TARGETS_DB) -> tuple[bytes, np.ndarray]:
    """A band's residual (h, w) -> its codestream (b"" where none pays) and what readers decode from it.
    ``weight``: the pixels each value stands for (4 for a 20 m band's 2 x 2 means), so that its squared error
    counts as the 10 m grid's."""
    imagecodecs = encoder()

    values = _int16(residual)
    r = residual.astype(np.float64)
    tried: dict[int, tuple[float, bytes, np.ndarray]] = {}

    def at(i: int) -> float:
        if i not in tried:
            stream = imagecodecs.jpeg2k_encode(values, level=targets[i], codecformat=imagecodecs.JPEG2K.CODEC.J2K)
            decoded = imagecodecs.jpeg2k_decode(stream).astype(np.float32)
            tried[i] = (weight * float(((r - decoded) ** 2).sum()) + lam * 8 * len(stream), stream, decoded)
        return tried[i][0]

    # The cost falls, then rises with the target (fewer bits against less error): walked downhill from the middle,
    # about half the targets are tried. Up across a plateau too: below the error a residual has anyway, targets
    # give the same codestream.
    i = len(targets) // 2
    if i + 1 < len(targets) and at(i + 1) <= at(i):
        while i + 1 < len(targets) and at(i + 1) <= at(i):
            i += 1
    else:
        while i > 0 and at(i - 1) < at(i):
            i -= 1
    cost = at(i)
    _, stream, decoded = tried[i]
    if cost < weight * float((r ** 2).sum()):
        return stream, decoded
    return b"", np.zeros(residual.shape, np.float32)


def means2(a: np.ndarray) -> np.ndarray:
    """(h, w) -> its 2 x 2 means, an odd edge repeated."""
    a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2)), mode="edge")
    return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).mean((1, 3))


def _expanded(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(coarse, 2, 0), 2, 1)[:shape[0], :shape[1]]


def encode_block(truth: np.ndarray, decoded: np.ndarray, valid: np.ndarray | None, lam: float) -> tuple[bytes, np.ndarray]:
    """A block's layer: its input (10, h, w) DN, its decoding without the layer and where it has data (None:
    everywhere) -> (the layer's bytes, the residual readers add, float32 (10, h, w)). ``lam``: DN² a bit."""
    shape = truth.shape[1:]
    out, added = bytearray(), np.zeros(truth.shape, np.float32)
    for b in range(truth.shape[0]):
        r = truth[b].astype(np.float32) - decoded[b]
        if valid is not None:
            r = np.where(valid, r, 0)
        options = [(FULL, *encode(r, lam))]
        if b in corsa_udf.GRID20_BANDS:
            stream, coarse = encode(means2(r), lam, 4.0)
            options.append((MEANS2, stream, _expanded(coarse, shape)))
        r64 = r.astype(np.float64)
        grid, stream, d = min(options, key=lambda o: float(((r64 - o[2]) ** 2).sum()) + lam * 8 * len(o[1]))
        if not stream:
            out.append(NONE)
            continue
        out += bytes([grid]) + varint(len(stream)) + stream
        added[b] = d
    return bytes(out), added


def add(pixels: np.ndarray, data: bytes, nodata: np.ndarray | None) -> np.ndarray:
    """A block's decoding (bands, h, w) uint16 with its layer ``data`` added on its pixels with data (``nodata``:
    True where not; None: none), as readers give it."""
    residual = decode_block(data, pixels.shape[0], pixels.shape[1:])
    if nodata is not None:
        residual[:, nodata] = 0
    return to_uint16(pixels + residual)


def decode_block(data: bytes, bands: int, shape: tuple[int, int]) -> np.ndarray:
    """A block's layer -> the residual (bands, h, w) float32 to add to its decoding."""
    out, pos = np.zeros((bands,) + tuple(shape), np.float32), 0
    for b in range(bands):
        if pos >= len(data):
            raise StreamError("a residual layer ends early")
        grid, pos = data[pos], pos + 1
        if grid == NONE:
            continue
        if grid not in (MEANS2, FULL) or (grid == MEANS2 and b not in corsa_udf.GRID20_BANDS):
            raise StreamError(f"a residual layer names grid {grid} for band {b}")
        pos, n = read_varint(data, pos, "a residual layer")
        if not n or pos + n > len(data):
            raise StreamError(f"a residual layer's codestream of {n} bytes where {len(data) - pos} are left")
        if grid == FULL:
            out[b] = decode(data[pos:pos + n], shape)
        else:
            out[b] = _expanded(decode(data[pos:pos + n], (-(-shape[0] // 2), -(-shape[1] // 2))), shape)
        pos += n
    if pos != len(data):
        raise StreamError(f"a residual layer has {len(data) - pos} bytes past its last band")
    return out


def decode(stream: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A band's codestream -> its residual (h, w) float32 (zeros for b""), by GDAL."""
    if not stream:
        return np.zeros(shape, np.float32)
    from rasterio.errors import NotGeoreferencedWarning, RasterioError
    from rasterio.io import MemoryFile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)   # a bare codestream has no georeference
            with MemoryFile(stream, ext=".j2k") as mem, mem.open() as f:
                if f.count != 1 or (f.height, f.width) != tuple(shape):
                    raise StreamError(f"a residual codestream of {f.count} band(s) of {f.height} x {f.width} px, "
                                      f"expected one of {shape[0]} x {shape[1]}")
                return f.read(1).astype(np.float32)
    except RasterioError as e:
        raise StreamError(f"a residual codestream is damaged: {e}") from e
