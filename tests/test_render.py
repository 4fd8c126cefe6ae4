"""Rendering a compressed series off its stored dates and grid (corsa decompress --date / --scale /
--like, corsa.blocks.render) on a real WorldStrat test series: a date in between is a per-pixel blend of
the stored dates around it and the decompress UDP (dates) gives the same bytes; --scale and --like
give the asked grid, the same pixels for the same grid, GDAL's average for coarser pixels, bicubic
where the space head does worse on real TerraMesh L1C and the head's share on WorldStrat; what cannot
be rendered is refused by name with nothing written."""
import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import calculate_default_transform, reproject

from rio_cogeo.cogeo import cog_validate

import corsa_udf
from corsa.app import cli
from corsa.blocks import blockwise
from corsa.codec.models import VariableRateCodec
from corsa.core.scene import BANDS
from corsa.formats.datasets import LOADERS, revisit_series
from corsa.core.metrics import psnr
from test_service import write_scene

MODEL = "corsa3.1"
AREA = "Landcover-31746"      # test split, 8 clear revisits
LEFT_OUT = 3


def _read(path):
    with rasterio.open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def series(data_root, tmp_path_factory):
    """The area's dates but one, compressed as a series; and the left-out date."""
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == AREA])
    src = tmp_path_factory.mktemp("render") / "in"
    src.mkdir()
    for i, s in enumerate(run):
        if i != LEFT_OUT:
            write_scene(src / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    prod = src.parent / "prod"
    assert cli.main(["compress", str(src), "-o", str(prod), "--model", MODEL, "--quality", "4"]) == 0
    return prod, run


def test_a_date_in_between_blends_the_dates_around_it(series, tmp_path):
    prod, run = series
    date = run[LEFT_OUT].date
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "d.tif"), "--date", date]) == 0
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "all")]) == 0
    rendered = _read(tmp_path / "d.tif").astype(np.int64)
    around = np.stack([_read(tmp_path / "all" / f"corsa_decoded_{run[i].date}.tif")
                       for i in (LEFT_OUT - 2, LEFT_OUT - 1, LEFT_OUT + 1, LEFT_OUT + 2)]).astype(np.int64)
    # a convex blend of the four candidates, pixel by pixel (one DN of rounding)
    assert (rendered >= around.min(0) - 1).all() and (rendered <= around.max(0) + 1).all()
    assert psnr(run[LEFT_OUT].data, rendered) > 35
    with rasterio.open(tmp_path / "d.tif") as f, rasterio.open(tmp_path / "all" / f"corsa_decoded_{run[0].date}.tif") as g:
        assert (f.transform, f.crs, f.shape) == (g.transform, g.crs, g.shape)
    # a stored date is its plain decode
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "s.tif"), "--date", run[1].date]) == 0
    np.testing.assert_array_equal(_read(tmp_path / "s.tif"), _read(tmp_path / "all" / f"corsa_decoded_{run[1].date}.tif"))


class FarthestDate:
    """A time head that is wrong everywhere: it renders each pixel from the candidate farthest in time."""

    def run(self, _, feed):
        far = int(np.argmax(np.abs(feed["dt"][0])))
        return [feed["images"][:, far]]


def test_a_time_head_worse_than_linear_interpolation_on_a_place_falls_back_to_it(series, tmp_path):
    """What the product's own dates show, each rendered from the others, weighs the head against
    linear interpolation: a head that is wrong at this place gives linear interpolation, the
    shipped one (better here) no less than it."""
    prod, run = series
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "all")]) == 0
    stored = [s for i, s in enumerate(run) if i != LEFT_OUT]
    decoded = np.stack([_read(tmp_path / "all" / f"corsa_decoded_{s.date}.tif") for s in stored]).astype(np.float32)
    gaps = np.zeros((len(stored),) + decoded.shape[2:], bool)
    days = [float(np.datetime64(s.date, "D").astype(np.int64)) for s in stored]
    t, truth = float(np.datetime64(run[LEFT_OUT].date, "D").astype(np.int64)), run[LEFT_OUT].data
    linear = psnr(truth, np.rint(corsa_udf.linear_between(decoded, gaps, days, t)))
    bad = FarthestDate()
    assert psnr(truth, np.rint(corsa_udf.head_blend(bad, decoded, gaps, days, t))) < linear - 2
    assert psnr(truth, np.rint(corsa_udf.between(bad, decoded, gaps, days, t))) > linear - 0.05
    head = blockwise._sessions(VariableRateCodec(MODEL), "between")
    assert psnr(truth, np.rint(corsa_udf.between(head, decoded, gaps, days, t))) >= linear
    # two stored dates: none to weigh the head by, linear interpolation
    np.testing.assert_array_equal(corsa_udf.between(head, decoded[1:3], gaps[1:3], days[1:3], t),
                                  corsa_udf.linear_between(decoded[1:3], gaps[1:3], days[1:3], t))


