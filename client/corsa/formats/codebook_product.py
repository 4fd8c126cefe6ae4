"""The codebook family's products (corsa512): formats 1 and 2, GeoTIFF index grids, the one place
that writes and reads them (the variable-rate family's formats 3 to 13: ``corsa.formats.stream_format``).

Per date, in one folder:
  corsa_<date>_L0.tif   level-0 indices on the fine grid (20 m), uint16 (uint8 where they fit), ZSTD
  corsa_<date>_L1.tif   level-1 indices on the coarse grid (40 m)
  corsa_<date>_nodata.tif   only when the input had nodata: 1-bit mask on the 10 m input grid
Each file is an ordinary georeferenced GeoTIFF (the grids nest in the 10 m input grid: same origin,
pixel size x2 and x4) and carries tags naming the format, model (id + decoder sha256), bands,
input grid and date, so the files alone (plus the model) decode the scene. Since version 2 each
file also carries CORSA_PIXELS_CRC32, the CRC-32 of its pixels (row-major, little-endian, as stored),
so damage inside compressed data that still decodes is refused instead of decoded to a wrong image.
Version 1 products (no checksum) are still read.
Files are written under temporary names and renamed, L0 last: a date whose L0 exists is complete.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window

from corsa.codec.codebook import CodebookCodec
from corsa.core.files import writing
from corsa.core.scene import BANDS
from corsa.formats import product
from corsa.formats.product import REPLICA_CHUNK, grid_coords
from corsa.formats import stream_format
from corsa.formats.stream_format import shown as _shown

FORMAT = "corsa-product"
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")
# Full-width strips of 512 rows: no padding of partial tiles (which costs much on small scenes),
# and long runs for ZSTD. Byte-aligned indices (uint16, uint8 where they fit) compressed better
# than NBITS packing on real index maps (BENCHMARKS.md).
PROFILE = {"driver": "GTiff", "count": 1, "dtype": "uint16", "compress": "zstd", "zstd_level": 22,
           "blockysize": 512}
ProductError = product.ProductError


@dataclass
class ProductDate:
    date: str
    idx0: np.ndarray
    idx1: np.ndarray
    nodata: np.ndarray | None      # True where the input was nodata, on the input grid
    shape: tuple[int, int]         # input (y, x)
    transform: Affine | None
    crs: str | None
    model_id: str
    model_sha256: str


def file_names(date: str) -> dict[str, str]:
    return {k: f"corsa_{date}_{k}.tif" for k in ("L0", "L1", "nodata")}


def _tags(level: str, model_id: str, model_sha256: str, shape: tuple[int, int],
          transform: Affine | None, crs: str | None, date: str, has_mask: bool) -> dict[str, str]:
    return {
        "CORSA_FORMAT": FORMAT, "CORSA_FORMAT_VERSION": str(FORMAT_VERSION), "CORSA_LEVEL": level,
        "CORSA_MODEL_ID": model_id, "CORSA_MODEL_SHA256": model_sha256,
        "CORSA_BANDS": ",".join(BANDS), "CORSA_DATE": date,
        "CORSA_INPUT_SHAPE": json.dumps(list(shape)),
        "CORSA_INPUT_TRANSFORM": json.dumps(list(transform)[:6] if transform else None),
        "CORSA_INPUT_CRS": crs or "",
        "CORSA_NODATA": ("pixels whose 10 bands are all 0; decoded as 0; mask in "
                         + file_names(date)["nodata"]) if has_mask else "none in the input",
    }


class DateWriter:
    """One date of the product, written from blocks of index cells as they are computed.

    The index grids (0.625 byte per input pixel) stay in memory until ``finish``, when their
    dtype is known; the nodata mask (10 m grid, the bulk) goes to disk block by block and only
    once a block has nodata, so memory does not grow with the mask. Files are written under
    temporary names and renamed in ``finish``, L0 last: a date whose L0 exists is complete."""

    def __init__(self, folder: Path, date: str, shape: tuple[int, int], transform: Affine | None,
                 crs: str | None, model_id: str, model_sha256: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.date, self.shape = folder, date, tuple(shape)
        self.transform, self.crs, self.model_id, self.model_sha256 = transform, crs, model_id, model_sha256
        self.names = file_names(date)
        h4, w4 = -(-self.shape[0] // 4), -(-self.shape[1] // 4)
        self.idx0 = np.zeros((2 * h4, 2 * w4), np.uint16)
        self.idx1 = np.zeros((h4, w4), np.uint16)
        self._mask = None  # the open mask file, from the first block with nodata on
        self._parts: list[tuple[Path, Path]] = []
        for name in self.names.values():  # left by a run that was killed: never part of a product
            (folder / (name + ".part")).unlink(missing_ok=True)

    def add(self, y: int, x: int, idx0: np.ndarray, idx1: np.ndarray, nodata: np.ndarray) -> None:
        """Cells of a block whose top-left 10 m pixel is (y, x), both multiples of 4."""
        if y % 4 or x % 4:
            raise ValueError(f"blocks start on level-1 cells (multiples of 4 px), not at ({y}, {x})")
        self.idx0[y // 2:y // 2 + idx0.shape[0], x // 2:x // 2 + idx0.shape[1]] = idx0
        self.idx1[y // 4:y // 4 + idx1.shape[0], x // 4:x // 4 + idx1.shape[1]] = idx1
        if nodata.any():
            with writing(self.folder / self.names["nodata"]):
                self._mask_file().write(nodata.astype(np.uint8)[None],
                                        window=Window(x, y, nodata.shape[1], nodata.shape[0]))

    def _mask_file(self):
        if self._mask is None:
            self._mask_part = self._part("nodata")
            self._mask = rasterio.open(self._mask_part, "w", **_profile(
                self.shape, self.transform, self.crs, dtype="uint8", nbits=1, compress="deflate"))
        return self._mask

    def _part(self, level: str) -> Path:
        part = self.folder / (self.names[level] + ".part")
        self._parts.append((part, self.folder / self.names[level]))
        return part

    def finish(self) -> list[Path]:
        """Write the index files, close the mask, rename everything into place; the final paths."""
        try:
            with writing(self.folder / self.names["L0"]):
                return self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> list[Path]:
        has_mask = self._mask is not None
        tags = {level: _tags(level, self.model_id, self.model_sha256, self.shape, self.transform, self.crs,
                             self.date, has_mask) for level in ("nodata", "L1", "L0")}
        if has_mask:
            self._mask.close()
            # The mask went to disk block by block: its checksum is taken by reading it back.
            with rasterio.open(self._mask_part, "r+") as dst:
                dst.update_tags(**tags["nodata"], CORSA_PIXELS_CRC32=_file_crc32(dst))
        for level, idx, scale in (("L1", self.idx1, 4), ("L0", self.idx0, 2)):
            tr = self.transform * Affine.scale(scale) if self.transform is not None else None
            stored = idx.astype("uint8" if int(idx.max(initial=0)) < 256 else "<u2")
            with rasterio.open(self._part(level), "w", **_profile(idx.shape, tr, self.crs,
                                                                  dtype=stored.dtype.name)) as dst:
                dst.write(stored, 1)
                dst.update_tags(**tags[level], CORSA_PIXELS_CRC32=pixels_crc32(stored))
        for part, final in self._parts:  # in the order written: L0 last
            part.replace(final)
        if not has_mask:  # a mask of an earlier run of this date; read_date ignores it, as L0 says
            (self.folder / self.names["nodata"]).unlink(missing_ok=True)
        return [final for _, final in self._parts]

    def abort(self) -> None:
        """Remove what was written: nothing of an unfinished date is left behind."""
        if self._mask is not None and not self._mask.closed:
            self._mask.close()
        for part, _ in self._parts:
            part.unlink(missing_ok=True)


def pixels_crc32(pixels: np.ndarray, crc: int = 0) -> str:
    """CORSA_PIXELS_CRC32 of a band's pixels (continuing ``crc`` for the rows that follow it)."""
    return f"{zlib.crc32(np.ascontiguousarray(pixels, pixels.dtype.newbyteorder('<')).tobytes(), crc):08x}"


