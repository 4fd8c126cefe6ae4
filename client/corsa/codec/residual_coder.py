"""A level's residual coded by JPEG 2000: what holds the gain over the classical codecs toward CF 10, where the
decoder saturates (BENCHMARKS.md, issue 28, twenty-third part; ``benchmarks.residual_layer`` measures it).

One band of one block at a time: its residual (truth - the product's decoding, DN; a 20 m band on its 2 x 2 means)
rounded to int16 and coded by OpenJPEG's fixed-quality mode at the target of ``targets`` that costs it least,
squared error plus lambda (DN² a bit) times the bits, or not at all (an empty stream) where no codestream takes
off more than it costs. A codestream is a raw J2K codestream (no JP2 box): the encoder needs imagecodecs, whose
OpenJPEG binding has the fixed-quality mode; readers decode with GDAL's JP2OpenJPEG driver, there with rasterio,
which gives the same integers.
"""
from __future__ import annotations

import warnings

import numpy as np

from corsa.codec.latent_coder import StreamError

TARGETS_DB = (56.0, 59.0, 62.0, 65.0, 68.0, 71.0, 74.0)   # OpenJPEG's PSNR targets against the 16-bit peak


def _int16(residual: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(residual), -(1 << 15), (1 << 15) - 1).astype(np.int16))


def encode(residual: np.ndarray, lam: float, weight: float = 1.0,
           targets: tuple[float, ...] = TARGETS_DB) -> tuple[bytes, np.ndarray]:
    """A band's residual (h, w) -> its codestream (b"" where none pays) and what readers decode from it.
    ``weight``: the pixels each value stands for (4 for a 20 m band's 2 x 2 means), so that its squared error
    counts as the 10 m grid's."""
    try:
        import imagecodecs
    except ImportError as e:  # the bench extra has it; readers do not need it
        raise RuntimeError("coding a residual layer needs imagecodecs (pip install imagecodecs)") from e

    values = _int16(residual)
    r = residual.astype(np.float64)
    best, kept = weight * float((r ** 2).sum()), (b"", np.zeros(residual.shape, np.float32))
    for target in targets:
        stream = imagecodecs.jpeg2k_encode(values, level=target, codecformat=imagecodecs.JPEG2K.CODEC.J2K)
        decoded = imagecodecs.jpeg2k_decode(stream).astype(np.float32)
        cost = weight * float(((r - decoded) ** 2).sum()) + lam * 8 * len(stream)
        if cost < best:
            best, kept = cost, (stream, decoded)
    return kept


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
