"""A model with class tables (``training.fit_classes``) is its source model's networks with other tables:
on test-split scenes it writes the same integers into smaller files, which decode to the same pixels;
its products are refused by the source model (whose tables would misread them)."""
import json

import numpy as np
import pytest
from rasterio.transform import Affine

from corsa.app import cli
from corsa.codec.models import VariableRateCodec, default_model, model_dir
from corsa.formats.datasets import LOADERS
from corsa.formats import stream_format

from test_service import write_scene

DEFAULT = json.loads((model_dir(default_model()) / "model_card.json").read_text())
MODEL = DEFAULT["refine"]["from"] if "refine" in DEFAULT else DEFAULT["id"]   # the default's tables, unrefined
CARD = json.loads((model_dir(MODEL) / "model_card.json").read_text())
SOURCE = CARD["class_tables"]["from"]


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
    for m in (MODEL, SOURCE):
        assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / m), "--model", m, "-q"]) == 0
        assert cli.main(["decompress", str(tmp_path / m), "-o", str(tmp_path / f"{m}.tif"), "-q"]) == 0
    import rasterio

    with rasterio.open(tmp_path / f"{MODEL}.tif") as a, rasterio.open(tmp_path / f"{SOURCE}.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    (new,), (old,) = (list((tmp_path / m).glob("*.corsa")) for m in (MODEL, SOURCE))
    assert new.stat().st_size < old.stat().st_size
    capsys.readouterr()
    assert cli.main(["decompress", str(tmp_path / MODEL), "-o", str(tmp_path / "wrong.tif"), "--model", SOURCE]) != 0
    assert "decoding would give wrong reflectances" in capsys.readouterr().err
    assert not (tmp_path / "wrong.tif").exists()


def test_each_channel_is_coded_with_the_class_that_codes_it_in_fewest_bits(data_root):
    """The encoder searches a block's classes for each channel (the map holds its choice, the decoder
    reads it): never more bits than the class of the channel's nonzero share that the tables were
    fitted by, fewer on the whole, and the stream decodes to the same integers."""
    from corsa.codec import latent_coder as lc

    scene = next(s for s in LOADERS["terracodec"](data_root) if s.name == "ssl4eos12_val_0181476_0")
    codec = VariableRateCodec(MODEL)
    coder, saved = codec.coder, []
    for q in (1, 5, 9):
        ints, level = codec.encode(scene.data, q), codec.level(q)
        sym = lc.symbols(ints).reshape(len(ints), -1)
        layout = lc._layout(*ints.shape[1:])
        ids = layout.grid(*lc._part_ids(sym, layout, None))
        by_share = lc.channel_classes(sym, coder.class_edges)
        chosen, chans = by_share.copy(), np.flatnonzero(by_share)
        chosen[chans] = coder.best_classes(sym[chans], chans, ids[chans], level)
        assert (chosen != by_share).any()
        logp = -np.log2(coder.freq[level].astype(np.float64) / (1 << lc.PRECISION))
        bits = [float((logp[ids + lc.class_offsets(v)[:, None], np.arange(len(sym))[:, None], sym] * (v > 0)[:, None]).sum())
                for v in (chosen, by_share)]
        assert bits[0] <= bits[1]
        saved.append(1 - bits[0] / bits[1])
        stream = coder.encode(ints, level)
        np.testing.assert_array_equal(coder.decode(stream, level, ints.shape), ints)
    assert max(saved) > 0.01, saved