class ShiftedView:
    """A space head that is wrong everywhere: each query answered by bicubic 2 px away."""

    def run(self, _, feed):
        return [corsa_udf.cubic_points(feed["image"][0], feed["coord"][0] + 2).T[None]]


def _rendered_x2(head, data, guarded):
    """A scene's 2 x 2 averages rendered back at x2 (the space head keeping ``guarded`` its self-checked
    share, else all) and the scene cropped to them."""
    h2, w2 = data.shape[1] // 2, data.shape[2] // 2
    fine = data[:, :2 * h2, :2 * w2]
    coarse = np.rint(fine.reshape(len(fine), h2, 2, w2, 2).astype(np.float64).mean((2, 4))).astype(np.uint16)
    rows, cols = np.mgrid[0:2 * h2, 0:2 * w2]
    coord = np.stack([(rows.ravel() + 0.5) / 2, (cols.ravel() + 0.5) / 2], -1)
    guard = corsa_udf.render_guard(head, coarse)[rows.ravel() // 2, cols.ravel() // 2] if guarded else np.ones(len(coord))
    cubic = np.rint(corsa_udf.cubic_points(coarse.astype(np.float32), coord)).reshape(fine.shape)
    return fine, corsa_udf.render_points(head, coarse, coord, np.full_like(coord, 0.5), guard).reshape(fine.shape), cubic


def test_a_space_head_worse_than_bicubic_on_a_place_falls_back_to_it(data_root):
    """A date's own 2 x 2 averages, rendered back by the space head and by bicubic, weigh the two
    (``corsa_udf.render_guard``): a head wrong everywhere gives bicubic; the shipped one, trained on
    decoded WorldStrat-like scenes, is below bicubic on a plain TerraMesh L1C scene and comes back to
    about it, and is no worse than bicubic on WorldStrat."""
    head = blockwise._sessions(VariableRateCodec(MODEL), "render")
    l1c = next(LOADERS["terramesh_l1c"](data_root)).data
    fine, alone, cubic = _rendered_x2(head, l1c, False)
    assert psnr(fine, alone) < psnr(fine, cubic) - 2
    _, guarded, _ = _rendered_x2(head, l1c, True)
    assert psnr(fine, cubic) - 0.3 < psnr(fine, guarded) and psnr(fine, guarded) > psnr(fine, alone) + 2
    _, wrong, _ = _rendered_x2(ShiftedView(), l1c, False)
    assert psnr(fine, wrong) < psnr(fine, cubic) - 10
    _, wrong, _ = _rendered_x2(ShiftedView(), l1c, True)
    assert psnr(fine, wrong) > psnr(fine, cubic) - 0.05
    fine, guarded, cubic = _rendered_x2(head, next(LOADERS["worldstrat"](data_root)).data, True)
    assert psnr(fine, guarded) > psnr(fine, cubic) - 0.05


def test_the_decompress_service_renders_the_same_date(data_root, tmp_path):
    """Four dates tiled 4 x 4 (636 x 628 px: several of the services' chunks): corsa_openeo_decompress
    with dates=[the left-out one] on the engine writes the bytes of the block-by-block path."""
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == AREA])
    src = tmp_path / "in"
    src.mkdir()
    for s in run[:2] + run[3:5]:
        write_scene(src / f"{s.date}.tif", np.tile(s.data, (1, 4, 4)), Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(src), "-o", str(tmp_path / "p"), "--model", MODEL, "--quality", "2"]) == 0
    for name, extra in (("block.tif", []), ("engine.tif", ["--engine"])):
        assert cli.main(["decompress", str(tmp_path / "p"), "-o", str(tmp_path / name), "--date", run[2].date] + extra) == 0
    np.testing.assert_array_equal(_read(tmp_path / "block.tif"), _read(tmp_path / "engine.tif"))
    for name in ("block.tif", "engine.tif"):    # both paths write cloud-optimised GeoTIFFs
        assert cog_validate(str(tmp_path / name)) == (True, [], [])
        with rasterio.open(tmp_path / name) as f:
            assert f.overviews(1) and f.nodata == 0 and f.descriptions == BANDS and set(f.scales) == {1e-4}


