"""The UDF as openeo-geopyspark-driver calls it: its code text through the openeo client's
``run_udf_code`` on chunks built as the driver builds them (``apply_tiles_spatiotemporal``: float32,
NoData as NaN, size + 2 x overlap px padded with NaN beyond the cube, dims (t, bands, y, x) with
float32 cell-centre coordinates), every mode compared with what the CLI writes for the same scene.

The scene (a WorldStrat place, 3 dates, 158 px) fits in one 128 + 2 x 32 px chunk whose corner
lies 32 px before the scene's: the chunk at the cube's upper-left corner, with padding on all four
sides. It sees the whole scene, as the CLI's one window does, so the results must be the CLI's.
"""
import functools
import http.server
import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import xarray as xr
from openeo.udf import UdfData, XarrayDataCube
from openeo.udf.run_code import run_udf_code
from rasterio.transform import Affine

from corsa.app import cli
from corsa.formats import series
from corsa.formats import sources
from corsa.codec.models import MODELS_DIR
from corsa.formats.datasets import LOADERS
from corsa.openeo.processes import UDF_CODE
from corsa.openeo.windows import OVERLAP, UDF_TILE
from corsa.core.scene import BANDS

from test_service import write_scene

SIZE, PAD = 128, 32
MODEL = "corsa3.1"
ROOT = Path(__file__).resolve().parents[1]
OLDEST_RUNTIME = ROOT / ".venv-udf38" / "bin" / "python"


def driver_chunk(cube: xr.DataArray, transform: Affine, nodata=None, size: int = SIZE) -> xr.DataArray:
    """The chunk at the cube's upper-left corner as the driver hands it to a UDF: size + 2 x PAD px
    from PAD px before the corner, NaN outside the cube (and where the cube holds ``nodata``)."""
    cube = cube.transpose("t", "bands", "y", "x")
    values = cube.values.astype(np.float32)
    if nodata is not None:
        values[values == nodata] = np.nan
    side = size + 2 * PAD
    h, w = min(cube.sizes["y"], side - PAD), min(cube.sizes["x"], side - PAD)
    chunk = np.full(values.shape[:2] + (side, side), np.nan, np.float32)
    chunk[..., PAD:PAD + h, PAD:PAD + w] = values[..., :h, :w]
    centres = (np.arange(side) - PAD + 0.5)
    return xr.DataArray(chunk, dims=("t", "bands", "y", "x"), coords={
        "t": pd.DatetimeIndex(cube["t"].values), "bands": list(cube["bands"].values),
        "y": (transform.f + centres * transform.e).astype(np.float32),
        "x": (transform.c + centres * transform.a).astype(np.float32)})


def run(chunk: xr.DataArray, **context) -> xr.DataArray:
    data = run_udf_code(UDF_CODE, UdfData(datacube_list=[XarrayDataCube(chunk)], user_context=context))
    return data.get_datacube_list()[0].get_array()


def inner(result: xr.DataArray, shape) -> np.ndarray:
    """The part of a chunk's result that lies on the scene."""
    return result.values[..., PAD:PAD + shape[0], PAD:PAD + shape[1]]


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


