"""A model's int8 decoder (``training.train_int8``): the decoder of a model that has one by default,
alike on the CLI's block path, in the services' UDF (the engine) and through the Python API; the
same pixels on 1 and 2 threads; within the card's stated distance of the float decoder."""
import json

import corsa_udf
import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from corsa.app import cli
from corsa.codec.models import ModelError, VariableRateCodec, model_dir
from corsa.core.metrics import psnr
from test_service import majortom, write_scene  # noqa: F401  (majortom: a fixture)

MODEL = "corsa4b"
DATE = "2022-07-06"


@pytest.fixture(scope="module")
def scene(majortom):
    return majortom.data[:, 100:364, 200:800].copy()        # 264 x 600 px: two blocks side by side


@pytest.fixture(scope="module")
def product(scene, majortom, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    path = folder / "scene.tif"
    write_scene(path, scene, Affine(*majortom.transform) * Affine.translation(200, 100), majortom.crs, DATE)
    assert cli.main(["compress", str(path), "-o", str(folder / "product"), "--model", MODEL]) == 0
    return folder / "product"


def _decoded(product, out, *extra) -> np.ndarray:
    assert cli.main(["decompress", str(product), "-o", str(out), *extra]) == 0
    with rasterio.open(out) as f:
        return f.read()


def test_the_cli_and_the_services_udf_decode_with_the_int8_decoder(product, scene, tmp_path):
    card = json.loads((model_dir(MODEL) / "model_card.json").read_text())
    assert "decoder_int8" in card["files"]
    blocks = _decoded(product, tmp_path / "blocks.tif")
    np.testing.assert_array_equal(blocks, _decoded(product, tmp_path / "engine.tif", "--engine"))
    fp32 = _decoded(product, tmp_path / "fp32.tif", "--kernels", "fp32")
    assert (blocks != fp32).any()                       # another decoder ran ...
    stated = card["int8"]["test"]
    assert psnr(scene, blocks) >= psnr(scene, fp32) - stated["psnr_loss_db_max"]   # ... as close as its card says
    assert np.abs(blocks.astype(int) - fp32).max() <= stated["max_dn_difference"]


def test_int8_decoding_is_the_same_on_1_and_2_threads(scene):
    # the codec's threads run tiles side by side (its tile is under the scene's width: two of them);
    # a back end's UDF runs one tile on the session's intra-op threads
    one, two = VariableRateCodec(MODEL, threads=1), VariableRateCodec(MODEL, threads=2)
    assert one.network_entry() == "decoder_int8" and one.tile < scene.shape[2]
    ints = one.encode(scene, one.default_quality)
    np.testing.assert_array_equal(one.decode(ints, one.default_quality), two.decode(ints, one.default_quality))
    path = str(one.path / one.card["files"]["decoder_int8"]["path"])
    z = one.dequantise(ints, one.default_quality)
    np.testing.assert_array_equal(*(corsa_udf.synthesise(corsa_udf.session(path, t), z, one.tile, one.overlap)
                                    for t in (1, 2)))
    assert VariableRateCodec(MODEL, kernels="fp32").network_entry() == "decoder"
    assert VariableRateCodec("corsa3").network_entry() == "decoder"     # a model without one: its float decoder
    with pytest.raises(ModelError, match="kernels must be one of 'auto', 'int8', 'fp32', not 'int4'"):
        VariableRateCodec(MODEL, kernels="int4").network_entry()


def test_int8_kernels_decode_the_levels_the_card_lists(scene, majortom, tmp_path):
    """corsa3.1's int8 decoder costs its high levels more than the 0.05 dB its card allows: a product at
    such a level decodes with the float decoder by default, one at a listed level with the int8 one."""
    card = json.loads((model_dir("corsa3.1") / "model_card.json").read_text())
    listed = card["int8"]["levels"]
    inside, outside = max(listed), min(q["quality"] for q in card["qualities"] if q["quality"] not in listed)
    path = tmp_path / "scene.tif"
    write_scene(path, scene, Affine(*majortom.transform) * Affine.translation(200, 100), majortom.crs, DATE)
    for quality, same_as in ((inside, "int8"), (outside, "fp32")):
        product = tmp_path / f"q{quality}"
        assert cli.main(["compress", str(path), "-o", str(product), "--model", "corsa3.1", "--quality", str(quality)]) == 0
        default = _decoded(product, tmp_path / f"{quality}.tif")
        np.testing.assert_array_equal(default, _decoded(product, tmp_path / f"{quality}{same_as}.tif", "--kernels", same_as))
        if same_as == "fp32":     # the services' UDF leaves the int8 decoder out at that level too
            np.testing.assert_array_equal(default, _decoded(product, tmp_path / f"{quality}e.tif", "--engine"))
        other = {"int8": "fp32", "fp32": "int8"}[same_as]
        assert (default != _decoded(product, tmp_path / f"{quality}{other}.tif", "--kernels", other)).any()


@pytest.fixture(scope="module")
def snow(data_root):
    """TerraMesh's snow-covered cell (Minnesota, January; test split): int8 kernels lose most on it."""
    from corsa.formats.datasets import LOADERS
    return next(s for s in LOADERS["terramesh"](data_root) if s.name == "609U_541L_3_0-S2L2A")


def test_auto_decodes_bright_tiles_with_the_float_decoder(snow, majortom, tmp_path):
    """"auto" decodes a tile again in float where its int8 decode is bright: on snow it is the float
    decoder's image, on the CLI's block path as in the services' UDF; elsewhere the int8 one's."""
    path = tmp_path / "snow.tif"
    write_scene(path, snow.data, Affine(*snow.transform), snow.crs, "2020-01-11")
    assert cli.main(["compress", str(path), "-o", str(tmp_path / "product"), "--model", "corsa3.1"]) == 0
    auto = _decoded(tmp_path / "product", tmp_path / "auto.tif")
    np.testing.assert_array_equal(auto, _decoded(tmp_path / "product", tmp_path / "engine.tif", "--engine"))
    int8 = _decoded(tmp_path / "product", tmp_path / "int8.tif", "--kernels", "int8")
    fp32 = _decoded(tmp_path / "product", tmp_path / "fp32.tif", "--kernels", "fp32")
    np.testing.assert_array_equal(auto, fp32)
    assert psnr(snow.data, auto) > psnr(snow.data, int8) + 0.3
    codec = VariableRateCodec("corsa3.1")
    clear = majortom.data[:, :264, :264]
    ints = codec.encode(clear, codec.default_quality)
    np.testing.assert_array_equal(codec.decode(ints, codec.default_quality),
                                  VariableRateCodec("corsa3.1", kernels="int8").decode(ints, codec.default_quality))


def test_the_int8_decoders_upsampling_and_pruning(majortom):
    """The int8 decoder's upsamplings (transposed convolutions, ``SubPixelUp``) give the float
    decoder's sums; pruning a residual branch keeps the inner channels that matter: with the half it
    keeps, the decoder is far closer to the float one than with the other half."""
    import torch

    from training.export_rate import load_model
    from training.train_int8 import Int8Decoder, QResBlock, important, pruned

    model = load_model(model_dir("corsa3.1"))
    codec = VariableRateCodec("corsa3.1")
    q = codec.default_quality
    x = majortom.data[:, :256, :256]
    z = torch.from_numpy(codec.dequantise(codec.encode(x, q), q)[None])
    with torch.no_grad():
        fp32 = model.synthesis(z)
        assert float((Int8Decoder(model).quantise(False).eval()(z) - fp32).abs().max()) < 0.05   # DN
        kept = Int8Decoder(model, hidden=48, sample=z).quantise(False).eval()
        other = Int8Decoder(model, hidden=48, sample=z).quantise(False).eval()
        h = model.dec[0](z)
        for i, b in enumerate(model.dec[1:4]):
            rest = torch.tensor(sorted(set(range(96)) - set(important(b, h, 48).tolist())))
            other.blocks40[i] = QResBlock(pruned(b, rest), "gelu")
            h = b(h)
        other.quantise(False)
        assert kept.blocks40[0].conv1.conv.weight.shape == (48, 96, 3, 3)
        err = {name: float(((net(z) - fp32) ** 2).mean()) for name, net in (("kept", kept), ("other", other))}
    assert err["kept"] < err["other"] / 20