def test_scale_and_like_give_the_asked_grid(series, tmp_path):
    prod, run = series
    date = run[0].date
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "plain.tif"), "--date", date]) == 0
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "x2.tif"), "--date", date, "--scale", "2"]) == 0
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "like.tif"), "--date", date,
                     "--like", str(tmp_path / "x2.tif")]) == 0
    with rasterio.open(tmp_path / "plain.tif") as p, rasterio.open(tmp_path / "x2.tif") as f:
        assert f.shape == (2 * p.height, 2 * p.width) and f.crs == p.crs
        np.testing.assert_allclose(f.bounds, p.bounds, atol=1e-9)
        fine = f.read()
        plain = p.read()
    np.testing.assert_array_equal(_read(tmp_path / "like.tif"), fine)
    # 2 x 2 blocks of the finer render average back close to the plain decode
    back = fine.reshape(10, plain.shape[1], 2, plain.shape[2], 2).astype(np.float64).mean((2, 4))
    assert psnr(plain, back) > 45
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "half.tif"), "--date", date, "--scale", "0.5"]) == 0
    with rasterio.open(tmp_path / "half.tif") as f:
        assert f.shape == (round(plain.shape[1] / 2), round(plain.shape[2] / 2))
        np.testing.assert_allclose(f.bounds, rasterio.open(tmp_path / "plain.tif").bounds, atol=1e-9)


def test_the_render_service_gives_the_pixels_of_scale(series, tmp_path, capsys):
    """corsa_openeo_render on the engine (--scale with --engine: the decode with its positions,
    resample_spatial "near" to the smaller pixels, the space head in chunks of 512 px) gives the
    grid and the pixels of the block-by-block --scale, across the chunks' edges, for a date in between."""
    prod, run = series
    date = run[LEFT_OUT].date
    for name, extra in (("block.tif", []), ("engine.tif", ["--engine"])):
        assert cli.main(["decompress", str(prod), "-o", str(tmp_path / name), "--date", date, "--scale", "4"] + extra) == 0
    with rasterio.open(tmp_path / "block.tif") as a, rasterio.open(tmp_path / "engine.tif") as b:
        assert (a.shape, a.transform, a.crs) == (b.shape, b.transform, b.crs) and a.shape[0] > 512
        diff = np.abs(a.read().astype(np.int64) - b.read().astype(np.int64))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01      # float rounding of other window sizes
    assert cog_validate(str(tmp_path / "engine.tif")) == (True, [], [])
    capsys.readouterr()
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "half.tif"), "--scale", "0.5", "--engine"]) == 2
    assert "corsa_openeo_render makes pixels smaller" in capsys.readouterr().err
    assert not (tmp_path / "half.tif").exists()


def test_like_onto_another_crs(series, tmp_path):
    prod, run = series
    date = run[0].date
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "plain.tif"), "--date", date]) == 0
    with rasterio.open(tmp_path / "plain.tif") as p:
        crs = CRS.from_epsg(3857)
        transform, w, h = calculate_default_transform(p.crs, crs, p.width, p.height, *p.bounds)
        grid = np.zeros((10, h, w), np.float32)
        reproject(p.read().astype(np.float32), grid, src_transform=p.transform, src_crs=p.crs, dst_transform=transform,
                  dst_crs=crs, resampling=Resampling.bilinear, src_nodata=0, dst_nodata=0)
    with rasterio.open(tmp_path / "grid.tif", "w", driver="GTiff", width=w, height=h, count=1, dtype="uint8", crs=crs,
                       transform=transform) as dst:
        dst.write(np.zeros((1, h, w), np.uint8))
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "o.tif"), "--date", date,
                     "--like", str(tmp_path / "grid.tif")]) == 0
    with rasterio.open(tmp_path / "o.tif") as f:
        assert f.crs == crs and f.transform == transform and f.shape == (h, w)
        out = f.read()
    both = (out != 0).any(0) & (grid != 0).any(0)
    assert both.mean() > 0.5
    assert psnr(grid[:, both], out[:, both]) > 35        # GDAL's bilinear warp of the plain decode, nearly