@pytest.fixture(scope="module")
def place(data_root, tmp_path_factory):
    """Three dates of one place as GeoTIFFs, their CLI product (corsa3.1) and the input cube."""
    scenes = sorted([s for s in LOADERS["worldstrat"](data_root) if s.location == "Landcover-769486"][:3],
                    key=lambda s: s.date)
    folder = tmp_path_factory.mktemp("place")
    for s in scenes:
        write_scene(folder / f"{s.name}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    product = folder / "product"
    assert cli.main(["compress", str(folder), "-o", str(product), "--model", MODEL, "-q",
                     "--dates", "2000-01-01/2030-01-01"]) == 0
    cube = xr.DataArray(np.stack([s.data for s in scenes]), dims=("t", "bands", "y", "x"),
                        coords={"t": pd.DatetimeIndex([s.date for s in scenes]), "bands": list(BANDS)})
    return {"scenes": scenes, "folder": folder, "product": product, "cube": cube,
            "transform": Affine(*scenes[0].transform), "model": str(MODELS_DIR / MODEL),
            "quality": series.read_date(product, scenes[0].date, series.model_codec(MODEL)).quality}


def test_compress_chunk_gives_the_clis_integers(place):
    chunk = driver_chunk(place["cube"], place["transform"], nodata=0)
    out = run(chunk, mode="compress", model=place["model"], quality=place["quality"], tile=UDF_TILE,
              overlap=OVERLAP["compress"])
    assert out.dims == ("t", "bands", "y", "x") and out.shape[2:] == chunk.shape[2:]
    assert np.all(out.values[:, -1, :PAD] == 1) and np.all(out.values[:, -1, :, :PAD] == 1)   # padding: nodata
    codec = series.model_codec(MODEL)
    for t, s in enumerate(place["scenes"]):
        stored = series.read_date(place["product"], s.date, codec)
        h, w = s.data.shape[1:]
        ints = inner(out, (h, w))[t, :-1, ::4, ::4]
        np.testing.assert_array_equal(ints, stored.ints[:, : ints.shape[1], : ints.shape[2]])
        np.testing.assert_array_equal(inner(out, (h, w))[t, -1] != 0, (s.data == 0).all(0))


def test_an_int8_compress_chunk_gives_the_clis_int8_integers(place, tmp_path):
    """The context's "kernels" chooses the encoder as the CLI's --kernels does (corsa3.1's int8 encoder)."""
    assert cli.main(["compress", str(place["folder"]), "-o", str(tmp_path / "int8"), "--model", MODEL, "-q",
                     "--dates", "2000-01-01/2030-01-01", "--kernels", "int8"]) == 0
    chunk = driver_chunk(place["cube"], place["transform"], nodata=0)
    out = run(chunk, mode="compress", model=place["model"], quality=place["quality"], tile=UDF_TILE,
              overlap=OVERLAP["compress"], kernels="int8")
    codec = series.model_codec(MODEL)
    s = place["scenes"][0]
    ints = inner(out, s.data.shape[1:])[0, :-1, ::4, ::4]
    stored = series.read_date(tmp_path / "int8", s.date, codec).ints
    np.testing.assert_array_equal(ints, stored[:, : ints.shape[1], : ints.shape[2]])
    assert (stored != series.read_date(place["product"], s.date, codec).ints).any()


@pytest.mark.parametrize("dtype", ["int16", "uint16", "float32"])
def test_compress_takes_integer_and_float_cubes_alike(place, dtype):
    """run_udf outside apply_neighborhood hands the cube in its own dtype, no padding."""
    cube = place["cube"].isel(t=[0]).astype(dtype)
    out = run(cube, mode="compress", model=place["model"], quality=place["quality"])
    ref = run(place["cube"].isel(t=[0]).astype("float32"), mode="compress", model=place["model"], quality=place["quality"])
    np.testing.assert_array_equal(out.values, ref.values)


def _product_chunk(place) -> xr.DataArray:
    cube = sources.open_product(place["product"]).load()
    return driver_chunk(cube, place["transform"])


def test_decompress_chunk_gives_the_clis_pixels(place, tmp_path):
    out = run(_product_chunk(place), mode="decompress", model=place["model"], quality=place["quality"],
              tile=UDF_TILE, overlap=OVERLAP["decompress"])
    assert cli.main(["decompress", str(place["product"]), "-o", str(tmp_path), "-q"]) == 0
    for t, s in enumerate(place["scenes"]):
        decoded = read(next(tmp_path.glob(f"*{s.date}*.tif")))
        np.testing.assert_array_equal(inner(out, s.data.shape[1:])[t], decoded)
    assert np.all(out.values[..., :PAD, :] == 0)


def test_a_snow_chunk_decodes_in_float_as_the_cli_does(data_root, tmp_path):
    """The int8 decoder's bright tiles decode in float (corsa_udf.BrightGuard) in a back end's chunk
    as on the CLI: the snow-covered TerraMesh cell, whole in one chunk."""
    snow = next(s for s in LOADERS["terramesh"](data_root) if s.name == "609U_541L_3_0-S2L2A")
    write_scene(tmp_path / "snow.tif", snow.data, Affine(*snow.transform), snow.crs, "2020-01-11")
    assert cli.main(["compress", str(tmp_path / "snow.tif"), "-o", str(tmp_path / "product"), "--model", MODEL,
                     "-q"]) == 0
    quality = series.read_date(tmp_path / "product", "2020-01-11", series.model_codec(MODEL)).quality
    chunk = driver_chunk(sources.open_product(tmp_path / "product").load(), Affine(*snow.transform),
                         size=max(snow.data.shape[1:]))
    decoded = {kernels: inner(run(chunk, mode="decompress", model=str(MODELS_DIR / MODEL), quality=quality,
                                  tile=UDF_TILE, overlap=OVERLAP["decompress"], kernels=kernels),
                              snow.data.shape[1:])[0] for kernels in ("auto", "int8", "fp32")}
    assert cli.main(["decompress", str(tmp_path / "product"), "-o", str(tmp_path / "cli.tif"), "-q"]) == 0
    np.testing.assert_array_equal(decoded["auto"], read(tmp_path / "cli.tif"))
    np.testing.assert_array_equal(decoded["auto"], decoded["fp32"])
    assert (decoded["int8"] != decoded["fp32"]).any()


def test_fill_and_dates_give_the_clis_pixels(place, tmp_path):
    scenes = place["scenes"]
    between = str((pd.Timestamp(scenes[0].date) + (pd.Timestamp(scenes[1].date) - pd.Timestamp(scenes[0].date)) / 2).date())
    filled = run(_product_chunk(place), mode="decompress", model=place["model"], quality=place["quality"],
                 tile=UDF_TILE, overlap=OVERLAP["decompress"], fill=True)
    dated = run(_product_chunk(place), mode="decompress", model=place["model"], quality=place["quality"],
                tile=UDF_TILE, overlap=OVERLAP["decompress"], dates=[between])
    assert cli.main(["decompress", str(place["product"]), "-o", str(tmp_path / "filled"), "--fill", "-q"]) == 0
    assert cli.main(["decompress", str(place["product"]), "-o", str(tmp_path / "between.tif"), "--date", between,
                     "-q"]) == 0
    for t, s in enumerate(scenes):
        np.testing.assert_array_equal(inner(filled, s.data.shape[1:])[t],
                                      read(next((tmp_path / "filled").glob(f"*{s.date}*.tif"))))
    assert [str(d)[:10] for d in dated["t"].values] == [between]
    np.testing.assert_array_equal(inner(dated, scenes[0].data.shape[1:])[0], read(tmp_path / "between.tif"))


def test_render_chunk_gives_the_clis_pixels_at_twice_the_resolution(place, tmp_path):
    """decompress with positions, then resample_spatial "near" to 5 m, then mode render: the
    service corsa_openeo_render, against `corsa decompress --scale 2`."""
    date = place["scenes"][0].date
    decoded = run(_product_chunk(place).isel(t=[0]), mode="decompress", model=place["model"],
                  quality=place["quality"], tile=UDF_TILE, overlap=OVERLAP["decompress"], positions=True)
    h, w = place["scenes"][0].data.shape[1:]
    on_scene = decoded.isel(y=slice(PAD, PAD + h), x=slice(PAD, PAD + w))
    finer = on_scene.values.repeat(2, -2).repeat(2, -1)
    tr = place["transform"] * Affine.scale(0.5)
    cube = xr.DataArray(finer, dims=on_scene.dims, coords={"t": on_scene["t"].values,
                                                           "bands": list(on_scene["bands"].values)})
    chunk = driver_chunk(cube, tr, size=2 * max(h, w))        # the whole finer scene, NaN around it
    out = run(chunk, mode="render", model=place["model"], tile=UDF_TILE, overlap=OVERLAP["render"])
    assert cli.main(["decompress", str(place["product"]), "-o", str(tmp_path / "x2.tif"), "--date", date,
                     "--scale", "2", "-q"]) == 0
    cli_pixels = read(tmp_path / "x2.tif")
    ours = out.values[0, :, PAD:PAD + cli_pixels.shape[1], PAD:PAD + cli_pixels.shape[2]]

    # the driver's float32 coordinates (degrees here) move a query by up to ~1% of a pixel
    diff = np.abs(ours.astype(np.int32) - cli_pixels)
    assert diff.max() <= 2 and np.mean(diff > 1) < 1e-3


def test_classify_chunk_gives_the_classes_of_the_unpadded_cube(place, tmp_path):
    """A codebook model's product (the classifier reads corsa512's indices), classified per chunk:
    the padding changes nothing against the product's cube as it is (the engine's chunk before)."""
    s = place["scenes"][0]
    assert cli.main(["compress", str(place["folder"] / f"{s.name}.tif"), "-o", str(tmp_path / "p512"),
                     "--model", "corsa512", "-q"]) == 0
    cube = sources.open_product(tmp_path / "p512").load()
    context = {"mode": "classify", "model": str(MODELS_DIR / "corsa512"), "tile": UDF_TILE,
               "classifier": str(MODELS_DIR / "corsa512-scl"), "overlap": OVERLAP["classify"]}
    out = run(driver_chunk(cube, place["transform"]), **context)
    expected = run(cube, **context).values
    np.testing.assert_array_equal(inner(out, s.data.shape[1:]), expected)
    assert np.all(out.values[..., :PAD, :] == 0) and len(np.unique(expected)) > 2


def test_the_udf_fetches_a_model_by_url_as_the_services_default_does(place):
    """The services' model default is a URL of this repository's model folder; the UDF fetches the
    files over HTTP (a server on 127.0.0.1 serving models_onnx/ stands in for it)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(MODELS_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        chunk = driver_chunk(place["cube"].isel(t=[0]), place["transform"], nodata=0)
        url = f"http://127.0.0.1:{server.server_address[1]}/{MODEL}"
        fetched = run(chunk, mode="compress", model=url, quality=place["quality"])
    finally:
        server.shutdown()
        server.server_close()
    local = run(chunk, mode="compress", model=place["model"], quality=place["quality"])
    np.testing.assert_array_equal(fetched.values, local.values)


# -- the services on the embedded engine ---------------------------------------------------------

def test_the_engine_hands_the_udf_driver_chunks(place, tmp_path, monkeypatch):
    """Each call of the published compress service's UDF: the code text the graph embeds, through
    run_udf_code, a chunk of 512 + 2 x overlap px in float32 with NaN beyond the scene."""
    from corsa.openeo import engine
    from corsa.formats.sources import Catalogue

    seen = []
    real = engine.run_udf_code

    def recording(code, data):
        (cube,) = data.get_datacube_list()
        seen.append((code, cube.get_array(), dict(data.user_context)))
        return real(code, data)

    monkeypatch.setattr(engine, "run_udf_code", recording)
    udp = json.loads((ROOT / "process_graphs" / "corsa2_openeo_compress_s2.json").read_text())
    engine.Engine(Catalogue({"SENTINEL2_L2A": place["folder"]}), output=tmp_path).run(
        udp, spatial_extent=None, temporal_extent=["2000-01-01", "2030-01-01"], model=place["model"], quality=None)
    assert seen
    for code, chunk, context in seen:
        assert code == (ROOT / "udf" / "corsa_udf.py").read_text() and context["mode"] == "compress"
        side = 512 + 2 * context["overlap"]     # the graph's apply_neighborhood overlap, passed on to the UDF
        assert chunk.dims == ("t", "bands", "y", "x") and chunk.shape[2:] == (side, side)
        assert chunk.dtype == np.float32 and chunk["x"].dtype == np.float32 and chunk["y"].dtype == np.float32
        assert isinstance(chunk.indexes["t"], pd.DatetimeIndex) and chunk.sizes["t"] == 3
        assert np.isnan(chunk.values[..., :context["overlap"], :]).all()           # before the scene's corner
        assert np.isnan(chunk.values[..., context["overlap"] + 158:, :]).all()       # past its 158 px
        assert not np.isnan(chunk.values[0, :, 100, 100]).any()


def test_a_job_with_a_wider_model_stores_every_channel(data_root, tmp_path):
    """corsa2_openeo_compress_s2 is built from corsa2.1's card (64 channels); run with corsa3.1
    (96), its latent file holds all 96 and packs to the CLI's product, bit for bit."""
    from corsa.formats import job_files
    from corsa.openeo.engine import Engine
    from corsa.formats.sources import Catalogue

    s = next(LOADERS["majortom"](data_root))
    write_scene(tmp_path / "in.tif", s.data[:, 300:560, 200:500], Affine(*s.transform) * Affine.translation(200, 300),
                s.crs, s.date)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "cli"), "--model", MODEL, "-q"]) == 0
    codec = series.model_codec(MODEL)
    stored = series.read_date(tmp_path / "cli", s.date, codec)
    udp = json.loads((ROOT / "process_graphs" / "corsa2_openeo_compress_s2.json").read_text())
    Engine(Catalogue({"SENTINEL2_L2A": tmp_path / "in.tif"}), output=tmp_path / "job").run(
        udp, spatial_extent=None, temporal_extent=None, model=str(MODELS_DIR / MODEL), quality=stored.quality)
    with rasterio.open(tmp_path / "job" / f"corsa_latent_{s.date}.tif") as src:
        assert src.count == 97 and src.descriptions[-2:] == ("z95", "nodata")
    job_files.pack(tmp_path / "job", tmp_path / "product", MODEL, stored.quality)
    np.testing.assert_array_equal(series.read_date(tmp_path / "product", s.date, codec).ints, stored.ints)


