"""The service end to end on real scenes: CLI -> process graphs -> engine -> product -> back."""

import numpy as np
import pytest
import rasterio
import corsa_udf
from rasterio.transform import Affine

from benchmarks.seams import border_mask, seam_figures
from corsa.app import cli
from corsa.formats import codebook_product
from corsa.codec.codebook import CodebookCodec
from corsa.formats.datasets import LOADERS
from corsa.core.metrics import psnr
from corsa.core.scene import BANDS
from conftest import stored_files


def write_scene(path, data, transform, crs, date=None):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=len(BANDS),
                       dtype="uint16", transform=transform, crs=crs) as dst:
        dst.write(data)
        for i, b in enumerate(BANDS, 1):
            dst.set_band_description(i, b)
        if date:
            dst.update_tags(TIFFTAG_DATETIME=f"{date.replace('-', ':')} 10:00:00")


@pytest.fixture(scope="module")
def majortom(data_root):
    return next(LOADERS["majortom"](data_root))


@pytest.fixture(scope="module")
def codec():
    return CodebookCodec("corsa512")


def test_round_trip_odd_size_with_nodata(tmp_path, majortom, codec):
    data = majortom.data[:, 100:401, 200:457].copy()          # 301 x 257: not a multiple of 4
    data[:, :20, :35] = 0                                       # a nodata corner
    tr = Affine(*majortom.transform) * Affine.translation(200, 100)
    write_scene(tmp_path / "in.tif", data, tr, majortom.crs, "2022-07-06")
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "prod"), "--model", "corsa512"]) == 0

    names = codebook_product.file_names("2022-07-06")
    assert {p.name for p in stored_files(tmp_path / "prod")} == set(names.values())
    d = codebook_product.read_date(tmp_path / "prod", "2022-07-06")
    idx0, idx1 = codec.encode(data)
    # index maps read back bit-exact; cells past the last input row/column repeat the last cell
    np.testing.assert_array_equal(d.idx0[:151, :129], idx0[:151, :129])
    np.testing.assert_array_equal(d.idx1[:76, :65], idx1[:76, :65])
    assert d.idx0.shape == idx0.shape and d.idx1.shape == idx1.shape
    np.testing.assert_array_equal(d.nodata, (data == 0).all(0))
    with rasterio.open(tmp_path / "prod" / names["L0"]) as l0, rasterio.open(tmp_path / "prod" / names["L1"]) as l1:
        assert l0.transform == tr * Affine.scale(2) and l1.transform == tr * Affine.scale(4)
        assert l0.crs == l1.crs == rasterio.crs.CRS.from_string(majortom.crs)
        assert l0.tags()["CORSA_MODEL_SHA256"] == codec.card["files"]["decoder"]["sha256"]

    assert cli.main(["decompress", str(tmp_path / "prod"), "-o", str(tmp_path / "out.tif")]) == 0
    with rasterio.open(tmp_path / "out.tif") as src:
        out = src.read()
        assert src.transform == tr and src.shape == data.shape[1:] and src.descriptions == BANDS
    assert np.all(out[:, :20, :35] == 0)                        # nodata comes back as nodata
    assert psnr(data, out) > 30
    np.testing.assert_array_equal(out, np.where((data == 0).all(0), 0, codec.decode(d.idx0, d.idx1, data.shape[1:])))


def test_several_dates_in_a_folder(tmp_path, data_root, codec):
    scenes = [s for s in LOADERS["worldstrat"](data_root) if s.location == "Landcover-769486"][:3]
    for s in scenes:
        write_scene(tmp_path / f"{s.name}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(tmp_path), "-o", str(tmp_path / "prod"), "--dates", "2000-01-01/2030-01-01", "--model", "corsa512"]) == 0
    dates = codebook_product.dates_in(tmp_path / "prod")
    assert dates == sorted(s.date for s in scenes)
    for s in scenes:
        d = codebook_product.read_date(tmp_path / "prod", s.date)
        h, w = -(-s.data.shape[1] // 2), -(-s.data.shape[2] // 2)     # level-0 cells inside the scene
        np.testing.assert_array_equal(d.idx0[:h, :w], codec.encode(s.data)[0][:h, :w])


def test_chunk_borders_leave_no_seam(tmp_path, majortom, codec):
    """The engine works in 512 px chunks, each with only its network's reach of context: the
    indices must equal a whole-scene encode, and the decoded bands a decode in one piece."""
    write_scene(tmp_path / "in.tif", majortom.data, Affine(*majortom.transform), majortom.crs, "2022-07-06")
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "prod"), "--model", "corsa512"]) == 0
    d = codebook_product.read_date(tmp_path / "prod", "2022-07-06")
    whole0, whole1 = corsa_udf.encode(codec.encoder, majortom.data, tile=2048)
    assert np.mean(d.idx0 == whole0) > 0.999 and np.mean(d.idx1 == whole1) > 0.999

    assert cli.main(["decompress", str(tmp_path / "prod"), "-o", str(tmp_path / "out.tif")]) == 0
    with rasterio.open(tmp_path / "out.tif") as src:
        out = src.read().astype(np.float32)
    h, w = majortom.data.shape[1:]
    one_piece = np.clip(np.rint(corsa_udf.decode(codec.decoder, d.idx0, d.idx1, tile=2048)), 0, 65535)[:, :h, :w]
    assert np.abs(out - one_piece).max() <= 1                  # float rounding of other tile shapes only
    seams = seam_figures(majortom.data, out, border_mask((h, w)))   # 8 px either side of each chunk border
    assert seams["border"]["psnr_db"] > seams["interior"]["psnr_db"] - 1.0


