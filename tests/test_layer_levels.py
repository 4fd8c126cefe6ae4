"""Levels made of a base level and a residual layer (corsa4.2's 10-12: corsa4.1's level 9 and a JPEG 2000 layer a
block, formats 12 and 13) on a real Major-TOM crop of 2 x 2 blocks with a nodata corner and a real WorldStrat
series: ``corsa compress`` writes what the whole-date path writes, readers (the CLI, xarray) add the layer, nodata
stays 0, the file is the base level's plus its layers, reduce drops a layer (to the base: the base's bytes) or
codes it again, the embedded engine (which decodes the services' way) refuses the product by name, a damaged
layer is refused by name."""
import struct
import zlib

import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.transform import Affine

pytest.importorskip("imagecodecs")

from corsa.app import cli
from corsa.codec import residual_coder
from corsa.codec.latent_coder import StreamError
from corsa.codec.models import VariableRateCodec
from corsa.core.metrics import psnr
from corsa.formats import series, stream_format
from corsa.formats.datasets import LOADERS, revisit_series
from test_service import majortom, write_scene  # noqa: F401,F811  (a fixture)

MODEL, LEVEL = "corsa4.2", 11


def _read(path):
    with rasterio.open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def crop(majortom, tmp_path_factory):
    data = majortom.data[:, 200:800, 100:660].copy()           # 600 x 560 px: 2 x 2 blocks
    data[:, :40, :64] = 0                                       # a nodata corner
    folder = tmp_path_factory.mktemp("layer")
    write_scene(folder / "in.tif", data, Affine(*majortom.transform) * Affine.translation(100, 200), majortom.crs,
                majortom.date)
    for q in (9, LEVEL):
        assert cli.main(["compress", str(folder / "in.tif"), "-o", str(folder / f"p{q}"), "--model", MODEL,
                         "--quality", str(q), "-q"]) == 0
        assert cli.main(["decompress", str(folder / f"p{q}"), "-o", str(folder / f"d{q}.tif"), "-q"]) == 0
    return data, folder, majortom.date


def test_the_cli_writes_the_base_and_a_layer_a_block_and_readers_add_it(crop, capsys):
    data, folder, date = crop
    codec = VariableRateCodec(MODEL)
    assert codec.layer(LEVEL) == (9, 2000.0) and codec.base(LEVEL) == 9 and codec.layer(9) is None
    name = stream_format.file_name(date)
    base, layered = (folder / f"p{q}" / name for q in (9, LEVEL))
    h = stream_format.read_header(layered.read_bytes(), layered.name)
    assert (h["version"], h["quality"], h["layer_quality"], len(h["layer_lengths"])) == (12, 9, LEVEL, 4)
    # the base level's file, byte for byte, then the layers
    hb = stream_format.read_header(base.read_bytes(), base.name)
    raw = layered.read_bytes()
    assert raw[h["payload"]:-4 - sum(h["layer_lengths"])] == base.read_bytes()[hb["payload"]:-4]
    assert all(h["layer_lengths"])
    nodata = (data == 0).all(0)
    ints = codec.quantise(codec.latent(data.astype(np.float32), 9), 9)
    whole, pixels = stream_format.decoded_date(codec, data, ints, LEVEL, nodata, date=date)
    decoded = _read(folder / f"d{LEVEL}.tif")
    np.testing.assert_array_equal(decoded, pixels)             # the whole-date path's pixels
    hw = stream_format.read_header(whole, name)
    assert [whole[a:a + n] for a, n in stream_format.layer_offsets(hw)] == [raw[a:a + n] for a, n in stream_format.layer_offsets(h)]
    assert not decoded[:, nodata].any()
    gain = psnr(data, decoded) - psnr(data, _read(folder / "d9.tif"))
    assert gain > 1.0, gain
    with xr.open_dataset(folder / f"p{LEVEL}", engine="corsa", mask_and_scale=False) as ds:
        np.testing.assert_array_equal(ds.reflectance.isel(time=0).values, decoded)
        assert int(ds["quality"].values[0]) == LEVEL
    capsys.readouterr()
    assert cli.main(["info", str(folder / f"p{LEVEL}")]) == 0
    out = capsys.readouterr().out
    assert f"quality {LEVEL}," in out and f"residual layer {sum(h['layer_lengths']):,} bytes" in out


