"""A level's residual coded by JPEG 2000: what holds the gain over the classical codecs toward CF 10, where the
decoder saturates (BENCHMARKS.md, issue 28, twenty-third part; ``benchmarks.residual_layer`` measures it).

One band of one block at a time: its residual (truth - the product's decoding, DN; a 20 m band on its 2 x 2 means)
rounded to int16 and coded by OpenJPEG's fixed-quality mode at the target where its squared error falls by lambda
(DN² a bit) a bit (``target_db``), or not at all (an empty stream) where the codestream takes off less squared error
than lambda times its bits. A codestream is a raw J2K codestream (no JP2 box): the encoder needs imagecodecs, whose
OpenJPEG binding has the fixed-quality mode; readers decode with GDAL's JP2OpenJPEG driver, there with rasterio,
which gives the same integers.

A block's layer (``encode_block``): per band, in ``BANDS`` order, a byte saying on which grid its residual is
coded (0 none, 1 its 2 x 2 means, added back on the 2 x 2 pixels: a 20 m band only; 2 the 10 m grid), then,
unless none, the codestream's length (LEB128) and the codestream. Where the block's refinement says its 20 m bands
are 2 x 2 cells (``corsa_udf.grid20_phase``) their means are those cells' and the 10 m grid is not tried (it would
code each cell four times); elsewhere the cells are at phase (0, 0) and a 20 m band takes whichever grid costs it
least: its source's 20 m pixels may hold 10 m detail (resampled L1C, other grids); the 10 m grid is tried only where
the residual's detail within the cells is more than the error the slope would leave (the same figures, fewer
encodings).
"""
from __future__ import annotations

import warnings

import numpy as np

import corsa_udf
from corsa.codec.latent_coder import StreamError
from corsa.codec.loop_filter import read_varint, varint
from corsa.core.scene import to_uint16

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


def target_db(lam: float, weight: float = 1.0) -> float:
    """The fixed-quality target (dB against the 16-bit peak) whose error is where a band's squared error falls by
    ``lam`` a bit: at high rate a wavelet coder's error falls by 2 ln 2 of itself a bit a value, so the slope is
    lambda where each value's error is lambda / (2 ln 2 x ``weight``). One encoding at it, against the best of 7
    targets 3 dB apart walked downhill (3.25 encodings a band): test split, 0.05 dB less at equal CF, 3x faster."""
    return float(10 * np.log10(65535.0 ** 2 * 2 * np.log(2) * weight / lam))


def encode(residual: np.ndarray, lam: float, weight: float = 1.0, target: float | None = None) -> tuple[bytes, np.ndarray]:
    """A band's residual (h, w) -> its codestream (b"" where it does not pay) and what readers decode from it.
    ``weight``: the pixels each value stands for (4 for a 20 m band's 2 x 2 means), so that its squared error
    counts as the 10 m grid's; ``target``: dB, instead of ``target_db``'s."""
    imagecodecs = encoder()
    r = residual.astype(np.float64)
    stream = imagecodecs.jpeg2k_encode(_int16(residual), level=target_db(lam, weight) if target is None else target,
                                       codecformat=imagecodecs.JPEG2K.CODEC.J2K)
    decoded = imagecodecs.jpeg2k_decode(stream).astype(np.float32)
    if weight * float(((r - decoded) ** 2).sum()) + lam * 8 * len(stream) < weight * float((r ** 2).sum()):
        return stream, decoded
    return b"", np.zeros(residual.shape, np.float32)