def test_what_cannot_be_rendered_is_refused(series, tmp_path, capsys):
    prod, run = series
    cases = [(["--date", "2018-01-01"], "extrapolates no date"),
             (["--date", run[LEFT_OUT].date, "--fill"], "--fill fills a stored date's gaps"),
             (["--scale", "-1", "--date", run[0].date], "--scale must be a positive number"),
             (["--like", str(tmp_path / "none.tif"), "--date", run[0].date], "not a raster GDAL can open"),
             (["--date", "2019-02-30"], "is not a date YYYY-MM-DD"),
             (["--like", str(tmp_path / "none.tif"), "--engine"], "block-by-block path"),
             (["--scale", "2", "--engine"], "holds 7 dates: give a folder as -o")]
    for extra, message in cases:
        try:
            rc = cli.main(["decompress", str(prod), "-o", str(tmp_path / "o.tif")] + extra)
        except SystemExit as e:        # argparse's own refusal of a bad value
            rc = e.code
        assert rc == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not list(tmp_path.glob("o.tif*"))
    src = tmp_path / "one"
    src.mkdir()
    s = run[0]
    write_scene(src / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(src), "-o", str(tmp_path / "p2"), "--model", "corsa2.1"]) == 0
    assert cli.main(["decompress", str(tmp_path / "p2"), "-o", str(tmp_path / "o.tif"), "--scale", "2"]) == 2
    assert "has no space head" in capsys.readouterr().err
    assert not list(tmp_path.glob("o.tif*"))


def test_a_model_without_a_time_head_interpolates_linearly(series, tmp_path):
    """A model whose card has no time head (a new model family before its head is trained) renders a
    date in between by linear interpolation in time of the nearest dates before and after: on the
    block path and through the decompress service alike."""
    import json
    import shutil
    from pathlib import Path

    from corsa.codec.models import MODELS_DIR

    prod, run = series
    model = tmp_path / MODEL
    shutil.copytree(MODELS_DIR / MODEL, model, ignore=shutil.ignore_patterns("between.onnx", "*.md"))
    card = json.loads((model / "model_card.json").read_text())
    del card["files"]["between"]
    (model / "model_card.json").write_text(json.dumps(card))
    date = run[LEFT_OUT].date
    for name, extra in (("block.tif", []), ("engine.tif", ["--engine"])):
        assert cli.main(["decompress", str(prod), "-o", str(tmp_path / name), "--date", date, "--model", str(model)]
                        + extra) == 0
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "all")]) == 0
    before, after = (_read(tmp_path / "all" / f"corsa_decoded_{run[i].date}.tif").astype(np.float64)
                     for i in (LEFT_OUT - 1, LEFT_OUT + 1))
    day = lambda d: np.datetime64(d, "D").astype(np.int64)
    w = (day(date) - day(run[LEFT_OUT - 1].date)) / (day(run[LEFT_OUT + 1].date) - day(run[LEFT_OUT - 1].date))
    rendered = _read(tmp_path / "block.tif")
    assert np.abs(rendered - ((1 - w) * before + w * after)).max() <= 0.5 + 1e-6      # rounding only
    np.testing.assert_array_equal(rendered, _read(tmp_path / "engine.tif"))
    assert not Path(model / "between.onnx").exists()


@pytest.fixture(scope="module")
def chunked(data_root, tmp_path_factory):
    """A product of 2 x 2 decoded chunks (the render's at x1.25 2 x 2 too), each read by the render chunks around it."""
    from corsa.openeo.windows import CHUNK

    scene = next(LOADERS["majortom"](data_root))
    side = CHUNK + 40
    tmp = tmp_path_factory.mktemp("chunked")
    (tmp / "in").mkdir()
    write_scene(tmp / "in" / "s.tif", scene.data[:, :side, :side], Affine(*scene.transform), scene.crs, "2020-06-01")
    assert cli.main(["compress", str(tmp / "in"), "-o", str(tmp / "prod"), "--quality", "1"]) == 0
    return tmp / "prod", side


