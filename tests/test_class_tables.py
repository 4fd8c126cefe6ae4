"""A model with class tables (``training.fit_classes``) is its source model's networks with other tables:
on test-split scenes it writes the same integers into smaller files, which decode to the same pixels;
its products are refused by the source model (whose tables would misread them). The default's tables
were fitted for the encoder's choice of class (corsa3.10: its source, corsa3.9, has class tables too)."""
import json

import numpy as np
import pytest
from rasterio.transform import Affine

from corsa.app import cli
from corsa.codec.latent_coder import ALPHABET, CONTEXTS
from corsa.codec.models import VariableRateCodec, default_model, model_dir
from corsa.formats.datasets import LOADERS
from corsa.formats import stream_format

from test_service import write_scene

MODEL = default_model()
CARD = json.loads((model_dir(MODEL) / "model_card.json").read_text())
SOURCE = CARD["class_tables"]["from"]
# The model that made the default's tables: its products differ from the source's by the tables alone (the
# default may add a loop filter to it, corsa3.11 to corsa3.10, which moves the pixels).
TABLES = ((CARD.get("refine") or {}).get("filter") or {}).get("from", MODEL)


def test_the_default_models_class_tables_sit_next_to_their_source():
    cards = [CARD, json.loads((model_dir(SOURCE) / "model_card.json").read_text())]
    for key in ("encoder", "decoder", "decoder_int8", "temporal_model"):
        assert cards[0]["files"][key]["sha256"] == cards[1]["files"][key]["sha256"], key
    assert cards[0]["files"]["latent_model"]["sha256"] != cards[1]["files"]["latent_model"]["sha256"]
    assert VariableRateCodec(MODEL).coder.classes == CARD["class_tables"]["classes"] > 1


@pytest.mark.parametrize("group, name", [("terramesh", "609U_541L_3_0-S2L2A"), ("terracodec", "ssl4eos12_val_0181476_0")])
def test_the_same_integers_in_fewer_bytes(data_root, group, name):
    scene = next(s for s in LOADERS[group](data_root) if s.name == name)
    new, old = VariableRateCodec(MODEL), VariableRateCodec(SOURCE)
    nodata = np.zeros(scene.data.shape[1:], bool)
    sizes = []
    for q in new.qualities:
        ints = new.encode(scene.data, q)
        np.testing.assert_array_equal(ints, old.encode(scene.data, q))
        files = [stream_format.encode_date(c.coder, ints, c.level(q), q, nodata, None, None, "undated", c.model_id,
                                           c.card["files"]["decoder"]["sha256"]) for c in (new, old)]
        sizes.append([len(f) for f in files])
        back = stream_format.read_header(files[0], "x")
        for cells, (start, n) in zip(back["blocks"], stream_format.stream_offsets(back)):
            np.testing.assert_array_equal(
                stream_format.decode_block(new.coder, files[0][start:start + n], new.level(q), cells, "x", back["version"]),
                ints[:, cells[0], cells[1]])
    ratio = np.array(sizes)[:, 0] / np.array(sizes)[:, 1]
    # fewer bytes at levels 1-6, at the top levels (few channels left out, most in the densest class) about as many
    assert np.all(ratio[:6] < 1) and np.mean(ratio[:6]) < 0.98 and np.all(ratio < 1.02), sizes


def test_its_products_decode_to_the_source_models_pixels_and_only_with_it(data_root, tmp_path, capsys):
    scene = next(s for s in LOADERS["worldstrat"](data_root))
    write_scene(tmp_path / "in.tif", scene.data, Affine(*scene.transform), scene.crs, scene.date)
    for m in (TABLES, SOURCE):
        assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / m), "--model", m, "-q"]) == 0
        assert cli.main(["decompress", str(tmp_path / m), "-o", str(tmp_path / f"{m}.tif"), "-q"]) == 0
    import rasterio

    with rasterio.open(tmp_path / f"{TABLES}.tif") as a, rasterio.open(tmp_path / f"{SOURCE}.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    (new,), (old,) = (list((tmp_path / m).glob("*.corsa")) for m in (TABLES, SOURCE))
    assert new.stat().st_size < old.stat().st_size
    capsys.readouterr()
    assert cli.main(["decompress", str(tmp_path / TABLES), "-o", str(tmp_path / "wrong.tif"), "--model", SOURCE]) != 0
    assert "decoding would give wrong reflectances" in capsys.readouterr().err
    assert not (tmp_path / "wrong.tif").exists()


def test_each_channel_is_coded_with_the_class_that_codes_it_in_fewest_bits(data_root):
    """The encoder searches a block's classes for each channel (the map holds its choice, the decoder
    reads it): a second count, class by class from the tables' probabilities, finds no class that codes
    a channel in fewer bits; the choice varies between channels and the stream decodes to the same integers."""
    from corsa.codec import latent_coder as lc

    scene = next(s for s in LOADERS["terracodec"](data_root) if s.name == "ssl4eos12_val_0181476_0")
    codec = VariableRateCodec(MODEL)
    coder = codec.coder
    for q in (1, 5, 9):
        ints, level = codec.encode(scene.data, q), codec.level(q)
        sym = lc.symbols(ints).reshape(len(ints), -1)
        layout = lc._layout(*ints.shape[1:])
        ids = layout.grid(*lc._part_ids(sym, layout, None))
        chans = np.flatnonzero((sym != lc.M).any(1))
        chosen = coder.best_classes(sym[chans], chans, ids[chans], level)
        logp = -np.log2(coder.freq[level].astype(np.float64) / (1 << lc.PRECISION))
        bits = np.array([[logp[(k - 1) * lc.CONTEXTS + ids[c], c, sym[c]].sum() for k in range(1, coder.classes + 1)]
                         for c in chans])
        assert np.all(bits[np.arange(len(chans)), chosen - 1] <= bits.min(1) + 1e-3)
        assert len(set(chosen.tolist())) > 2
        stream = coder.encode(ints, level)
        np.testing.assert_array_equal(coder.decode(stream, level, ints.shape), ints)


def test_tables_fitted_for_the_encoders_choice_code_in_fewer_bits_each_round(data_root):
    """``training.fit_classes`` on eight scenes' blocks: from each channel in the class of its nonzero share,
    each round of choosing classes and counting tables codes the blocks in fewer bits (never more than 0.1%
    above the round before), the last clearly fewer than the start, and the final tables fewer still."""
    from training import fit_classes

    scenes = list(LOADERS["worldstrat"](data_root))[:8]
    codec = VariableRateCodec(SOURCE, kernels="fp32")
    hists, plain = fit_classes.histograms(codec, [codec.latent(s.data) for s in scenes], 4)
    coder, history = fit_classes.fit_level(hists, plain, np.array([1 / 16, 1 / 4, 1 / 2]), 6, 4, 32.0, 0)
    assert coder.classes == 6 and coder.freq.shape == (1, 6 * CONTEXTS, codec.channels, ALPHABET)
    assert len(history) == 5 and all(b <= a * 1.001 for a, b in zip(history, history[1:])), history
    assert history[-1] < 0.99 * history[0], history
    assert fit_classes.level_bits(hists, coder, 0) <= history[-1]
