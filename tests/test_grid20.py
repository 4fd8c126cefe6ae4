"""Many sources hand the 20 m bands on the 10 m grid as 2 x 2 repeats of each pixel. The encoder finds, per
block, the phase of those cells (``corsa_udf.grid20_phase``) and stores it in the block's refinement stream
(formats 10 and 11); every reader sets each cell of the 20 m bands to the mean of its decoded pixels
(``corsa_udf.grid20_project``). Real scenes: Major-TOM's 20 m bands are so, TerraCodec's are not; a crop
one pixel off finds the other phase; the readers (the CLI, xarray, the engine's UDF) give the same pixels,
closer to the scene than without; damage to the phase is refused by name."""
import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.transform import Affine

import corsa_udf
from corsa.app import cli
from corsa.codec.latent_coder import StreamError
from corsa.codec.models import VariableRateCodec
from corsa.core.metrics import psnr
from corsa.formats import series, stream_format
from corsa.formats.datasets import LOADERS
from test_service import write_scene

MODEL = "corsa3.12"
B20 = list(corsa_udf.GRID20_BANDS)


@pytest.fixture(scope="module")
def majortom(data_root):
    return next(iter(LOADERS["majortom"](data_root)))


def _cells_constant(x: np.ndarray, py: int, px: int) -> bool:
    """Whether every 2 x 2 cell of phase (py, px) of (bands, h, w) holds one value (cells cut by the edges too)."""
    c = corsa_udf._cells(x.astype(np.float64), py, px, np.nan)
    ref = c[:, :, :1, :, :1]
    return bool(np.all(np.isnan(c) | (c == ref) | np.isnan(ref)))


def test_the_phase_of_the_20m_cells_is_found_where_they_are(majortom, data_root):
    data = majortom.data
    assert corsa_udf.grid20_phase(data[:, :512, :512], None) == 1
    # one pixel off in a direction: the phase that puts the cells back
    for (dy, dx), code in (((0, 1), 2), ((1, 0), 3), ((1, 1), 4)):
        assert corsa_udf.grid20_phase(data[:, dy:dy + 300, dx:dx + 300], None) == code
    # a 10 m band's detail does not count, a 20 m band's does
    other = data[:, :200, :200].copy()
    other[0, 5, 7] += 1
    assert corsa_udf.grid20_phase(other, None) == 1
    other[B20[2], 5, 7] += 1
    assert corsa_udf.grid20_phase(other, None) == 0
    # nodata pixels (0 in every band, cutting cells) do not count; without the mask they would
    cut = data[:, :200, :200].copy()
    cut[:, :, :33] = 0
    assert corsa_udf.grid20_phase(cut, (cut != 0).any(0)) == 1 and corsa_udf.grid20_phase(cut, None) == 0
    # resampled otherwise (TerraCodec's SSL4EO patches): none
    s = next(iter(LOADERS["terracodec"](data_root)))
    assert corsa_udf.grid20_phase(s.data, None) == 0


def test_the_projection_keeps_each_cell_mean_and_only_removes_error(majortom):
    truth = majortom.data[:, 100:300, 51:291].astype(np.float32)     # phase (0, 1) from its first pixel
    code = corsa_udf.grid20_phase(truth, None)
    assert code == 2
    rng = np.random.default_rng(0)
    decoded = truth + rng.normal(0, 40, truth.shape).astype(np.float32)
    before = decoded.copy()
    valid = np.ones(truth.shape[1:], bool)
    valid[:, :7] = False
    # the block's first pixel on the date's row 100, column 51: odd, so its own phase reads shifted
    corsa_udf.grid20_project(decoded, slice(0, 200), slice(0, 240), 1, (100, 51), valid)
    assert _cells_constant(np.where(valid, decoded, np.nan)[B20], 0, 1)
    np.testing.assert_array_equal(decoded[[0, 1, 2, 6]], before[[0, 1, 2, 6]])      # 10 m bands untouched
    np.testing.assert_array_equal(decoded[:, ~valid], before[:, ~valid])             # nodata untouched
    for b in B20:
        # the mean of a cell's valid pixels is kept; the error can only fall (a projection)
        assert abs(decoded[b][valid].mean() - before[b][valid].mean()) < 0.01
        assert ((decoded[b] - truth[b]) ** 2)[valid].sum() < 0.6 * ((before[b] - truth[b]) ** 2)[valid].sum()