# -- bad chunks ---------------------------------------------------------------------------------

def test_a_chunk_of_nan_is_nodata(place):
    chunk = driver_chunk(place["cube"], place["transform"], nodata=0) * np.nan
    out = run(chunk, mode="compress", model=place["model"], quality=place["quality"])
    assert np.all(out.values[:, -1] == 1) and np.all(out.values[:, :-1] == 0)
    decoded = run(out.astype(np.float32) * np.nan, mode="decompress", model=place["model"], quality=place["quality"])
    assert decoded.shape[1] == len(BANDS) and np.all(decoded.values == 0)


def test_a_band_of_nan_makes_its_pixels_nodata(place):
    chunk = driver_chunk(place["cube"], place["transform"], nodata=0)
    chunk.values[:, 3, PAD + 10:PAD + 30, PAD + 10:PAD + 30] = np.nan       # one band missing in a square
    out = run(chunk, mode="compress", model=place["model"], quality=place["quality"])
    assert np.all(out.values[:, -1, PAD + 10:PAD + 30, PAD + 10:PAD + 30] == 1)
    decoded = run(out.astype(np.float32), mode="decompress", model=place["model"], quality=place["quality"])
    assert np.all(decoded.values[:, :, PAD + 10:PAD + 30, PAD + 10:PAD + 30] == 0)


