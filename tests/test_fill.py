"""Gap filling from the other dates (corsa decompress --fill, corsa_udf.fill_date) on a real
WorldStrat test series with a cloud-shaped gap: only the gap's pixels change, they come back close to
the true reflectances, the decompress service's UDP (fill=true, on the engine) gives the same bytes,
and products that cannot fill are refused by name."""
import dataclasses

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from corsa.app import cli
from corsa.formats.datasets import LOADERS, revisit_series
from corsa.core.metrics import psnr
from test_service import write_scene
from conftest import stored_files

AREA = "Landcover-31746"     # test split, 8 clear revisits
GAP_DATE = 3


@pytest.fixture(scope="module")
def gapped(data_root, tmp_path_factory):
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == AREA])
    target = run[GAP_DATE]
    yy, xx = np.mgrid[: target.data.shape[1], : target.data.shape[2]]
    gap = (yy - 70) ** 2 / 900 + (xx - 60) ** 2 / 1600 < 1           # a cloud-sized ellipse, 20% of the scene
    holed = target.data.copy()
    holed[:, gap] = 0
    folder = tmp_path_factory.mktemp("fill") / "in"
    folder.mkdir()
    for i, s in enumerate(run):
        s = dataclasses.replace(s, data=holed) if i == GAP_DATE else s
        write_scene(folder / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    prod = folder.parent / "prod"
    assert cli.main(["compress", str(folder), "-o", str(prod), "--model", "corsa3", "--quality", "4"]) == 0
    return prod, target, gap


def _read(path):
    with rasterio.open(path) as f:
        return f.read()


def test_fill_changes_only_the_gap_and_brings_it_back(gapped, tmp_path):
    prod, target, gap = gapped
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "plain.tif"), "--date", target.date]) == 0
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "filled.tif"), "--date", target.date, "--fill"]) == 0
    plain, filled = _read(tmp_path / "plain.tif"), _read(tmp_path / "filled.tif")
    np.testing.assert_array_equal(filled[:, ~gap], plain[:, ~gap])
    assert (plain[:, gap] == 0).all() and (filled[:, gap] > 0).any(0).all()
    # the gap's true reflectances were never stored: this is prediction, and it is close
    assert psnr(target.data[:, gap], filled[:, gap]) > 30


def test_dates_without_gaps_decode_as_without_fill(gapped, tmp_path):
    prod, target, _ = gapped
    other = stored_files(prod)[0].name.removeprefix("corsa_").removesuffix(".corsa")
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "a.tif"), "--date", other]) == 0
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "b.tif"), "--date", other, "--fill"]) == 0
    np.testing.assert_array_equal(_read(tmp_path / "a.tif"), _read(tmp_path / "b.tif"))


def test_the_service_fills_the_same_pixels_over_several_chunks(data_root, tmp_path):
    """The same three dates tiled 4 x 4 (636 x 628 px: the services' 512 px chunks with their overlap),
    a gap across a chunk border: corsa_openeo_decompress with fill=true on the engine writes what the
    block-by-block path writes, date for date."""
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == AREA])
    src = tmp_path / "in"
    src.mkdir()
    for i, s in enumerate(run[2:5]):
        data = np.tile(s.data, (1, 4, 4))
        if i == 1:
            data[:, 400:600, 380:560] = 0
        write_scene(src / f"{s.date}.tif", data, Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(src), "-o", str(tmp_path / "prod"), "--model", "corsa2.1", "--quality", "2"]) == 0
    for out, extra in (("block", []), ("engine", ["--engine"])):
        assert cli.main(["decompress", str(tmp_path / "prod"), "-o", str(tmp_path / out), "--fill"] + extra) == 0
    names = sorted(p.name for p in stored_files(tmp_path / "block"))
    assert names == sorted(p.name for p in stored_files(tmp_path / "engine")) and len(names) == 3
    for name in names:
        np.testing.assert_array_equal(_read(tmp_path / "block" / name), _read(tmp_path / "engine" / name))
    filled = _read(tmp_path / "block" / names[1])
    assert (filled[:, 400:600, 380:560] > 0).any(0).all()


def test_fill_is_refused_where_it_cannot_work(gapped, tmp_path, capsys):
    _, target, gap = gapped
    holed = target.data.copy()
    holed[:, gap] = 0
    src = write_scene(tmp_path / "one.tif", holed, Affine(*target.transform), target.crs, target.date) or tmp_path / "one.tif"
    assert cli.main(["compress", str(src), "-o", str(tmp_path / "p"), "--model", "corsa3"]) == 0
    for extra in ([], ["--engine"]):
        assert cli.main(["decompress", str(tmp_path / "p"), "-o", str(tmp_path / "o.tif"), "--fill"] + extra) == 2
        err = capsys.readouterr().err
        assert "holds no other dated date" in err or "needs a dimension t with at least two dates" in err
        assert not (tmp_path / "o.tif").exists()