def test_reduce_drops_a_layer_or_codes_it_again(crop, tmp_path):
    data, folder, date = crop
    assert cli.main(["reduce", str(folder / f"p{LEVEL}"), "-o", str(tmp_path / "r9"), "--quality", "9", "-q"]) == 0
    name = stream_format.file_name(date)
    assert (tmp_path / "r9" / name).read_bytes() == (folder / "p9" / name).read_bytes()
    assert cli.main(["reduce", str(folder / f"p{LEVEL}"), "-o", str(tmp_path / "r10"), "--quality", "10", "-q"]) == 0
    h = stream_format.read_header((tmp_path / "r10" / name).read_bytes(), name)
    assert (h["quality"], h["layer_quality"]) == (9, 10)
    assert cli.main(["decompress", str(tmp_path / "r10"), "-o", str(tmp_path / "r10.tif"), "-q"]) == 0
    assert psnr(data, _read(folder / "d9.tif")) < psnr(data, _read(tmp_path / "r10.tif")) < psnr(data, _read(folder / f"d{LEVEL}.tif"))
    assert (tmp_path / "r10" / name).stat().st_size < (folder / f"p{LEVEL}" / name).stat().st_size


def test_the_engine_refuses_a_layered_product_by_name_and_clear_masks_its_layered_decoding(crop, tmp_path, capsys):
    _, folder, _ = crop
    assert cli.main(["decompress", str(folder / f"p{LEVEL}"), "-o", str(tmp_path / "e.tif"), "--engine"]) != 0
    assert "residual layer" in capsys.readouterr().err and not (tmp_path / "e.tif").exists()
    # --clear: the layered decoding, 0 where the product's scene classes (those of the classify service) say cloud
    # or shadow; on the base level, blocks and their edges as corsa_openeo_decompress_clear gives them
    assert cli.main(["decompress", str(folder / f"p{LEVEL}"), "-o", str(tmp_path / "c.tif"), "--clear", "-q"]) == 0
    said = capsys.readouterr().out
    assert cli.main(["classify", str(folder / f"p{LEVEL}"), "-o", str(tmp_path / "k.tif"), "-q"]) == 0
    clear, decoded, classes = _read(tmp_path / "c.tif"), _read(folder / f"d{LEVEL}.tif"), _read(tmp_path / "k.tif")[0]
    assert f"pixels 0 (cloud, cloud shadow or nodata): {100 * (clear[0] == 0).mean():.1f}%" in said
    unusable = np.repeat(np.repeat(classes > 4, 2, 0), 2, 1)[:clear.shape[1], :clear.shape[2]]
    assert 0 < unusable.mean() < 1
    np.testing.assert_array_equal(clear, np.where(unusable, 0, decoded))
    # rendered onto pixels twice as large: what is left is averaged, a pixel all cleared stays 0
    assert cli.main(["decompress", str(folder / f"p{LEVEL}"), "-o", str(tmp_path / "c2.tif"), "--clear", "--scale", "0.5",
                     "-q"]) == 0
    half = _read(tmp_path / "c2.tif")
    gone = (clear == 0).all(0)
    np.testing.assert_array_equal((half == 0).all(0), gone[:2 * half.shape[1]:2, :2 * half.shape[2]:2]
                                  & gone[1::2, 1::2] & gone[::2, 1::2] & gone[1::2, ::2])
    for engine in ([], ["--engine"]):
        assert cli.main(["decompress", str(folder / "p9"), "-o", str(tmp_path / f"c9{len(engine)}.tif"), "--clear", "-q",
                         *engine]) == 0
    np.testing.assert_array_equal(_read(tmp_path / "c90.tif"), _read(tmp_path / "c91.tif"))


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_a_damaged_layer_is_refused_by_name(crop, tmp_path, capsys):
    _, folder, date = crop
    name = stream_format.file_name(date)
    raw = (folder / f"p{LEVEL}" / name).read_bytes()
    h = stream_format.read_header(raw, name)
    start, n = stream_format.layer_offsets(h)[0]
    (tmp_path / "bad").mkdir()
    body = bytearray(raw[:-4])
    body[start] = 7                                             # the first band's grid: no such grid
    (tmp_path / "bad" / name).write_bytes(_with_crc(bytes(body)))
    assert cli.main(["decompress", str(tmp_path / "bad"), "-o", str(tmp_path / "bad.tif")]) != 0
    err = capsys.readouterr().err
    assert "residual layer names grid 7" in err and name in err and not (tmp_path / "bad.tif").exists()
    with pytest.raises(StreamError, match="past its last band"):
        residual_coder.decode_block(raw[start:start + n] + b"\x00", 10, (512, 512))
    with pytest.raises(StreamError, match="grid 1 for band 0"):
        residual_coder.decode_block(bytes([residual_coder.MEANS2]) + raw[start + 1:start + n], 10, (512, 512))
    # a header that makes a layer of a level not above its base
    r = stream_format._Reader(raw, name)
    r.take(4)
    head_len = r.varint()
    at = r.pos + head_len - 1 - sum(len(stream_format._varint(v)) for v in h["layer_lengths"])
    body = bytearray(raw[:-4])
    body[at] = 9
    with pytest.raises(stream_format.ProductError, match="makes level 9 of a date of level 9"):
        stream_format.read_header(_with_crc(bytes(body)), name)


