"""The CLI's block-by-block path for variable-rate models against the engine path (the published
process graphs): the same product bytes and the same decoded file, on a real scene of several
blocks whose overlaps matter (odd size, nodata across a block border)."""
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from corsa.app import cli
from corsa.formats import stream_format
from test_service import majortom, write_scene  # noqa: F401  (majortom: a fixture)

DATE = "2022-07-06"
SHAPE = (598, 1031)   # 2 x 3 blocks of 512 px, not multiples of 4


@pytest.fixture(scope="module")
def scene(tmp_path_factory, majortom):
    data = majortom.data[:, 7:7 + SHAPE[0], 11:11 + SHAPE[1]].copy()
    data[:, 480:540, 500:530] = 0          # nodata over the corner of four blocks
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    write_scene(path, data, Affine(*majortom.transform) * Affine.translation(11, 7), majortom.crs, DATE)
    return path, data


@pytest.fixture(scope="module")
def products(scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("products")
    for name, extra in (("blockwise", []), ("engine", ["--engine"])):
        assert cli.main(["compress", str(scene[0]), "-o", str(out / name), "--model", "corsa2.1",
                         "--quality", "5", *extra]) == 0
    return out


def test_blockwise_compress_writes_the_engines_bytes(products):
    (a,), (b,) = sorted((products / "blockwise").glob("*.corsa")), sorted((products / "engine").glob("*.corsa"))
    assert a.name == b.name == stream_format.file_name(DATE)
    assert len(stream_format.read_header(a.read_bytes(), a.name)["blocks"]) == 6
    assert a.read_bytes() == b.read_bytes()


def test_blockwise_decompress_writes_the_engines_file(products, scene, tmp_path):
    prod = products / "blockwise"
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "blockwise.tif")]) == 0
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "engine.tif"), "--engine"]) == 0
    with rasterio.open(tmp_path / "blockwise.tif") as a, rasterio.open(tmp_path / "engine.tif") as b:
        assert a.profile == b.profile and a.descriptions == b.descriptions
        decoded = a.read()
        np.testing.assert_array_equal(decoded, b.read())
    nodata = (scene[1] == 0).all(0)
    assert (decoded[:, nodata] == 0).all() and (decoded[:, ~nodata] > 0).any(0).mean() > 0.99
    assert not list(tmp_path.glob("*.part"))
    # the block path copies its COG from memory, the engine's from a file: the same bytes
    assert (tmp_path / "blockwise.tif").read_bytes() == (tmp_path / "engine.tif").read_bytes()


