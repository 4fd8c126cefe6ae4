"""What a compress job writes with standard processes only (each stored layer on its own grid, by
the engine's generic save_result, as a back end writes), and `corsa pack` / `corsa decompress` on
those files: the same integers as the product, the same decoded image."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.shutil import copy as gdal_copy
from rasterio.transform import Affine

import corsa_udf
from corsa.app import cli
from corsa.openeo import jobs
from corsa.formats import job_files
from corsa.openeo import processes
from corsa.formats import stream_format
from corsa.codec.codebook import CodebookCodec
from corsa.codec.models import DEFAULT_MODEL, VariableRateCodec, read_card
from corsa.openeo.engine import Engine
from corsa.openeo.local import EngineConnection
from corsa.formats.sources import Catalogue
from corsa.core.metrics import psnr
from test_service import majortom, write_scene  # noqa: F401  (majortom: a fixture)
from conftest import stored_files

DATE = "2022-07-06"
QUALITY = 3
SHAPE = (130, 122)  # not multiples of 4: the last cells are partial


@pytest.fixture(scope="module")
def scene(tmp_path_factory, majortom):
    """A crop of the Major-TOM scene with a nodata corner, as a dated 10-band GeoTIFF."""
    data = majortom.data[:, 200:200 + SHAPE[0], 300:300 + SHAPE[1]].copy()
    data[:, :20, :33] = 0
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    transform = Affine(*majortom.transform) * Affine.translation(300, 200)
    write_scene(path, data, transform, majortom.crs, DATE)
    return path, data, transform, majortom.crs


def _run_service(model: str, scene_path: Path, out: Path) -> Path:
    _, card = read_card(model)
    udp = processes.compress_s2_process(card, 10.0)
    Engine(Catalogue({"SENTINEL2_L2A": scene_path}), output=out).run(
        udp, spatial_extent=None, temporal_extent=None, max_cloud_cover=80, model=str(read_card(model)[0]),
        quality=QUALITY if card.get("kind") == "variable-rate" else None)
    return out


@pytest.fixture(scope="module", params=["corsa512", "corsa2", DEFAULT_MODEL])
def job(request, scene, tmp_path_factory):
    """(model, folder of the service's files) for each model family (the default: refined)."""
    return request.param, _run_service(request.param, scene[0], tmp_path_factory.mktemp(f"job-{request.param}"))


def test_each_stored_layer_is_saved_on_its_own_grid(job, scene):
    model, folder = job
    _, card = read_card(model)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"corsa_{l['name']}_{DATE}.tif" for l in card["layers"])
    with rasterio.open(folder / f"corsa_nodata_{DATE}.tif") as src:
        grid = src.transform
        np.testing.assert_array_equal(src.read(1) != 0, (scene[1] == 0).all(0))
    for layer in card["layers"]:
        s = layer["stride"]
        with rasterio.open(folder / f"corsa_{layer['name']}_{DATE}.tif") as src:
            assert src.transform == grid * Affine.scale(s)
            assert (src.height, src.width) == (-(-SHAPE[0] // s), -(-SHAPE[1] // s))
            # a variable-rate latent is saved whole: every channel, then its nodata band sampled at 40 m
            # a refined model's refinement cells ride along, before nodata
            cells = list(corsa_udf.CELL_BANDS) + list(corsa_udf.FILTER_BANDS if corsa_udf.filter_shape(card) else ()) \
                if model == DEFAULT_MODEL and s > 1 else []
            assert list(src.descriptions) == layer["bands"] + cells + (["nodata"] if model != "corsa512" and s > 1 else [])
            # stored as a back end stores a UDF's output: float32, whole numbers
            values = src.read()
            assert src.dtypes[0] == "float32" and np.array_equal(values, np.rint(values))
            assert src.compression.name == "deflate"


def test_stored_values_are_the_codecs_own(job, scene):
    model, folder = job
    data = scene[1]
    with rasterio.open(folder / f"corsa_{'L0' if model == 'corsa512' else 'latent'}_{DATE}.tif") as src:
        stored = src.read()
    if model != "corsa512":
        codec = VariableRateCodec(model)
        ints = codec.encode(data, QUALITY)
        np.testing.assert_array_equal(stored[:len(ints)], ints[:, : stored.shape[1], : stored.shape[2]])
        nodata = (data == 0).all(0)
        _, _, cells = stream_format.encode_refined(codec, data, ints, QUALITY, nodata, None, None, DATE)
        filters = 10 if corsa_udf.filter_shape(codec.card) else 0
        assert (cells is None) == (model == "corsa2") and len(stored) == len(ints) + 1 + (cells is not None) * (10 + filters)
        if cells is not None:       # one block: the refinement cells the CLI's compress stores, each at its first 40 m cell
            stored_cells = stored[len(ints):len(ints) + 10]
            np.testing.assert_array_equal(stored_cells[:, ::4, ::4], cells[0].cells)
            stored_cells[:, ::4, ::4] = 0
            assert np.abs(cells[0].cells).max() > 0 and not stored_cells.any()
            # no loop filter at this level: its bands all 0 but for the block's 20 m grid, as the block's stream says
            shape, filters = corsa_udf.filter_shape(codec.card), stored[len(ints) + 10:-1]     # at 40 m
            assert cells[0].weights is None and cells[0].grid20 == 1      # Major-TOM: the 20 m bands repeated 2 x 2
            assert corsa_udf.filter_weights(np.repeat(np.repeat(filters, 4, 1), 4, 2), 0, 0, shape) == (None, 1)
            gy, gx = corsa_udf.grid20_slot(shape)
            filters[0, gy // 4, gx // 4] = 0
            assert not filters.any()
    else:
        idx0, idx1 = CodebookCodec(model).encode(data)
        np.testing.assert_array_equal(stored[0], idx0[: stored.shape[1], : stored.shape[2]])
        with rasterio.open(folder / f"corsa_L1_{DATE}.tif") as src:
            np.testing.assert_array_equal(src.read(1), idx1)


def test_pack_gives_the_product_that_compress_writes(job, scene, tmp_path):
    model, folder = job
    args = ["--model", model] + (["--quality", str(QUALITY)] if model != "corsa512" else [])
    assert cli.main(["pack", str(folder), "-o", str(tmp_path / "packed"), *args]) == 0
    assert cli.main(["compress", str(scene[0]), "-o", str(tmp_path / "direct"), *args]) == 0
    packed, direct = stored_files(tmp_path / "packed"), stored_files(tmp_path / "direct")
    assert [p.name for p in packed] == [p.name for p in direct] and packed
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(packed, direct))
    if model == "corsa2":  # format 3 is smaller than the job's GeoTIFFs (format 2 carries GeoTIFF headers too)
        assert sum(p.stat().st_size for p in packed) < sum(p.stat().st_size for p in folder.iterdir())


def test_decompress_reads_job_files_like_the_product(job, tmp_path):
    model, folder = job
    args = ["--model", model] + (["--quality", str(QUALITY)] if model != "corsa512" else [])
    assert cli.main(["pack", str(folder), "-o", str(tmp_path / "product"), *args]) == 0
    assert cli.main(["decompress", str(folder), "-o", str(tmp_path / "a.tif"), *args]) == 0
    assert cli.main(["decompress", str(tmp_path / "product"), "-o", str(tmp_path / "b.tif")]) == 0
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        assert a.transform == b.transform and a.dtypes[0] == "uint16"
        np.testing.assert_array_equal(a.read(), b.read())


@pytest.fixture(scope="module")
def downloaded(scene, tmp_path_factory) -> tuple[list[Path], Path]:
    """A corsa2 quality-2 compress job of the scene on the embedded engine, downloaded."""
    local = EngineConnection({"SENTINEL2_L2A": scene[0]}, workdir=tmp_path_factory.mktemp("jobs"))
    job = jobs.follow(jobs.start(jobs.submit(jobs.compress(local, None, None, model="corsa2", quality=2), "c")))
    folder = tmp_path_factory.mktemp("dl")
    return jobs.download(job, folder), folder


def test_downloaded_job_names_its_model_and_quality(downloaded, tmp_path):
    """jobs.download keeps the job's description: pack and decompress need no --model then."""
    files, folder = downloaded
    shutil.copytree(folder, tmp_path / "dl")
    assert sorted(p.name for p in files) == [f"corsa_latent_{DATE}.tif", f"corsa_nodata_{DATE}.tif"]
    assert job_files.job_settings(tmp_path / "dl") == {"model": "corsa2", "quality": 2}
    assert cli.main(["pack", str(tmp_path / "dl"), "-o", str(tmp_path / "product")]) == 0
    header = stream_format.read_header((tmp_path / "product" / stream_format.file_name(DATE)).read_bytes(), "x")
    assert header["quality"] == 2 and header["model_id"] == "corsa2"
    assert cli.main(["decompress", str(tmp_path / "dl"), "-o", str(tmp_path / "dec")]) == 0
    assert (tmp_path / "dec" / f"corsa_decoded_{DATE}.tif").is_file()


def test_files_damaged_after_the_download_are_refused(downloaded, tmp_path, capsys):
    """job.json's sha256 of each file: damage that still decodes (pixels overwritten with valid values,
    another quality in the record) is refused by pack and decompress, naming the file."""
    _, original = downloaded
    latent = f"corsa_latent_{DATE}.tif"

    def damaged(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(original, folder)
        return folder

    def refused(folder: Path, match: str) -> None:
        for command in ("pack", "decompress"):
            capsys.readouterr()
            out = tmp_path / f"{folder.name}-{command}"
            assert cli.main([command, str(folder), "-o", str(out)]) == 2
            err = capsys.readouterr().err
            assert match in err and "Traceback" not in err, err
            assert not out.exists() or stored_files(out) == []

    folder = damaged("pixels")
    with rasterio.open(folder / latent, "r+") as dst:
        values = dst.read()
        values[0, 5, 5] += 1
        dst.write(values)
    refused(folder, f"{latent} has changed since it was downloaded")
    folder = damaged("record")
    text = (folder / "job.json").read_text()
    assert '"quality": 2' in text
    (folder / "job.json").write_text(text.replace('"quality": 2', '"quality": 3'))
    refused(folder, "job.json is damaged: its content does not match the sha256 recorded with it")
    folder = damaged("gone")
    (folder / latent).unlink()
    refused(folder, f"{latent}, downloaded with the job (job.json), is missing")
    folder = damaged("extra")
    shutil.copy(folder / latent, folder / "corsa_latent_2022-07-11.tif")
    refused(folder, "corsa_latent_2022-07-11.tif is not among the files the job's download recorded")
    # the undamaged download still packs
    assert cli.main(["pack", str(original), "-o", str(tmp_path / "product")]) == 0


@pytest.fixture(scope="module")
def corsa2_files(scene, tmp_path_factory):
    return _run_service("corsa2", scene[0], tmp_path_factory.mktemp("corsa2-files"))


def test_damaged_job_files_are_refused_by_name(corsa2_files, tmp_path, capsys):
    folder = tmp_path / "job"
    shutil.copytree(corsa2_files, folder)
    latent = folder / f"corsa_latent_{DATE}.tif"
    args = ["--model", "corsa2", "--quality", str(QUALITY)]

    def refused(match: str) -> None:
        capsys.readouterr()
        assert cli.main(["pack", str(folder), "-o", str(tmp_path / "p"), *args]) == 2
        err = capsys.readouterr().err
        assert match in err, err
        assert not (tmp_path / "p").exists() or not list((tmp_path / "p").iterdir())

    with rasterio.open(latent) as src:
        profile, values = src.profile, src.read()
        names = src.descriptions
    # on another grid: shifted by one 10 m pixel
    with rasterio.open(latent, "w", **{**profile, "transform": profile["transform"] * Affine.translation(0.25, 0)}) as dst:
        dst.write(values)
        dst.descriptions = names
    refused(f"{latent.name} is not on the grid of corsa_nodata_{DATE}.tif")
    # floats that are not whole numbers: not a compress job's output
    with rasterio.open(latent, "w", **{**profile, "dtype": "float32"}) as dst:
        dst.write(values.astype(np.float32) + 0.5)
        dst.descriptions = names
    refused("not whole numbers")
    # a 10 m grid whose pixel size a damaged header made subnormal (found by benchmarks.fuzz --format packed)
    nodata = folder / f"corsa_nodata_{DATE}.tif"
    with rasterio.open(latent, "w", **profile) as dst:
        dst.write(values)
        dst.descriptions = names
    with rasterio.open(nodata, "r+") as dst:
        t = dst.transform
        dst.transform = Affine(5e-311, t.b, t.c, t.d, t.e, t.f)
    refused("has a pixel size of no grid")
    # a layer missing: no longer a compress job's output
    latent.unlink()
    refused("holds no compress job's files")


def test_job_files_without_a_model_are_refused(corsa2_files, tmp_path, capsys):
    shutil.copytree(corsa2_files, tmp_path / "job")
    assert cli.main(["pack", str(tmp_path / "job"), "-o", str(tmp_path / "p")]) == 2
    assert "no job.json naming its model: give --model" in capsys.readouterr().err
    assert cli.main(["pack", str(tmp_path / "job"), "-o", str(tmp_path / "job"), "--model", "corsa2"]) == 2
    assert "another folder" in capsys.readouterr().err


def test_job_json_is_kept_with_the_download_and_read_back(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps({"process": {"process_graph": {
        "c": {"process_id": "corsa2_openeo_compress_s2", "namespace": "https://example.org/x.json",
              "arguments": {"model": "https://example.org/models/corsa2/", "quality": 5}, "result": True}}}}))
    assert job_files.job_settings(tmp_path) == {"model": "corsa2", "quality": 5}


def test_a_failing_job_leaves_no_file(scene, tmp_path):
    """The generic writer computes every layer's blocks and renames its files only when all are
    complete: a source that fails half way through leaves nothing that looks like a result."""
    damaged = tmp_path / "damaged.tif"
    # a copy writes the directory first (as COGs have it): GDAL opens the cut file, fails on a later block
    gdal_copy(scene[0], damaged, driver="GTiff", compress="deflate", tiled=True, blockxsize=16, blockysize=16)
    raw = damaged.read_bytes()
    damaged.write_bytes(raw[: len(raw) * 2 // 3])
    local = EngineConnection({"SENTINEL2_L2A": damaged}, workdir=tmp_path / "jobs")
    job = jobs.start(jobs.submit(jobs.compress(local, None, None, model="corsa2"), "c"))
    assert job.status() == "error" and "truncated or corrupt" in job.logs()[0]["message"]
    left = list(job.results.rglob("*")) if job.results.exists() else []
    assert not left, left


@pytest.mark.parametrize("style", ["{layer}_{date}Z", "{layer}_{date}T00:00:00Z"])
def test_pack_reads_the_back_ends_file_names(job, scene, tmp_path, style):
    """CDSE and Terrascope name a dated result <prefix>_<date>Z.tif (or with the time): the same
    product as from the engine's names."""
    model, folder = job
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for p in folder.iterdir():
        layer, date = p.stem[len("corsa_"):].rsplit("_", 1)
        shutil.copyfile(p, renamed / f"corsa_{style.format(layer=layer, date=date)}.tif")
    args = ["--model", model] + (["--quality", str(QUALITY)] if model != "corsa512" else [])
    assert cli.main(["pack", str(renamed), "-o", str(tmp_path / "a"), *args]) == 0
    assert cli.main(["pack", str(folder), "-o", str(tmp_path / "b"), *args]) == 0
    a, b = stored_files(tmp_path / "a"), stored_files(tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b] and all(p.read_bytes() == q.read_bytes() for p, q in zip(a, b))


def test_xarray_opens_a_download_as_its_product(downloaded, tmp_path):
    """xr.open_dataset(download, engine="corsa"), unpacked: the pixels corsa decompress gives the
    download, the latents of the packed product."""
    import xarray as xr

    _, folder = downloaded
    assert cli.main(["pack", str(folder), "-o", str(tmp_path / "product")]) == 0
    assert cli.main(["decompress", str(folder), "-o", str(tmp_path / "dec.tif")]) == 0
    job = xr.open_dataset(folder, engine="corsa", mask_and_scale=False, features=True)
    packed = xr.open_dataset(tmp_path / "product", engine="corsa", mask_and_scale=False, features=True)
    with rasterio.open(tmp_path / "dec.tif") as f:
        np.testing.assert_array_equal(job.reflectance.isel(time=0).values, f.read())
        assert job.rio.transform() == f.transform
    np.testing.assert_array_equal(job.features.values, packed.features.values)
    assert int(job.quality[0]) == 2 and str(job.time.values[0])[:10] == DATE


@pytest.mark.parametrize("job", [DEFAULT_MODEL], indirect=True)
def test_a_refined_models_job_stores_its_refinement(job, scene, tmp_path):
    """The default model's service stores each block's refinement cells (bands cell_B02, ... of its latent
    file): the packed date is refined (format 8), xarray reads the download as that product, and the
    refinement brings the decoding closer to the scene; a download from before the services stored
    them still packs and decodes, unrefined (format 7)."""
    import xarray as xr

    model, folder = job
    args = ["--model", model, "--quality", str(QUALITY)]
    older = tmp_path / "older"
    shutil.copytree(folder, older)
    with rasterio.open(folder / f"corsa_latent_{DATE}.tif") as src:     # the latent alone, as before
        keep = [i for i, d in enumerate(src.descriptions, 1) if not d.startswith(("cell_", "filter_"))]
        profile, values, names = src.profile, src.read(keep), [src.descriptions[i - 1] for i in keep]
    with rasterio.open(older / f"corsa_latent_{DATE}.tif", "w", **{**profile, "count": len(keep)}) as dst:
        dst.write(values)
        for i, name in enumerate(names, 1):
            dst.set_band_description(i, name)
    decoded = {}
    for name, src in (("refined", folder), ("older", older)):
        assert cli.main(["pack", str(src), "-o", str(tmp_path / f"{name}-product"), *args]) == 0
        (path,) = stored_files(tmp_path / f"{name}-product")
        version = stream_format.read_header(path.read_bytes(), path.name)["version"]
        assert version == (10 if name == "refined" else 7), (name, version)
        assert cli.main(["decompress", str(src), "-o", str(tmp_path / f"{name}.tif"), *args]) == 0
        with rasterio.open(tmp_path / f"{name}.tif") as f:
            decoded[name] = f.read()
        opened = xr.open_dataset(src, engine="corsa", mask_and_scale=False, model=model, quality=QUALITY)
        np.testing.assert_array_equal(opened.reflectance.isel(time=0).values, decoded[name])
    data = scene[1]
    assert psnr(data, decoded["refined"]) > psnr(data, decoded["older"]) + 0.1