def test_a_series_gets_its_layers_on_its_dates_coded_with_references(data_root, tmp_path):
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == "Landcover-31746"])
    (tmp_path / "in").mkdir()
    for s in run[:3]:
        write_scene(tmp_path / "in" / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "p"), "--model", MODEL, "--quality", "10",
                     "-q"]) == 0
    assert cli.main(["decompress", str(tmp_path / "p"), "-o", str(tmp_path / "d"), "-q"]) == 0
    codec = VariableRateCodec(MODEL)
    versions = []
    for s in run[:3]:
        name = stream_format.file_name(s.date)
        h = stream_format.read_header((tmp_path / "p" / name).read_bytes(), name)
        versions.append(h["version"])
        assert h["layer_quality"] == 10
        stored = series.read_date(tmp_path / "p", s.date, codec)
        _, pixels = stream_format.decoded_date(codec, s.data, stored.ints, 10, s.nodata_mask, date=s.date)
        np.testing.assert_array_equal(_read(tmp_path / "d" / f"corsa_decoded_{s.date}.tif"), pixels)
    assert versions[0] == 12 and 13 in versions


def test_appended_dates_continue_the_products_model_and_level(data_root, tmp_path, capsys):
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == "Landcover-31746"])
    for k, part in (("first", run[:2]), ("later", run[2:3])):
        (tmp_path / k).mkdir()
        for s in part:
            write_scene(tmp_path / k / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    p = tmp_path / "p"
    assert cli.main(["compress", str(tmp_path / "first"), "-o", str(p), "--model", MODEL, "--quality", "10", "-q"]) == 0
    before = {f.name: f.read_bytes() for f in p.iterdir()}
    # another model's dates cannot join it: refused by name, nothing written
    assert cli.main(["compress", str(tmp_path / "later"), "-o", str(p), "--append", "--model", "corsa3.12", "-q"]) == 2
    assert f"cannot append to {p} with model 'corsa3.12'" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in p.iterdir()} == before
    # without --model and --quality: corsa4.2 at level 10, not the default model's default level
    assert cli.main(["compress", str(tmp_path / "later"), "-o", str(p), "--append", "-q"]) == 0
    heads = [series.header(p, d)[1] for d in stream_format.dates_in(p)]
    assert [(h["model_id"], stream_format.level_of(h)) for h in heads] == [(MODEL, 10)] * 3
    assert cli.main(["decompress", str(p), "-o", str(tmp_path / "d"), "-q"]) == 0
    assert len(list((tmp_path / "d").glob("*.tif"))) == 3


def test_a_compress_job_at_a_layered_level_stores_and_packs_its_base(crop, tmp_path):
    from corsa.codec.models import read_card
    from corsa.formats.sources import Catalogue
    from corsa.openeo import processes
    from corsa.openeo.engine import Engine

    _, folder, date = crop
    path, card = read_card(MODEL)
    Engine(Catalogue({"SENTINEL2_L2A": folder / "in.tif"}), output=tmp_path / "job").run(
        processes.compress_s2_process(card, 10.0), spatial_extent=None, temporal_extent=None, max_cloud_cover=80,
        model=str(path), quality=LEVEL)
    assert cli.main(["pack", str(tmp_path / "job"), "-o", str(tmp_path / "packed"), "--model", MODEL,
                     "--quality", str(LEVEL), "-q"]) == 0
    name = stream_format.file_name(date)
    assert (tmp_path / "packed" / name).read_bytes() == (folder / "p9" / name).read_bytes()


def test_the_shipped_card_is_what_its_command_builds(tmp_path):
    import json
    import shlex

    from corsa.codec.models import read_card
    from training import layer_levels

    _, shipped = read_card(MODEL)
    argv = shlex.split(shipped["layer"]["command"])[3:] + ["--out", str(tmp_path), "--no-figures"]
    built = json.loads((layer_levels.main(argv) / "model_card.json").read_text())
    assert built["files"] == shipped["files"] and built["layer"]["levels"] == shipped["layer"]["levels"]
    assert [q.get("layer") for q in built["qualities"]] == [q.get("layer") for q in shipped["qualities"]]
    assert built["int8"]["levels"] == shipped["int8"]["levels"] == list(range(1, 10))


def test_a_level_the_default_lacks_is_refused_with_the_model_that_has_it(crop, tmp_path, capsys):
    _, folder, _ = crop
    assert cli.main(["compress", str(folder / "in.tif"), "-o", str(tmp_path / "p"), "--quality", str(LEVEL)]) != 0
    assert f"not {LEVEL} (level {LEVEL}: --model {MODEL})" in capsys.readouterr().err and not (tmp_path / "p").exists()
