"""A time series of one place coded with references to earlier dates (corsa.formats.series, format 4), on a
real WorldStrat test area: smaller than its dates coded alone, every date decoded to exactly what
it decodes to alone, one date decoded on its own, dates appended later giving the same bytes,
key dates, and damage refused by name."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from corsa.app import cli
from corsa.codec.models import model_dir
from corsa.formats import stream_format
from corsa.formats import series
from corsa.formats.datasets import LOADERS, revisit_series
from corsa.formats.sources import date_from_name
from test_service import write_scene
from conftest import stored_files

MODEL = "corsa3"
AREA = "Landcover-31746"      # test split; 8 revisits


@pytest.fixture(scope="module")
def dates_folder(data_root, tmp_path_factory):
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == AREA])
    folder = tmp_path_factory.mktemp("series") / "in"
    folder.mkdir()
    for s in run:
        write_scene(folder / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    return folder


def _compress(src: Path, out: Path, *extra: str) -> None:
    assert cli.main(["compress", str(src), "-o", str(out), "--model", MODEL, "--quality", "4", *extra]) == 0


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in stored_files(folder))


def _decoded(folder: Path, out: Path, *extra: str) -> dict[str, np.ndarray]:
    assert cli.main(["decompress", str(folder), "-o", str(out), *extra]) == 0
    found = {}
    for p in stored_files(out):
        with rasterio.open(p) as f:
            found[p.name] = f.read()
    return found


@pytest.fixture(scope="module")
def products(dates_folder):
    root = dates_folder.parent
    _compress(dates_folder, root / "alone", "--key-every", "1")
    _compress(dates_folder, root / "series")
    return root / "alone", root / "series"


def test_series_is_smaller_and_decodes_like_its_dates_alone(products, tmp_path):
    alone, coded = products
    assert _size(alone) > 1.2 * _size(coded)
    heads = [series.header(coded, d)[1] for d in stream_format.dates_in(coded)]
    assert not heads[0]["refs"] and all(h["refs"] for h in heads[1:])
    assert (coded / stream_format.file_name(stream_format.dates_in(coded)[1])).read_bytes()[3] == stream_format.TEMPORAL_VERSION
    a, b = _decoded(alone, tmp_path / "a"), _decoded(coded, tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 8
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_one_date_decodes_alone(products, tmp_path):
    _, coded = products
    last = stream_format.dates_in(coded)[-1]
    (one,) = _decoded(coded, tmp_path / "one", "--date", last).values()
    (full,) = [v for k, v in _decoded(coded, tmp_path / "all").items() if last in k]
    np.testing.assert_array_equal(one, full)
    assert cli.main(["decompress", str(coded), "-o", str(tmp_path / "x"), "--date", "2000-01-01"]) == 2


def test_appended_dates_give_the_bytes_of_one_run(products, dates_folder, tmp_path):
    files = sorted(dates_folder.iterdir())
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir(), later.mkdir()
    for p in files[:3]:
        shutil.copy(p, first)
    for p in files[3:]:
        shutil.copy(p, later)
    _compress(first, tmp_path / "prod")
    before = {p.name: p.read_bytes() for p in stored_files(tmp_path / "prod")}
    _compress(later, tmp_path / "prod", "--append")
    after = {p.name: p.read_bytes() for p in (tmp_path / "prod").iterdir()}
    assert all(after[k] == v for k, v in before.items())                  # nothing re-coded
    assert after == {p.name: p.read_bytes() for p in products[1].iterdir()}
    # appending a date that is not after the last one is refused, and writes nothing
    assert cli.main(["compress", str(files[0]), "-o", str(tmp_path / "prod"), "--model", MODEL, "--append"]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "prod").iterdir()} == after


def test_key_dates_bound_the_dates_one_date_reads(dates_folder, tmp_path):
    _compress(dates_folder, tmp_path / "k3", "--key-every", "3")
    dates = stream_format.dates_in(tmp_path / "k3")
    refs = [series.header(tmp_path / "k3", d)[1]["refs"] for d in dates]
    assert [i for i, r in enumerate(refs) if not r] == [0, 3, 6]
    assert all(set(r) <= set(dates[3 * (i // 3):i]) for i, r in enumerate(refs))


def test_a_missing_or_damaged_reference_is_refused_by_name(products, tmp_path, capsys):
    coded = Path(shutil.copytree(products[1], tmp_path / "p"))
    first = coded / stream_format.file_name(stream_format.dates_in(coded)[0])
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    assert cli.main(["decompress", str(coded), "-o", str(tmp_path / "damaged")]) == 2
    assert f"{first.name} does not match its CRC-32" in capsys.readouterr().err
    first.unlink()
    assert cli.main(["decompress", str(coded), "-o", str(tmp_path / "missing")]) == 2
    # the product's STAC Collection lists the date; without it, the reference is missed by name
    assert "collection.json lists the date(s)" in capsys.readouterr().err
    (coded / "collection.json").unlink()
    assert cli.main(["decompress", str(coded), "-o", str(tmp_path / "missing")]) == 2
    assert f"{first.name} is missing" in capsys.readouterr().err
    for out in (tmp_path / "damaged", tmp_path / "missing"):        # nothing half-written is left
        assert not out.exists() or not any(out.iterdir())


def test_dates_come_from_file_names():
    assert date_from_name("openEO_2023-06-01Z.tif") == "2023-06-01"
    assert date_from_name("S2B_MSIL2A_20220706T085611_N0400_R036_T35VLG_20220706T113429.tif") == "2022-07-06"
    assert date_from_name("scene.tif") is None and date_from_name("x_2023-02-30.tif") is None


def test_the_engine_path_packs_the_same_series(products, dates_folder, tmp_path):
    """--engine runs the compress service (job files per date, as a back end writes them); packing
    them codes the dates as the same series."""
    _compress(dates_folder, tmp_path / "engine", "--engine")
    assert {p.name: p.read_bytes() for p in (tmp_path / "engine").iterdir()} == \
        {p.name: p.read_bytes() for p in products[1].iterdir()}


def test_a_reduced_series_is_a_series_of_the_reduced_dates(products, tmp_path):
    """corsa reduce of a series: each date's integers at the lower level, coded again with the same
    key and reference dates, so it decodes like the dates reduced one by one and stays smaller."""
    alone, coded = products
    for src, out in ((alone, "alone2"), (coded, "series2")):
        assert cli.main(["reduce", str(src), "--quality", "2", "-o", str(tmp_path / out)]) == 0
    heads = [series.header(tmp_path / "series2", d)[1] for d in stream_format.dates_in(tmp_path / "series2")]
    assert {h["quality"] for h in heads} == {2} and all(h["refs"] for h in heads[1:])
    assert not any(series.header(tmp_path / "alone2", d)[1]["refs"] for d in stream_format.dates_in(tmp_path / "alone2"))
    assert _size(tmp_path / "alone2") > 1.2 * _size(tmp_path / "series2")
    a, b = _decoded(tmp_path / "alone2", tmp_path / "a"), _decoded(tmp_path / "series2", tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 8
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_a_date_its_references_would_make_larger_is_written_alone(data_root, tmp_path):
    """SSL4EO-S12's four seasons of one place change so much between seasons that the default model's
    class tables code a season alone in fewer bytes than its temporal tables with the seasons before:
    the series writes those dates alone, so no date's file is larger than the date coded alone, and
    every date decodes to the same pixels."""
    (run,) = [r for r in revisit_series(list(LOADERS["terracodec"](data_root))) if r[0].location == "ssl4eo-0181476"]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, s in enumerate(run):
        date = str(np.datetime64("2021-01-15") + 91 * i)       # the seasons carry no dates
        write_scene(folder / f"{date}.tif", s.data, Affine(*s.transform) if s.transform else Affine.identity(), s.crs, date)
    for name, extra in (("alone", ["--key-every", "1"]), ("series", [])):
        assert cli.main(["compress", str(folder), "-o", str(tmp_path / name), "--quality", "1", "-q", *extra]) == 0
    dates = stream_format.dates_in(tmp_path / "series")
    assert len(dates) == 4 and dates == stream_format.dates_in(tmp_path / "alone")
    sizes = [[(tmp_path / name / stream_format.file_name(d)).stat().st_size for d in dates] for name in ("alone", "series")]
    assert all(b <= a for a, b in zip(*sizes)), sizes
    assert any(not series.header(tmp_path / "series", d)[1]["refs"] for d in dates[1:])
    a, b = _decoded(tmp_path / "alone", tmp_path / "a"), _decoded(tmp_path / "series", tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_a_model_is_opened_once_by_id_or_by_folder(tmp_path):
    """A product names its model by id and its blocks' readers by folder: both get the one codec (its
    entropy tables read once per process), and a copy of the folder elsewhere is another model."""
    by_id = series.model_codec("corsa3.12")
    assert series.model_codec(str(model_dir("corsa3.12"))) is by_id
    copy = tmp_path / "corsa3.12"
    shutil.copytree(model_dir("corsa3.12"), copy)
    other = series.model_codec(str(copy))
    assert other is not by_id and other.model_id == by_id.model_id
