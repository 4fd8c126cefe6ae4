"""Scene classes straight from the compressed product: CLI -> corsa_openeo_classify graph -> class GeoTIFF."""
import json

import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
from rasterio.transform import Affine

import corsa_udf
from corsa.app import cli
from corsa.formats import codebook_product
from corsa.formats import series
from corsa.blocks.classmap import Classifier
from corsa.codec.codebook import CodebookCodec
from corsa.codec.models import DEFAULT_MODEL, ModelError, VariableRateCodec
from corsa.openeo.engine import Engine
from corsa.openeo.processes import GRAPHS_DIR
from corsa.formats.sources import Catalogue
from corsa.formats.datasets import LOADERS, revisit_series
from training.classify import BandClassifier, FeatureClassifier
from training.scl_labels import CLASSES, mean_grid20, merge_scl, to_grid20

from test_service import write_scene


@pytest.fixture(scope="module")
def scene(data_root):
    """A WorldStrat scene of a test-split location (never seen by the codec or the classifier)."""
    return next(s for s in LOADERS["worldstrat"](data_root) if s.name == "Landcover-461460-01-L2A")


@pytest.fixture(scope="module")
def codec():
    return CodebookCodec("corsa512", threads=1)


@pytest.fixture(scope="module")
def classifier():
    return Classifier(threads=1)


def test_classify_cli_on_a_real_product(tmp_path, scene, codec, classifier):
    data = scene.data.copy()
    data[:, :10, :13] = 0                                           # a nodata corner
    write_scene(tmp_path / "in.tif", data, Affine(*scene.transform), scene.crs, scene.date)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "prod"), "--model", "corsa512"]) == 0
    assert cli.main(["classify", str(tmp_path / "prod"), "-o", str(tmp_path / "classes.tif")]) == 0
    assert not list(tmp_path.glob("*.part"))

    d = codebook_product.read_date(tmp_path / "prod", scene.date)
    with rasterio.open(tmp_path / "prod" / codebook_product.file_names(scene.date)["L0"]) as l0, \
            rasterio.open(tmp_path / "classes.tif") as src:
        assert (src.transform, src.shape, src.crs) == (l0.transform, l0.shape, l0.crs)
        assert src.dtypes[0] == "uint8" and src.nodata == 0
        classes = src.read(1)
        colormap = src.colormap(1)
        names = json.loads(src.tags()["CORSA_CLASSES"])
    assert names == {str(v): n for v, n, *_ in CLASSES}
    for value, _, _, rgb in CLASSES:
        assert colormap[value][:3] == rgb
    f0, f1 = codec.features(d.idx0, d.idx1)                          # the ONNX classifier run by hand
    (logits,) = classifier.session.run(None, {"f0": f0[None], "f1": f1[None]})
    direct = logits[0].argmax(0) + 1
    h, w = -(-data.shape[1] // 2), -(-data.shape[2] // 2)            # 20 m cells inside the input
    nodata = d.nodata[::2, ::2]
    np.testing.assert_array_equal(classes[:h, :w], np.where(nodata, 0, direct[:h, :w]))
    assert (classes[h:] == 0).all() and (classes[:, w:] == 0).all()
    assert classes[0, 0] == 0 and set(np.unique(classes[:h, :w][~nodata])) <= {v for v, *_ in CLASSES}
    # the classes agree with the scene's own SCL on most cells (a real signal, not a constant)
    with rasterio.open(scene.extra["scl"]) as s:
        label = to_grid20(merge_scl(s.read(1)))
    keep = (label > 0) & (classes > 0)
    assert (classes[keep] == label[keep]).mean() > 0.6 and len(np.unique(classes[keep])) > 1


def test_onnx_matches_torch(scene, codec, classifier):
    f0, f1 = codec.features(*codec.encode(scene.data))
    state = torch.load(classifier.path / "torch_state.pt", weights_only=True)
    n = len(CLASSES)
    for kind, model, feeds in (
            ("features", FeatureClassifier(f0.shape[0], f1.shape[0], n), {"f0": f0[None], "f1": f1[None]}),
            ("bands", BandClassifier(scene.data.shape[0], n), {"bands": mean_grid20(scene.data)[None]})):
        model.load_state_dict(state[kind])
        model.eval()
        with torch.no_grad():
            ref = model(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        path = classifier.path / classifier.card["files"]["classifier" if kind == "features" else "reference_bands"]["path"]
        (out,) = corsa_udf.session(str(path), 1).run(None, feeds)
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
        assert (out.argmax(1) == ref.argmax(1)).mean() > 0.999


def test_labels_are_the_mode_of_merged_scl(data_root):
    scl = np.array([[4, 4, 8, 9], [4, 5, 10, 3], [6, 0, 7, 7], [0, 0, 7, 11]], np.uint8)
    # cells: {4,4,4,5} -> vegetation; {8,9,10,3} -> cloud; {6,0,0,0} -> too few labels; {7,7,7,11} -> too few
    np.testing.assert_array_equal(to_grid20(merge_scl(scl)), [[1, 5], [0, 0]])


def test_classifier_refuses_other_models(codec):
    with pytest.raises(ModelError, match="not a classifier card"):
        Classifier("corsa512")


def test_udf_classify_of_a_codebook_model_needs_a_classifier(codec):
    cube = xr.DataArray(np.zeros((3, 8, 8)), dims=("bands", "y", "x"), coords={"bands": ["idx0", "idx1", "nodata"]})
    with pytest.raises(corsa_udf.UdfError, match="classifier"):
        corsa_udf.apply_datacube(cube, {"mode": "classify", "model": str(codec.path)})


def test_decompress_clear_sets_cloud_pixels_to_zero(tmp_path, data_root, codec, classifier):
    """corsa_openeo_decompress_clear (via corsa decompress --clear) = decoded bands, 0 where the classes say cloud/shadow."""
    s = next(x for x in LOADERS["worldstrat"](data_root) if x.name == "Landcover-461460-04-L2A")
    write_scene(tmp_path / "in.tif", s.data, Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "prod"), "--model", "corsa512"]) == 0
    assert cli.main(["decompress", str(tmp_path / "prod"), "-o", str(tmp_path / "clear.tif"), "--clear"]) == 0
    with rasterio.open(tmp_path / "clear.tif") as src:
        out = src.read()
    d = codebook_product.read_date(tmp_path / "prod", s.date)
    classes = classifier.predict(codec, d.idx0, d.idx1)
    unusable = np.repeat(np.repeat(np.isin(classes, (5, 6)), 2, 0), 2, 1)[: out.shape[1], : out.shape[2]]
    assert 0 < unusable.mean() < 1
    np.testing.assert_array_equal(out, np.where(unusable, 0, codec.decode(d.idx0, d.idx1, out.shape[1:])))