def test_a_product_stores_each_blocks_phase_and_every_reader_applies_it(majortom, tmp_path):
    """Through the CLI on a crop of 2 x 2 blocks one pixel off the scene's cells: each block records phase 2,
    the file is format 10, the decoded 20 m bands are 2 x 2 cells at that phase, closer to the scene than
    the same product read without them; xarray and the embedded engine's UDF read the same pixels."""
    s = majortom
    data = s.data[:, 0:600, 1:701].copy()
    write_scene(tmp_path / "in.tif", data, Affine(*s.transform) * Affine.translation(1, 0), s.crs, s.date)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "p"), "--quality", "7", "-q"]) == 0
    codec = VariableRateCodec(MODEL)
    (path,) = (tmp_path / "p").glob("*.corsa")
    assert stream_format.read_header(path.read_bytes(), path.name)["version"] == 10
    stored = series.read_date(tmp_path / "p", s.date, codec)
    assert [r.grid20 for r in stored.refinement] == [2, 2, 2, 2]
    outs = {}
    for name, extra in (("block", []), ("engine", ["--engine"])):
        assert cli.main(["decompress", str(tmp_path / "p"), "-o", str(tmp_path / f"{name}.tif"), "-q", *extra]) == 0
        outs[name] = rasterio.open(tmp_path / f"{name}.tif").read()
    with xr.open_dataset(tmp_path / "p", engine="corsa", mask_and_scale=False) as ds:
        outs["xarray"] = ds.reflectance.isel(time=0).values
    np.testing.assert_array_equal(outs["block"], outs["engine"])
    np.testing.assert_array_equal(outs["block"], outs["xarray"])
    for rows in (slice(0, 512), slice(512, 600)):       # each block's cells, cut by its edges
        for cols in (slice(0, 512), slice(512, 700)):
            assert _cells_constant(outs["block"][B20][:, rows, cols], 0, 1)
    # the same refinement with no phase: what a reader without it would decode
    plain = stream_format.refine(codec.synthesis(stored.ints, 7, data.shape[1:]),
                                 [r._replace(grid20=0) for r in stored.refinement], codec.refiner, codec.level(7))
    gained = psnr(data[B20], outs["block"][B20]) - psnr(data[B20], np.clip(np.rint(plain[B20]), 0, 65535))
    assert gained > 0.3, gained


def test_damage_to_a_phase_is_refused_by_name(majortom):
    codec = VariableRateCodec(MODEL)
    data = majortom.data[:, :256, :256]
    rec = codec.synthesis(codec.encode(data, 5), 5, data.shape[1:])
    (block,) = stream_format.refinement_cells(codec.refiner, codec.level(5), data, rec, None)
    assert block.grid20 == 1
    stream = codec.refiner.encode(*block)
    assert codec.refiner.decode(stream, 10, block.cells.shape[1:]).same(block)
    for bad in (5, 255):
        with pytest.raises(StreamError, match="20 m grid"):
            codec.refiner.decode(bytes([bad]) + stream[1:], 10, block.cells.shape[1:])
    # format 8 streams have no phase byte: the same stream without it reads as phase 0 there
    assert codec.refiner.decode(stream[1:], 10, block.cells.shape[1:], grid20=False).same(block._replace(grid20=0))
    # a small block has none, as it has no loop filter: one that says otherwise is damage
    small = block._replace(cells=block.cells[:, :3], weights=None)
    with pytest.raises(stream_format.ProductError, match="20 m grid"):
        stream_format.decode_refinement(codec.refiner, codec.refiner.encode(*small), (slice(0, 40), slice(0, 256)),
                                        "x.corsa", 10)
