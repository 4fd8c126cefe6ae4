"""The CLI on a real dask cluster: a scheduler and two worker processes started on 127.0.0.1 as a
user starts them (``dask scheduler``, ``dask worker``), and stopped afterwards. Every command gives
the bytes of the local path; the workers read their own windows and open their own sessions, so
what the client sends stays small."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from corsa.app import cli
from corsa.core import cluster
from corsa.formats.datasets import LOADERS, revisit_series
from conftest import stored_files
from test_service import write_scene

@pytest.fixture(scope="module")
def scheduler():
    """The address of a scheduler with two single-threaded worker processes."""
    with cluster.processes(2) as address:
        yield address


def _same_files(a: Path, b: Path) -> None:
    names = [p.name for p in stored_files(a)]
    assert names and names == [p.name for p in stored_files(b)]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def scene_file(data_root, tmp_path_factory):
    """A Major-TOM window of 2 x 2 blocks (700 x 600 px)."""
    s = next(LOADERS["majortom"](data_root))
    path = tmp_path_factory.mktemp("mt") / "scene.tif"
    write_scene(path, s.data[:, :700, :600], Affine(*s.transform), s.crs, s.date)
    return path


def test_compress_decompress_classify_reduce_on_the_cluster(scheduler, scene_file, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert cli.main(["compress", str(scene_file), "-o", str(local / "p")]) == 0
    assert cli.main(["compress", str(scene_file), "-o", str(remote / "p"), "--scheduler", scheduler]) == 0
    _same_files(local / "p", remote / "p")
    for where, extra in ((local, []), (remote, ["--scheduler", scheduler])):
        assert cli.main(["decompress", str(where / "p"), "-o", str(where / "d.tif"), *extra]) == 0
        assert cli.main(["decompress", str(where / "p"), "-o", str(where / "clear.tif"), "--clear", *extra]) == 0
        assert cli.main(["classify", str(where / "p"), "-o", str(where / "c.tif"), *extra]) == 0
        assert cli.main(["classify", str(where / "p"), "-o", str(where / "lc.tif"), "--classes", "landcover", *extra]) == 0
        assert cli.main(["reduce", str(where / "p"), "--quality", "2", "-o", str(where / "r"), *extra]) == 0
    for name in ("d.tif", "clear.tif", "c.tif", "lc.tif"):
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    _same_files(local / "r", remote / "r")
    assert _pixels(local / "d.tif").any() and len(np.unique(_pixels(local / "c.tif"))) > 1


def test_classes_block_by_block_are_the_services(scene_file, tmp_path):
    """The CLI classifies a product block by block; the classify service on the engine (its UDF on
    apply_neighborhood's chunks) gives the same classes over the 2 x 2 blocks."""
    from corsa.openeo.engine import Engine
    from corsa.formats.sources import Catalogue

    assert cli.main(["compress", str(scene_file), "-o", str(tmp_path / "p")]) == 0
    assert cli.main(["classify", str(tmp_path / "p"), "-o", str(tmp_path / "c.tif")]) == 0
    graph = {"process_graph": {
        "load": {"process_id": "load_collection", "arguments": {"id": str(tmp_path / "p"), "spatial_extent": None,
                                                                "temporal_extent": None}},
        "classify": {"process_id": "corsa_openeo_classify", "result": True,
                     "arguments": {"data": {"from_node": "load"}}}}}
    engine = Engine(Catalogue())
    cube = engine.run(graph)
    (served,) = engine._compute(cube.isel(t=0).sel(bands="class").data[::2, ::2])
    ours = _pixels(tmp_path / "c.tif")[0]
    np.testing.assert_array_equal(ours[:served.shape[0], :served.shape[1]], served)


def test_a_series_fills_and_renders_between_dates_on_the_cluster(scheduler, data_root, tmp_path):
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == "Landcover-31746"])
    run = run[:4]
    holed = run[2].data.copy()
    holed[:, 40:90, 30:100] = 0
    folder = tmp_path / "in"
    folder.mkdir()
    for i, s in enumerate(run):
        s = dataclasses.replace(s, data=holed) if i == 2 else s
        write_scene(folder / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(folder), "-o", str(tmp_path / "local")]) == 0
    assert cli.main(["compress", str(folder), "-o", str(tmp_path / "remote"), "--scheduler", scheduler]) == 0
    _same_files(tmp_path / "local", tmp_path / "remote")
    between = str(np.datetime64(run[0].date) + (np.datetime64(run[1].date) - np.datetime64(run[0].date)) // 2)
    for name, extra in (("fill.tif", ["--date", run[2].date, "--fill"]), ("between.tif", ["--date", between])):
        assert cli.main(["decompress", str(tmp_path / "local"), "-o", str(tmp_path / f"l-{name}"), *extra]) == 0
        assert cli.main(["decompress", str(tmp_path / "remote"), "-o", str(tmp_path / f"r-{name}"), *extra,
                         "--scheduler", scheduler]) == 0
        assert (tmp_path / f"l-{name}").read_bytes() == (tmp_path / f"r-{name}").read_bytes(), name
    assert _pixels(tmp_path / "l-fill.tif")[:, 40:90, 30:100].any()


def test_what_is_sent_to_the_cluster_stays_small(scheduler, scene_file, monkeypatch, tmp_path):
    """The function goes to the workers once and each task holds a block position: the bytes sent
    do not grow with the scene (the input is read by the workers)."""
    sent = []
    real = cluster.Cluster.map

    def counting(self, fn, items):
        import cloudpickle
        items = list(items)
        sent.append(len(cloudpickle.dumps(fn)) + len(cloudpickle.dumps(items)))
        return real(self, fn, items)

    monkeypatch.setattr(cluster.Cluster, "map", counting)
    from corsa.blocks.blockwise import compress
    from corsa.codec.models import DEFAULT_MODEL, VariableRateCodec
    from corsa.formats.sources import Catalogue
    cube = Catalogue({"S2": scene_file}).load("S2", None, None, None, None)
    with cluster.runner(scheduler) as run:
        compress(cube, VariableRateCodec(DEFAULT_MODEL), 4, tmp_path / "p", run=run)
    assert sent and max(sent) < 1 << 20


def test_a_scheduler_that_does_not_answer_is_named(scene_file, tmp_path, capsys):
    assert cli.main(["compress", str(scene_file), "-o", str(tmp_path / "p"), "--scheduler", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "--scheduler tcp://127.0.0.1:9" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()