def test_ready_service_classifies_like_the_product(tmp_path, scene, codec, classifier):
    """corsa_openeo_classify_s2 (load, compress, classify, save) on the embedded engine gives the classes of the product's indices."""
    write_scene(tmp_path / "in.tif", scene.data, Affine(*scene.transform), scene.crs, scene.date)
    engine = Engine(Catalogue({"SENTINEL2_L2A": tmp_path / "in.tif"}), output=tmp_path / "out")
    engine.run(json.loads((GRAPHS_DIR / "corsa_openeo_classify_s2.json").read_text()), spatial_extent=None,
               temporal_extent=None, model=str(codec.path), classifier=str(classifier.path))
    with rasterio.open(engine.written[0]) as src:
        out = src.read(1)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "prod"), "--model", "corsa512"]) == 0
    d = codebook_product.read_date(tmp_path / "prod", scene.date)
    classes = classifier.predict(codec, d.idx0, d.idx1)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(classes, 2, 0), 2, 1)[: out.shape[0], : out.shape[1]])


# -- the default model's own head ---------------------------------------------------------------

def test_classify_and_clear_of_the_default_models_product(tmp_path, scene):
    """`corsa classify` of a product of the default model (no --model anywhere): its own head on the
    stored latent, through corsa_openeo_classify; --clear masks what that head calls cloud/shadow."""
    vr = VariableRateCodec(DEFAULT_MODEL)
    write_scene(tmp_path / "in.tif", scene.data, Affine(*scene.transform), scene.crs, scene.date)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "prod")]) == 0
    assert cli.main(["classify", str(tmp_path / "prod"), "-o", str(tmp_path / "classes.tif")]) == 0
    assert cli.main(["decompress", str(tmp_path / "prod"), "-o", str(tmp_path / "clear.tif"), "--clear"]) == 0
    assert cli.main(["decompress", str(tmp_path / "prod"), "-o", str(tmp_path / "all.tif")]) == 0
    # the block path's --clear is the published service's, corsa_openeo_decompress_clear on the engine
    assert cli.main(["decompress", str(tmp_path / "prod"), "-o", str(tmp_path / "engine.tif"), "--clear", "--engine"]) == 0
    with rasterio.open(tmp_path / "clear.tif") as a, rasterio.open(tmp_path / "engine.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    stored = series.read_date(tmp_path / "prod", scene.date, vr)
    head = corsa_udf.session(str(vr.path / vr.card["heads"]["scl"]["path"]), 1)
    (logits,) = head.run(None, {"latent": vr.dequantise(stored.ints, stored.quality)[None]})
    direct = logits[0].argmax(0) + 1
    with rasterio.open(tmp_path / "classes.tif") as src:
        classes = src.read(1)
        names = json.loads(src.tags()["CORSA_CLASSES"])
    assert names == {str(v): n for v, n, *_ in CLASSES}
    h, w = -(-scene.data.shape[1] // 2), -(-scene.data.shape[2] // 2)
    np.testing.assert_array_equal(classes[:h, :w], np.where(stored.nodata[::2, ::2], 0, direct[:h, :w])
                                  if stored.nodata is not None else direct[:h, :w])
    with rasterio.open(scene.extra["scl"]) as s:
        label = to_grid20(merge_scl(s.read(1)))
    keep = (label > 0) & (classes > 0)
    assert (classes[keep] == label[keep]).mean() > 0.6 and len(np.unique(classes[keep])) > 1
    with rasterio.open(tmp_path / "clear.tif") as a, rasterio.open(tmp_path / "all.tif") as b:
        clear, everything = a.read(), b.read()
    unusable = np.repeat(np.repeat(np.isin(classes, (5, 6)), 2, 0), 2, 1)[: clear.shape[1], : clear.shape[2]]
    np.testing.assert_array_equal(clear, np.where(unusable, 0, everything))


def test_clear_and_fill_fills_a_dates_clouds_from_the_other_dates(tmp_path, data_root):
    """--clear --fill: the pixels --clear sets to 0 come from the other dates where those show the ground (brought
    to the date's light, as --fill fills nodata); every other pixel is --clear's."""
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == "Landcover-461460"])
    (tmp_path / "in").mkdir()
    for s in run[:6]:
        write_scene(tmp_path / "in" / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    prod = tmp_path / "prod"
    assert cli.main(["compress", str(tmp_path / "in"), "-o", str(prod), "-q"]) == 0
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "clear"), "--clear", "-q"]) == 0
    assert cli.main(["decompress", str(prod), "-o", str(tmp_path / "filled"), "--clear", "--fill", "-q"]) == 0
    cleared = filled = 0
    for s in run[:6]:
        with rasterio.open(tmp_path / "clear" / f"corsa_decoded_{s.date}.tif") as a, \
                rasterio.open(tmp_path / "filled" / f"corsa_decoded_{s.date}.tif") as b:
            clear, fill = a.read(), b.read()
        gone = (clear == 0).all(0)
        np.testing.assert_array_equal(fill[:, ~gone], clear[:, ~gone])
        cleared, filled = cleared + gone.sum(), filled + (gone & (fill > 0).all(0)).sum()
    assert cleared > 1000 and filled > 0.5 * cleared, (cleared, filled)