def _file_crc32(src, rows: int = PROFILE["blockysize"]) -> str:
    """pixels_crc32 of a file's band, read a strip of rows at a time (memory stays bounded)."""
    crc = 0
    for y in range(0, src.height, rows):
        crc = int(pixels_crc32(src.read(1, window=Window(0, y, src.width, min(rows, src.height - y))), crc), 16)
    return f"{crc:08x}"


def _profile(shape: tuple[int, int], transform: Affine | None, crs: str | None, **profile) -> dict:
    kw = {**PROFILE, **profile, "width": shape[1], "height": shape[0]}
    if transform is not None:
        kw["transform"] = transform
    if crs:
        kw["crs"] = crs
    return kw


def write_date(folder: Path, date: str, idx0: np.ndarray, idx1: np.ndarray, nodata: np.ndarray,
               transform: Affine | None, crs: str | None, model_id: str, model_sha256: str) -> list[Path]:
    """Write one date's files from whole index grids; returns their final paths."""
    writer = DateWriter(folder, date, nodata.shape, transform, crs, model_id, model_sha256)
    try:
        writer.add(0, 0, idx0, idx1, nodata)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


# The largest input grid a product may declare (about nine 10980 px Sentinel-2 tiles): a corrupt
# header or tag must not make the reader allocate without bound.
MAX_INPUT_PIXELS = 1 << 30
# What GDAL raises on damaged files: rasterio's errors (CRSError is a ValueError of its own), and CPLE_* errors.
_GDAL_ERRORS = (rasterio.errors.RasterioError, rasterio.errors.CRSError, CPLE_BaseError)