def means2(a: np.ndarray, phase: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(h, w) -> the means of its 2 x 2 cells at ``phase`` (rows, columns before the first whole cell), the cells
    cut by the edges completed by repeating them."""
    (h, w), (py, px) = a.shape, phase
    a = np.pad(a, ((py, (h + py) % 2), (px, (w + px) % 2)), mode="edge")
    return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).mean((1, 3))


def _expanded(coarse: np.ndarray, shape: tuple[int, int], phase: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(coarse, 2, 0), 2, 1)[phase[0]:phase[0] + shape[0], phase[1]:phase[1] + shape[1]]


def cells_phase(grid20: int) -> tuple[int, int] | None:
    """The phase of a block's 20 m cells from its refinement's ``grid20`` code (None: its 20 m bands are not so)."""
    return corsa_udf.GRID20_PHASES[grid20 - 1] if grid20 else None


def encode_block(truth: np.ndarray, decoded: np.ndarray, valid: np.ndarray | None, lam: float,
                 phase: tuple[int, int] | None = None) -> bytes:
    """A block's layer: its input (10, h, w) DN, its decoding without the layer and where it has data (None:
    everywhere) -> the layer's bytes (``add`` adds it). ``lam``: DN² a bit;
    ``phase``: where the block's 20 m bands are 2 x 2 cells (``cells_phase``), None where not."""
    shape = truth.shape[1:]
    out = bytearray()
    for b in range(truth.shape[0]):
        r = truth[b].astype(np.float32) - decoded[b]
        if valid is not None:
            r = np.where(valid, r, 0)
        options = []
        if b in corsa_udf.GRID20_BANDS:
            means = means2(r, phase or (0, 0))
            stream, coarse = encode(means, lam, 4.0)
            options.append((MEANS2, stream, _expanded(coarse, shape, phase or (0, 0))))
            # the 10 m grid only where the detail within the cells is more than its error would be at the slope
            within = float(((r - _expanded(means, shape, phase or (0, 0))) ** 2).sum())
            fine = phase is None and within > r.size * lam / (2 * np.log(2))
        if b not in corsa_udf.GRID20_BANDS or fine:
            options.append((FULL, *encode(r, lam)))
        r64 = r.astype(np.float64)
        grid, stream, _ = min(options, key=lambda o: float(((r64 - o[2]) ** 2).sum()) + lam * 8 * len(o[1]))
        out += bytes([grid]) + varint(len(stream)) + stream if stream else bytes([NONE])
    return bytes(out)


def add(pixels: np.ndarray, data: bytes, nodata: np.ndarray | None, phase: tuple[int, int] | None = None) -> np.ndarray:
    """A block's decoding (bands, h, w) uint16 with its layer ``data`` added on its pixels with data (``nodata``:
    True where not; None: none), as readers give it (``phase``: as ``encode_block``)."""
    residual = decode_block(data, pixels.shape[0], pixels.shape[1:], phase)
    if nodata is not None:
        residual[:, nodata] = 0
    return to_uint16(pixels + residual)


def decode_block(data: bytes, bands: int, shape: tuple[int, int], phase: tuple[int, int] | None = None) -> np.ndarray:
    """A block's layer -> the residual (bands, h, w) float32 to add to its decoding (``phase``: as ``encode_block``)."""
    out, pos = np.zeros((bands,) + tuple(shape), np.float32), 0
    for b in range(bands):
        if pos >= len(data):
            raise StreamError("a residual layer ends early")
        grid, pos = data[pos], pos + 1
        if grid == NONE:
            continue
        allowed = (FULL,) if b not in corsa_udf.GRID20_BANDS else (MEANS2,) if phase is not None else (FULL, MEANS2)
        if grid not in allowed:
            raise StreamError(f"a residual layer names grid {grid} for band {b}")
        pos, n = read_varint(data, pos, "a residual layer")
        if not n or pos + n > len(data):
            raise StreamError(f"a residual layer's codestream of {n} bytes where {len(data) - pos} are left")
        if grid == FULL:
            out[b] = decode(data[pos:pos + n], shape)
        else:
            py, px = phase or (0, 0)
            out[b] = _expanded(decode(data[pos:pos + n], (-(-(shape[0] + py) // 2), -(-(shape[1] + px) // 2))),
                               shape, (py, px))
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