def test_the_decoded_cog_carries_the_overviews_of_its_pixels(products, tmp_path):
    """The overviews written beside the blocks (``results.cog_writer``): the COG driver's levels, each
    pixel the mean of the valid pixels of its cell (rounded half up), in a valid COG."""
    assert cli.main(["decompress", str(products / "blockwise"), "-o", str(tmp_path / "d.tif")]) == 0
    with rasterio.open(tmp_path / "d.tif") as f:
        assert f.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and f.overviews(1) == [2, 4]
        full = f.read().astype(np.float64)
    for level, k in enumerate((2, 4)):
        h, w = -(-SHAPE[0] // k), -(-SHAPE[1] // k)
        cells = np.zeros((10, h * k, w * k))
        cells[:, :SHAPE[0], :SHAPE[1]] = full
        total, count = cells.reshape(10, h, k, w, k).sum((2, 4)), (cells > 0).reshape(10, h, k, w, k).sum((2, 4))
        with rasterio.open(tmp_path / "d.tif", overview_level=level) as f:
            np.testing.assert_array_equal(f.read(), np.where(count > 0, np.floor(total / np.maximum(count, 1) + 0.5), 0))
    assert (count == 0).any() and (count < k * k).any() and (count == k * k).any()    # nodata cells, part and none


def test_blockwise_decompress_of_several_dates_names_them(products, tmp_path):
    prod = Path(products / "blockwise")
    second = prod.parent / "two"
    second.mkdir()
    data = (prod / stream_format.file_name(DATE)).read_bytes()
    (second / stream_format.file_name(DATE)).write_bytes(data)
    # a second date with the same integers, re-assembled under another date
    h = stream_format.read_header(data, "x")
    streams = [data[s:s + n] for s, n in stream_format.stream_offsets(h)]
    mask = stream_format.read_mask(data, h, "x")
    (second / stream_format.file_name("2022-07-11")).write_bytes(stream_format.assemble(
        streams, mask, h["quality"], h["transform"], h["crs"], "2022-07-11", h["model_id"],
        h["sha_prefix"] + "0" * 56))
    assert cli.main(["decompress", str(second), "-o", str(tmp_path / "one.tif")]) == 2
    assert cli.main(["decompress", str(second), "-o", str(tmp_path / "out")]) == 0
    names = sorted(p.name for p in (tmp_path / "out").glob("*.tif"))
    assert names == ["corsa_decoded_2022-07-06.tif", "corsa_decoded_2022-07-11.tif"]
    with rasterio.open(tmp_path / "out" / names[0]) as a, rasterio.open(tmp_path / "out" / names[1]) as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_integer_windows_are_copies_and_the_next_row_is_decoded_ahead(products):
    """A window of integers holds its own cells (a view into the blocks it was cut from kept them all
    alive while the window waited to be decoded) and equals the stored date's; with a pool, the block
    row after the window's is decoded ahead."""
    from concurrent.futures import ThreadPoolExecutor

    from corsa.blocks.blockwise import _Integers
    from corsa.codec.models import VariableRateCodec
    from corsa.formats import series

    codec = VariableRateCodec("corsa2.1")
    folder = products / "blockwise"
    whole = series.read_date(folder, DATE, codec).ints
    ints = _Integers(folder, DATE, codec)
    with ThreadPoolExecutor(1) as pool:
        top = ints.window(slice(0, 100), slice(100, 200), pool)       # block row 0, columns 0 and 1
        assert set(ints.rows) == {0, 1}                                 # row 1 asked for ahead
        across = ints.window(slice(100, 140), slice(20, 250), pool)   # rows 0-1, columns 0-1
    for w, (ys, xs) in ((top, (slice(0, 100), slice(100, 200))), (across, (slice(100, 140), slice(20, 250)))):
        assert w.flags.owndata
        np.testing.assert_array_equal(w, whole[:, ys, xs])
    np.testing.assert_array_equal(_Integers(folder, DATE, codec).window(slice(100, 140), slice(20, 250), None), across)


def test_the_shared_integers_are_those_of_each_window_encoded_alone(scene, tmp_path):
    """Compressing on this machine, the encoder runs once over units of a block row (``shared_ints``);
    on a cluster, each block's window is encoded alone. The default model's product (refined: each
    block decoded from its neighbours' cells too) is the same byte for byte, units of 2 blocks a side
    on a grid of 2 x 3 blocks, its edges not on the 4 px cells."""
    from corsa.blocks import blockwise, shared_ints
    from corsa.codec.models import DEFAULT_MODEL, VariableRateCodec
    from corsa.core import cluster
    from corsa.formats.sources import Catalogue

    codec = VariableRateCodec(DEFAULT_MODEL)
    quality = codec.default_quality
    assert codec.refines(quality) and shared_ints.UNIT_COLS < SHAPE[1]
    cube = Catalogue({"S2": scene[0]}).load("S2", bands=list(blockwise.BANDS))
    blockwise.compress(cube, codec, quality, tmp_path / "shared")
    with cluster.runner() as alone:
        blockwise.compress(cube, codec, quality, tmp_path / "alone", run=alone)
    (a,), (b,) = (sorted((tmp_path / k).glob("*.corsa")) for k in ("shared", "alone"))
    assert a.read_bytes() == b.read_bytes()


def test_units_read_their_input_with_gdals_cache_raised_for_the_rows_they_share(scene, tmp_path, monkeypatch):
    """A unit row reads 3 rows of its input's chunks and the next row 2 of them again: while a compress's
    units read, GDAL's block cache holds CACHED_CHUNK_ROWS rows of chunks of each date (at most CACHE_MAX),
    and is as it was afterwards; a GDAL_CACHEMAX the user set is left alone."""
    import corsa
    from rasterio.env import get_gdal_config
    from corsa.blocks import blockwise, shared_ints
    from corsa.codec.models import DEFAULT_MODEL, VariableRateCodec
    from corsa.formats.sources import Catalogue

    codec = VariableRateCodec(DEFAULT_MODEL)
    cube = Catalogue({"S2": scene[0]}).load("S2", bands=list(blockwise.BANDS))
    seen, read = [], shared_ints.read_window
    monkeypatch.setattr(shared_ints, "read_window", lambda *a: seen.append(get_gdal_config("GDAL_CACHEMAX")) or read(*a))
    before = get_gdal_config("GDAL_CACHEMAX")
    rows = cube.chunks[2][0]
    need = 12 * rows * SHAPE[1] * 10 * 2                       # 12 rows of chunks of 10 uint16 bands
    assert need > before
    monkeypatch.setattr(shared_ints, "CACHED_CHUNK_ROWS", 12)   # more than the scene has: above the 128 MB
    blockwise.compress(cube, codec, codec.default_quality, tmp_path / "p")
    assert seen and set(seen) == {need} and get_gdal_config("GDAL_CACHEMAX") == before
    monkeypatch.setattr(shared_ints, "CACHE_MAX", need // 2)
    with shared_ints.chunk_rows_cached([cube.isel(t=0)]):
        assert get_gdal_config("GDAL_CACHEMAX") == need // 2
    monkeypatch.setattr(corsa, "GDAL_CACHE_OURS", False)
    with shared_ints.chunk_rows_cached([cube.isel(t=0)]):
        assert get_gdal_config("GDAL_CACHEMAX") == before