def level_shape(shape: tuple[int, int], level: str) -> tuple[int, int]:
    """Shape of a product file's grid for an input grid of ``shape`` (y, x)."""
    if level == "nodata":
        return tuple(shape)
    cells = (-(-shape[0] // 4), -(-shape[1] // 4))
    k = 2 if level == "L0" else 1
    return cells[0] * k, cells[1] * k


def _input_grid(tags: dict, name: str) -> tuple[tuple[int, int], Affine | None]:
    """The input grid a product file's tags declare, checked before any pixel is read."""
    if tags.get("CORSA_FORMAT") != FORMAT:
        raise ProductError(f"{name} is not a {FORMAT} file (no CORSA_FORMAT tag)")
    if tags.get("CORSA_FORMAT_VERSION") not in READABLE_VERSIONS:
        raise ProductError(f"{name} has format version {_shown(tags.get('CORSA_FORMAT_VERSION'))}, "
                           f"this reader knows {', '.join(READABLE_VERSIONS)}")
    try:
        shape, tr = json.loads(tags["CORSA_INPUT_SHAPE"]), json.loads(tags["CORSA_INPUT_TRANSFORM"])
    except (KeyError, ValueError) as e:
        raise ProductError(f"{name} has no valid input grid tags: {e}") from e
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise ProductError(f"{name}: CORSA_INPUT_SHAPE {_shown(tags['CORSA_INPUT_SHAPE'])} is not [height, width]")
    if shape[0] * shape[1] > MAX_INPUT_PIXELS:
        raise ProductError(f"{name} declares an input grid of {shape[0]} x {shape[1]} px, more than the "
                           f"{MAX_INPUT_PIXELS:,} px this reader accepts (corrupt tag?)")
    if tr is not None and not (isinstance(tr, list) and len(tr) == 6 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in tr)):
        raise ProductError(f"{name}: CORSA_INPUT_TRANSFORM {_shown(tags['CORSA_INPUT_TRANSFORM'])} is not 6 numbers")
    return (shape[0], shape[1]), (Affine(*tr) if tr else None)


def _read_tif(path: Path, level: str) -> tuple[np.ndarray, dict, str | None]:
    """Pixels, tags and CRS of one product file. Its tags are checked and the header's size compared
    with the grid they imply before reading, so a corrupt file cannot make us allocate without bound.
    GDAL may open a truncated file and fail only on a block: every GDAL error becomes a ProductError."""
    if not path.is_file():
        raise ProductError(f"{path.name} is missing from {path.parent}")
    try:
        with rasterio.open(path) as src:
            tags = src.tags()
            expect = level_shape(_input_grid(tags, path.name)[0], level)
            if tags.get("CORSA_LEVEL") != level:
                raise ProductError(f"{path.name} is tagged as level {_shown(tags.get('CORSA_LEVEL'))}, not {level}")
            if src.count != 1 or src.dtypes[0] not in ("uint8", "uint16"):
                raise ProductError(f"{path.name} holds {src.count} band(s) of {src.dtypes[0]}, "
                                   "expected one uint8 or uint16 band")
            if src.shape != expect:
                raise ProductError(f"{path.name} is {src.height} x {src.width} px, its input grid tags imply "
                                   f"{expect[0]} x {expect[1]}")
            pixels = src.read(1)
            if tags["CORSA_FORMAT_VERSION"] != "1" and pixels_crc32(pixels) != tags.get("CORSA_PIXELS_CRC32"):
                raise ProductError(f"{path.name}: its pixels do not match their checksum CORSA_PIXELS_CRC32 "
                                   f"{_shown(tags.get('CORSA_PIXELS_CRC32'))} (damaged file?)")
            return pixels, tags, (src.crs.to_string() if src.crs else None)
    except _GDAL_ERRORS as e:
        raise ProductError(f"{path} is not a readable GeoTIFF (truncated or corrupt?): {e}") from e


def dates_in(folder: Path) -> list[str]:
    """Complete dates in a product folder (those whose L0 file exists; .part files are unfinished)."""
    if not folder.is_dir():
        raise ProductError(f"{folder} is not a product folder")
    return sorted(p.name[len("corsa_"):-len("_L0.tif")] for p in folder.glob("corsa_*_L0.tif"))


# Tags that all files of one date share.
_SHARED_TAGS = ("CORSA_FORMAT_VERSION", "CORSA_MODEL_ID", "CORSA_MODEL_SHA256", "CORSA_BANDS", "CORSA_INPUT_SHAPE",
                "CORSA_INPUT_TRANSFORM", "CORSA_INPUT_CRS", "CORSA_DATE", "CORSA_NODATA")


def _checked_crs(tags: dict, header_crs: str | None, name: str) -> str | None:
    """The CRS the tags declare, which the file's own header must agree with (version 2): a damaged
    GeoKey directory would otherwise give the decoded scene another CRS, or none, without a word."""
    if tags["CORSA_FORMAT_VERSION"] == "1":
        return header_crs
    declared = tags.get("CORSA_INPUT_CRS") or None
    try:
        same = declared == header_crs or (declared is not None and header_crs is not None
                                          and CRS.from_user_input(declared) == CRS.from_user_input(header_crs))
    except rasterio.errors.CRSError:
        same = False
    if not same:
        raise ProductError(f"{name}: its header's CRS {_shown(header_crs)} differs from CORSA_INPUT_CRS "
                           f"{_shown(declared)} (damaged file?)")
    return declared


def read_date(folder: Path, date: str) -> ProductDate:
    names = file_names(date)
    idx0, tags0, crs = _read_tif(folder / names["L0"], "L0")
    idx1, tags1, _ = _read_tif(folder / names["L1"], "L1")
    if any(tags0.get(k) != tags1.get(k) for k in _SHARED_TAGS):
        raise ProductError(f"{names['L0']} and {names['L1']} do not belong together (tags differ)")
    if tags0.get("CORSA_DATE") != date:
        raise ProductError(f"{names['L0']} is tagged with date {_shown(tags0.get('CORSA_DATE'))}, not {date}")
    if tags0.get("CORSA_BANDS") != ",".join(BANDS):
        raise ProductError(f"{names['L0']} holds bands {_shown(tags0.get('CORSA_BANDS'))}, expected {','.join(BANDS)}")
    if "CORSA_MODEL_SHA256" not in tags0:
        raise ProductError(f"{names['L0']} does not name the model that wrote it (CORSA_MODEL_SHA256)")
    shape, transform = _input_grid(tags0, names["L0"])
    crs = _checked_crs(tags0, crs, names["L0"])
    nodata = None
    # A mask file is read only when the date's tags name it: one left from an older run is not ours.
    if "mask in" in tags0.get("CORSA_NODATA", ""):
        mask, tags_m, _ = _read_tif(folder / names["nodata"], "nodata")
        if any(tags_m.get(k) != tags0.get(k) for k in _SHARED_TAGS):
            raise ProductError(f"{names['nodata']} and {names['L0']} do not belong together (tags differ)")
        nodata = mask.astype(bool)
    return ProductDate(date, idx0, idx1, nodata, shape, transform, crs,
                       tags0.get("CORSA_MODEL_ID", ""), tags0["CORSA_MODEL_SHA256"])


def model_of(folder: Path) -> str:
    """The model id a format-1/2 product's first date names (its L0 file's tag)."""
    dates = dates_in(folder)
    if not dates:
        raise ProductError(f"{folder} holds no complete compressed date (corsa_<date>_L0.tif)")
    path = Path(folder) / file_names(dates[0])["L0"]
    try:
        with rasterio.open(path) as src:
            model = src.tags().get("CORSA_MODEL_ID")
    except (rasterio.errors.RasterioError, CPLE_BaseError) as e:
        raise ProductError(f"{path.name} is not a readable GeoTIFF (truncated or corrupt?): {e}") from None
    if not model:
        raise ProductError(f"{Path(folder) / file_names(dates[0])['L0']} names no model (tag CORSA_MODEL_ID): give --model")
    return model


def product_bytes(folder: Path, date: str) -> int:
    """Bytes on disk of one date's files: what the CF is measured on."""
    return sum((folder / n).stat().st_size for n in file_names(date).values() if (folder / n).exists())


INDEX_BANDS = ("idx0", "idx1", "nodata")


class _FileBand:
    """Band 1 of a product file as an array that dask reads window by window: a decode holds the
    blocks it is computing, not the scene's index grids or mask (memory bounded by chunk size)."""

    def __init__(self, path: Path, shape: tuple[int, int], dtype: str):
        self.path, self.shape, self.dtype, self.ndim = path, shape, np.dtype(dtype), 2

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        with rasterio.open(self.path) as src:
            return src.read(1, window=Window.from_slices(ys, xs, height=self.shape[0], width=self.shape[1]))

    def lazy(self, chunks: int):
        import dask.array as darr

        # Named by the file and its modification: dask would otherwise hash the object itself.
        stat = self.path.stat()
        name = f"corsa-{self.path}-{stat.st_mtime_ns}-{stat.st_size}"
        return darr.from_array(self, chunks=chunks, name=name, meta=np.empty((0, 0), self.dtype))


def date_cube(folder: Path, date: str):
    """One product date as a lazy (t, [idx0, idx1, nodata], y, x) cube on the 10 m input grid.

    The date is checked as ``read_date`` does (tags, sizes, checksums); then its indices are read
    from the files block by block as chunks are computed and replicated over their cells."""
    import dask.array as darr
    import pandas as pd
    import xarray as xr

    d = read_date(folder, date)
    names, (h, w) = file_names(date), d.shape
    levels = [(_FileBand(folder / names["L0"], d.idx0.shape, d.idx0.dtype), 2),
              (_FileBand(folder / names["L1"], d.idx1.shape, d.idx1.dtype), 4)]
    nodata = (_FileBand(folder / names["nodata"], d.shape, "uint8").lazy(REPLICA_CHUNK) if d.nodata is not None
              else darr.zeros((h, w), np.uint8, chunks=REPLICA_CHUNK))
    rep = [darr.repeat(darr.repeat(band.lazy(REPLICA_CHUNK // f), f, axis=0), f, axis=1)[:h, :w].astype(np.uint16)
           for band, f in levels]
    data = darr.stack([*rep, nodata.astype(np.uint16)])[None]
    t = pd.DatetimeIndex([pd.NaT if d.date == "undated" else pd.Timestamp(d.date)])
    cube = xr.DataArray(data, dims=("t", "bands", "y", "x"),
                        coords={"t": t, "bands": list(INDEX_BANDS), **grid_coords(d.shape, d.transform)},
                        attrs={"corsa_model_id": d.model_id, "corsa_decoder_sha256": d.model_sha256})
    cube = cube.rio.write_crs(d.crs) if d.crs else cube
    # A side of 1 px has no coordinate spacing to compute the grid from: carry the transform.
    return cube.rio.write_transform(d.transform) if d.transform is not None else cube


def check_model(d: ProductDate, decoder_sha256: str, model_id: str) -> None:
    """Refuse to decode a product with a model other than the one that wrote it."""
    if d.model_sha256 != decoder_sha256:
        raise ProductError(f"date {d.date} was written with model {_shown(d.model_id)} (decoder sha256 "
                           f"{d.model_sha256[:12]}...), the available model {model_id!r} has "
                           f"{decoder_sha256[:12]}...: decoding would give wrong reflectances")


def opened(folder: Path, model: str | None, network: str = "decoder") -> tuple[CodebookCodec, list[str]]:
    """A format 1-2 product's model (``model``, else the one its files name) and its dates, each
    checked now against that model: a date it cannot decode is refused by name before any runs.
    The ``network`` the caller runs ("decoder" or "features_session") is loaded first, so a broken
    model file is reported as such rather than as a product written by another model."""
    codec = CodebookCodec(model or model_of(folder))
    getattr(codec, network)
    dates = dates_in(folder)
    if not dates:
        raise ProductError(f"{folder} holds no complete compressed date "
                           f"(corsa_<date>_L0.tif or corsa_<date>{stream_format.SUFFIX})")
    for date in dates:
        d = read_date(folder, date)
        check_model(d, codec.card["files"]["decoder"]["sha256"], codec.model_id)
        try:
            codec.check_indices(d.idx0, d.idx1)
        except ValueError as e:
            raise ProductError(f"date {date} of {folder}: {e} (corrupt product?)") from e
    return codec, dates