@pytest.mark.parametrize("cube, words", [
    (lambda c: c.isel(bands=slice(0, 9)), "lacks bands ['B12']"),
    (lambda c: c.astype(bool), "holds bool values"),
    (lambda c: c.astype(np.complex64), "holds complex64 values"),
    (lambda c: c.isel(t=0).expand_dims(z=[1]), "expected a cube with dims"),
])
def test_bad_chunks_get_the_udfs_error(place, cube, words):
    chunk = cube(driver_chunk(place["cube"], place["transform"], nodata=0))
    with pytest.raises(ValueError) as e:    # the UDF's own UdfError, defined where run_udf_code ran its code
        run(chunk, mode="compress", model=place["model"], quality=place["quality"])
    assert type(e.value).__name__ == "UdfError" and words in str(e.value)


# -- the oldest runtime the back ends still offer ------------------------------------------------

PROBE = """
import json, sys
import numpy as np, pandas as pd, xarray as xr
from openeo.udf import UdfData, XarrayDataCube
from openeo.udf.run_code import run_udf_code
arrays = np.load(sys.argv[1])
code = open(sys.argv[2]).read()
context = json.loads(sys.argv[3])
chunk = xr.DataArray(arrays["chunk"], dims=("t", "bands", "y", "x"), coords={
    "t": pd.DatetimeIndex(arrays["t"]), "bands": [str(b) for b in arrays["bands"]], "y": arrays["y"], "x": arrays["x"]})
out = run_udf_code(code, UdfData(datacube_list=[XarrayDataCube(chunk)], user_context=context))
np.save(sys.argv[4], out.get_datacube_list()[0].get_array().transpose("t", "bands", "y", "x").values)
print(sys.version_info[:2], np.__version__, xr.__version__)
"""