def test_the_render_service_decodes_each_chunk_once(chunked, tmp_path, monkeypatch):
    """corsa_openeo_render on the engine reads each decoded chunk from the render chunks around it (their
    overlap): written a few blocks per compute, every decoded chunk was decoded again for each compute that
    read it (40 decodes of 9 chunks on a 3 x 3-chunk product, 78 at x2). It is decoded once, and the pixels are the
    block path's."""
    import collections
    import math

    from corsa.openeo import engine
    from corsa.openeo.windows import CHUNK

    prod, side = chunked
    calls = collections.Counter()
    real = engine.Engine.run_udf

    def counted(self, data, udf, runtime, context=None, **kw):
        calls[context["mode"]] += 1
        return real(self, data, udf, runtime, context, **kw)

    monkeypatch.setattr(engine.Engine, "run_udf", counted)
    for name, extra in (("block.tif", []), ("engine.tif", ["--engine"])):
        assert cli.main(["decompress", str(prod), "-o", str(tmp_path / name), "--scale", "1.25"] + extra) == 0
    chunks = math.ceil(side / CHUNK) ** 2
    # Each chunk once: the ones the engine decodes up front to learn the render's bands are kept for the write.
    assert calls["decompress"] == chunks and calls["render"] <= math.ceil(1.25 * side / CHUNK) ** 2 + 1, calls
    diff = np.abs(_read(tmp_path / "block.tif").astype(np.int64) - _read(tmp_path / "engine.tif"))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_on_a_dask_cluster_the_engine_decodes_each_chunk_once_too(chunked, tmp_path, monkeypatch):
    """The engine's render on a dask.distributed scheduler (in this process, its worker's two threads
    counted with the rest): every block is asked in one graph, so the cluster decodes each chunk once
    (asked a few blocks at a time, each ask decoded again the chunks its overlap read: 25 decoder runs for
    9 chunks of a 3 x 3-chunk product, 34 of the space head for 18) and writes this machine's bytes."""
    import collections

    import onnxruntime as ort
    from distributed import LocalCluster

    prod = chunked[0]
    runs = collections.Counter()
    real = ort.InferenceSession.run

    def counted(self, *a, **kw):
        runs[self._model_path.rsplit("/", 1)[-1]] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(ort.InferenceSession, "run", counted)
    args = ["decompress", str(prod), "--scale", "1.25", "--engine"]
    assert cli.main(args + ["-o", str(tmp_path / "here.tif")]) == 0
    here = dict(runs)
    runs.clear()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as c:
        assert cli.main(args + ["-o", str(tmp_path / "cluster.tif"), "--scheduler", c.scheduler_address]) == 0
    decoders = [k for k in here if k.startswith("decoder")]
    assert decoders and dict(runs) == here, (here, dict(runs))
    assert (tmp_path / "here.tif").read_bytes() == (tmp_path / "cluster.tif").read_bytes()


def test_corsa4_1_renders_a_date_in_between_with_its_time_head(data_root, tmp_path):
    """corsa4.1's time head (trained on its own refined decodes) where a neighbouring date is cloudy: a WorldStrat
    test place's left-out clear date rendered well above linear interpolation of the decoded dates around it
    (1.9 dB in the benchmark), through the CLI."""
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == "Landcover-461460"])
    out = next(i for i, s in enumerate(run) if s.date == "2018-07-12")
    stored = [s for i, s in enumerate(run) if i != out]
    (tmp_path / "in").mkdir()
    for s in stored:
        write_scene(tmp_path / "in" / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    prod = tmp_path / "prod"
    assert cli.main(["compress", str(tmp_path / "in"), "-o", str(prod), "--model", "corsa4.1", "--quality", "4"]) == 0
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "d.tif"), "--date", run[out].date]) == 0
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "all")]) == 0
    decoded = np.stack([_read(tmp_path / "all" / f"corsa_decoded_{s.date}.tif") for s in stored]).astype(np.float32)
    days = [float(np.datetime64(s.date, "D").astype(np.int64)) for s in stored]
    t = float(np.datetime64(run[out].date, "D").astype(np.int64))
    linear = corsa_udf.linear_between(decoded, np.zeros((len(stored),) + decoded.shape[2:], bool), days, t)
    assert psnr(run[out].data, _read(tmp_path / "d.tif")) > psnr(run[out].data, np.rint(linear)) + 1