# -- land cover from the default model's codes ---------------------------------------------------

def test_land_cover_of_the_default_models_product(tmp_path, data_root):
    """`corsa classify --classes landcover` of a TerraMesh cell's product: the model's land-cover
    head on the stored latent (through corsa_openeo_classify), named classes in the GeoTIFF, and
    agreement with the cell's land-cover map on its test quadrant."""
    from training import landcover_labels

    vr = VariableRateCodec(DEFAULT_MODEL)
    scene = next(s for s in LOADERS["terramesh"](data_root) if s.location == "terramesh-38D_378R_2_3")
    write_scene(tmp_path / "in.tif", scene.data, Affine(*scene.transform), scene.crs, scene.date)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "prod")]) == 0
    assert cli.main(["classify", str(tmp_path / "prod"), "-o", str(tmp_path / "lc.tif"), "--classes", "landcover"]) == 0
    stored = series.read_date(tmp_path / "prod", scene.date, vr)
    head = corsa_udf.session(str(vr.path / vr.card["heads"]["landcover"]["path"]), 1)
    (logits,) = head.run(None, {"latent": vr.dequantise(stored.ints, stored.quality)[None]})
    with rasterio.open(tmp_path / "lc.tif") as src:
        classes = src.read(1)
        names = json.loads(src.tags()["CORSA_CLASSES"])
        assert src.transform == Affine(*scene.transform) * Affine.scale(2)
    assert names == {str(v): n for v, n, *_ in landcover_labels.CLASSES}
    np.testing.assert_array_equal(classes, logits[0].argmax(0) + 1)
    place = next(p for p in landcover_labels.places(data_root)
                 if p["location"].startswith(scene.location) and p["split"] == "test")
    rows, cols = (slice(s.start // 2, s.stop // 2) for s in place["window"])
    label = to_grid20(place["label"], values=tuple(v for v, *_ in landcover_labels.CLASSES))
    assert (classes[rows, cols] == label).mean() > 0.6 and len(np.unique(classes)) > 1


def test_land_cover_is_refused_for_a_codebook_product(tmp_path, scene, capsys):
    write_scene(tmp_path / "in.tif", scene.data, Affine(*scene.transform), scene.crs, scene.date)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "p"), "--model", "corsa512"]) == 0
    assert cli.main(["classify", str(tmp_path / "p"), "-o", str(tmp_path / "lc.tif"), "--classes", "landcover"]) == 2
    assert "scene classes only" in capsys.readouterr().err
    assert not (tmp_path / "lc.tif").exists()