def test_the_udf_runs_on_python_3_8_with_the_drivers_numpy_and_xarray(place, tmp_path):
    """openeo-geopyspark-driver still offers a Python 3.8 UDF runtime (numpy 1.22.4, xarray 0.16.2;
    its setup.py): the UDF loads and compresses there as on the newest (scripts/setup_udf38.sh)."""
    assert OLDEST_RUNTIME.exists(), "run scripts/setup_udf38.sh (scripts/test.sh does)"
    chunk = driver_chunk(place["cube"], place["transform"], nodata=0)
    np.savez(tmp_path / "chunk.npz", chunk=chunk.values, t=chunk["t"].values.astype(str), bands=np.array(BANDS),
             y=chunk["y"].values, x=chunk["x"].values)
    (tmp_path / "udf.py").write_text(UDF_CODE)
    context = {"mode": "compress", "model": place["model"], "quality": place["quality"], "tile": UDF_TILE,
               "overlap": OVERLAP["compress"]}
    done = subprocess.run([str(OLDEST_RUNTIME), "-c", PROBE, str(tmp_path / "chunk.npz"), str(tmp_path / "udf.py"),
                           json.dumps(context), str(tmp_path / "out.npy")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("(3, 8) 1.22.4 0.16.2")
    old = np.load(tmp_path / "out.npy")
    new = run(chunk, **context).values
    # another onnxruntime build: a latent value may round the other way where it lies on a half
    assert old.shape == new.shape and np.mean(old != new) < 1e-3 and np.abs(old - new).max() <= 1
