"""corsa3.1's int8 encoder (``training.train_int8_encoder``): the encoder of the default model at the
levels its card lists, alike on the CLI's block path and in the services' UDF (the engine); the same
integers on 1 and 2 threads; a bright tile encoded by the float encoder; within the card's statement
of the float encoder."""
import json

import numpy as np
import pytest
from rasterio.transform import Affine

from corsa.app import cli
from corsa.codec.models import VariableRateCodec, model_dir
from corsa.formats import series
from test_service import majortom, write_scene  # noqa: F401  (majortom: a fixture)

MODEL = "corsa3.1"
DATE = "2022-07-06"


def _ints(product, codec) -> np.ndarray:
    return series.read_date(product, DATE, codec).ints


@pytest.fixture(scope="module")
def scene_file(majortom, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8enc") / "scene.tif"
    write_scene(path, majortom.data[:, 100:364, 200:800], Affine(*majortom.transform) * Affine.translation(200, 100),
                majortom.crs, DATE)
    return path


def test_the_cli_and_the_services_udf_encode_with_the_int8_encoder(scene_file, tmp_path):
    """At a level the card lists, "auto" takes the int8 encoder, on the CLI's blocks as in the services'
    UDF (the same integers); at one it does not, the float encoder's integers."""
    card = json.loads((model_dir(MODEL) / "model_card.json").read_text())
    codec = VariableRateCodec(MODEL)
    listed = card["int8_encoder"]["levels"]
    inside, outside = max(listed), min(q for q in codec.qualities if q not in listed)
    runs = {"blocks": (), "engine": ("--engine",), "fp32": ("--kernels", "fp32"), "int8": ("--kernels", "int8")}
    for q in (inside, outside):
        for name, extra in runs.items():
            assert cli.main(["compress", str(scene_file), "-o", str(tmp_path / f"{name}{q}"), "--quality", str(q), "-q",
                             *extra]) == 0
    ints = {k: _ints(tmp_path / k, codec) for k in (f"{n}{q}" for n in runs for q in (inside, outside))}
    np.testing.assert_array_equal(ints[f"blocks{inside}"], ints[f"engine{inside}"])
    np.testing.assert_array_equal(ints[f"blocks{inside}"], ints[f"int8{inside}"])
    changed = float((ints[f"blocks{inside}"] != ints[f"fp32{inside}"]).mean())
    assert 0 < changed <= 2 * card["int8_encoder"]["test"]["levels"][str(inside)]["integers_changed"] + 0.01
    for name in ("blocks", "engine"):
        np.testing.assert_array_equal(ints[f"{name}{outside}"], ints[f"fp32{outside}"])
    assert (ints[f"int8{outside}"] != ints[f"fp32{outside}"]).any()


def test_int8_encoding_is_the_same_on_1_and_2_threads(majortom):
    one, two = (VariableRateCodec(MODEL, threads=t, kernels="int8") for t in (1, 2))
    x = majortom.data[:, :520, :520]
    assert one.network_entry(one.default_quality, "encoder") == "encoder_int8"
    np.testing.assert_array_equal(one.encode(x, one.default_quality), two.encode(x, one.default_quality))


def test_a_bright_tile_encodes_with_the_float_encoder(data_root, majortom):
    """At a level the card lists, snow (TerraMesh's snow-covered cell) is encoded by the float encoder
    under "auto": the integers are the float encoder's; a scene without bright tiles gets the int8
    encoder's."""
    from corsa.formats.datasets import LOADERS

    snow = next(s for s in LOADERS["terramesh"](data_root) if s.name == "609U_541L_3_0-S2L2A").data[:, :512, :512]
    auto, fp32, int8 = (VariableRateCodec(MODEL, kernels=k) for k in ("auto", "fp32", "int8"))
    q = max(json.loads((model_dir(MODEL) / "model_card.json").read_text())["int8_encoder"]["levels"])
    np.testing.assert_array_equal(auto.encode(snow, q), fp32.encode(snow, q))
    assert (int8.encode(snow, q) != fp32.encode(snow, q)).any()
    clear = majortom.data[:, :264, :264]
    np.testing.assert_array_equal(auto.encode(clear, q), int8.encode(clear, q))