def test_wrong_inputs_get_clear_errors(tmp_path, majortom, capsys):
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    assert cli.main(["compress", str(tmp_path / "junk.tif"), "-o", str(tmp_path / "p")]) == 2
    assert cli.main(["compress", str(tmp_path / "missing.tif"), "-o", str(tmp_path / "p")]) == 2
    write_scene(tmp_path / "in.tif", majortom.data[:, :64, :64], Affine(*majortom.transform), majortom.crs)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "p"),
                     "--bbox", "0,0,1,1"]) == 2                  # outside the data
    err = capsys.readouterr().err
    assert "missing.tif" in err and "selects no pixel" in err
    assert not (tmp_path / "p").exists() or not list((tmp_path / "p").glob("*.tif"))


def test_truncated_product_and_foreign_model_are_refused(tmp_path, majortom, capsys):
    write_scene(tmp_path / "in.tif", majortom.data[:, :64, :64], Affine(*majortom.transform), majortom.crs)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "prod"), "--model", "corsa512"]) == 0
    l0 = next((tmp_path / "prod").glob("*_L0.tif"))
    for f in (tmp_path / "prod").glob("*.tif"):
        with rasterio.open(f, "r+") as dst:
            dst.update_tags(CORSA_MODEL_SHA256="0" * 64)
    assert cli.main(["decompress", str(tmp_path / "prod"), "-o", str(tmp_path / "a.tif")]) == 2
    assert "written with model" in capsys.readouterr().err
    l0.write_bytes(l0.read_bytes()[:300])
    assert cli.main(["decompress", str(tmp_path / "prod"), "-o", str(tmp_path / "b.tif")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "a.tif").exists() and not (tmp_path / "b.tif").exists()


def test_info_reports_model_and_cf(tmp_path, majortom, capsys):
    write_scene(tmp_path / "in.tif", majortom.data[:, :128, :128], Affine(*majortom.transform), majortom.crs, "2022-07-06")
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "prod"), "--model", "corsa512"]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "prod")]) == 0
    out = capsys.readouterr().out
    assert "2022-07-06" in out and "corsa512" in out and "CF" in out


def test_stac_item_collection_loads_the_canonical_scene(tmp_path, data_root, majortom, codec):
    """The STAC path (as users with internet use it) on a static catalogue of the shared files."""
    from datetime import datetime

    import pystac

    from corsa.formats.stac_source import StacSource, item_from_files

    folder = next((data_root / "majortom_core_s2l2a").glob("*/*/S2*"))
    item = item_from_files(folder.name, datetime(2022, 7, 6, 8, 56), {b: folder / f"{b}.tif" for b in BANDS},
                           {"s2:processing_baseline": "04.00", "eo:cloud_cover": 3.0})
    pystac.ItemCollection([item]).save_object(dest_href=str(tmp_path / "items.json"))
    cube = StacSource(str(tmp_path / "items.json")).load(None, ["2022-07-01", "2022-07-10"])
    np.testing.assert_array_equal(cube.isel(t=0).values, majortom.data)   # offset removed, 20 m -> 10 m nearest
    assert cube.rio.transform() == Affine(*majortom.transform)
    # cloud-cover limit of the ready service applies to STAC items
    assert cli.main(["compress", str(tmp_path / "items.json"), "-o", str(tmp_path / "cloudy"),
                     "--max-cloud-cover", "1"]) == 2
    assert cli.main(["compress", str(tmp_path / "items.json"), "-o", str(tmp_path / "prod"),
                     "--bbox", "17.90,0.02,17.92,0.04", "--model", "corsa512"]) == 0
    d = codebook_product.read_date(tmp_path / "prod", "2022-07-06")
    assert d.crs == "EPSG:32633" and d.idx0.size > 0
