"""A product folder holds one product: compressing into it again is refused unless --append (later
dates of the same place and grid) or --overwrite (the new product swapped in whole)."""
from rasterio.transform import Affine

from corsa.app import cli
from corsa.formats import stream_format
from corsa.formats import series
from corsa.formats.datasets import LOADERS

from conftest import stored_files
from test_service import write_scene


def _contents(folder):
    return {p.name: p.read_bytes() for p in stored_files(folder)}


def test_a_second_place_never_joins_a_product(tmp_path, data_root, capsys):
    s = next(LOADERS["majortom"](data_root))
    tr = Affine(*s.transform)
    write_scene(tmp_path / "a.tif", s.data[:, :200, :200], tr, s.crs, "2022-07-06")
    write_scene(tmp_path / "b.tif", s.data[:, 600:800, 600:900], tr * Affine.translation(600, 600), s.crs, "2022-07-16")
    prod = tmp_path / "prod"
    assert cli.main(["compress", str(tmp_path / "a.tif"), "-o", str(prod), "-q"]) == 0
    before = _contents(prod)
    capsys.readouterr()

    # without a flag: refused by name, the product untouched
    assert cli.main(["compress", str(tmp_path / "b.tif"), "-o", str(prod), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{prod} already holds a product (1 date(s): 2022-07-06)" in err and "--append" in err and "--overwrite" in err
    assert _contents(prod) == before
    # --append of another grid: refused, untouched
    assert cli.main(["compress", str(tmp_path / "b.tif"), "-o", str(prod), "--append", "-q"]) == 2
    assert "grid" in capsys.readouterr().err and _contents(prod) == before
    # both flags: refused
    assert cli.main(["compress", str(tmp_path / "b.tif"), "-o", str(prod), "--append", "--overwrite", "-q"]) == 2
    assert "exclude each other" in capsys.readouterr().err and _contents(prod) == before

    # --overwrite: the new product replaces the old one whole, nothing left beside it
    assert cli.main(["compress", str(tmp_path / "b.tif"), "-o", str(prod), "--overwrite", "-q"]) == 0
    assert str(prod) in capsys.readouterr().out
    assert stream_format.dates_in(prod) == ["2022-07-16"]
    assert series.header(prod, "2022-07-16")[1]["shape"] == (200, 300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.tif", "prod"]
    assert (prod / "collection.json").is_file() and not list(prod.glob(".*"))
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "out.tif"), "-q"]) == 0
    assert (tmp_path / "out.tif").stat().st_size > 0


def test_pack_into_a_product_needs_overwrite(tmp_path, data_root, capsys):
    from corsa.openeo import processes
    from corsa.codec.models import DEFAULT_MODEL, read_card
    from corsa.openeo.engine import Engine
    from corsa.formats.sources import Catalogue

    s = next(LOADERS["majortom"](data_root))
    write_scene(tmp_path / "a.tif", s.data[:, :200, :200], Affine(*s.transform), s.crs, "2022-07-06")
    Engine(Catalogue({"SENTINEL2_L2A": tmp_path / "a.tif"}), output=tmp_path / "job").run(
        processes.compress_s2_process(read_card(DEFAULT_MODEL)[1]), spatial_extent=None, temporal_extent=None,
        model=str(read_card(DEFAULT_MODEL)[0]), quality=None)
    assert cli.main(["pack", str(tmp_path / "job"), "-o", str(tmp_path / "prod"), "--model", DEFAULT_MODEL, "-q"]) == 0
    before = _contents(tmp_path / "prod")
    capsys.readouterr()
    assert cli.main(["pack", str(tmp_path / "job"), "-o", str(tmp_path / "prod"), "--model", DEFAULT_MODEL, "-q"]) == 2
    err = capsys.readouterr().err
    assert "already holds a product" in err and "--overwrite" in err and "--append" not in err
    assert _contents(tmp_path / "prod") == before
    assert cli.main(["pack", str(tmp_path / "job"), "-o", str(tmp_path / "prod"), "--model", DEFAULT_MODEL,
                     "--overwrite", "-q"]) == 0
    assert _contents(tmp_path / "prod") == before       # the same job packs to the same bytes
