"""corsa3.1's int8 encoder (``training.train_int8_encoder``; corsa3.2 ships the same file): taken when asked (``--kernels int8``),
never by default (its card lists no level: what an encoder costs is stored); its integers within the
card's statement of the float encoder's; the same on 1 and 2 threads (the services' UDF: in
``test_backend_chunks.py``)."""
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


def test_compress_takes_the_int8_encoder_when_asked(majortom, tmp_path):
    card = json.loads((model_dir(MODEL) / "model_card.json").read_text())
    codec = VariableRateCodec(MODEL)
    q = codec.default_quality
    assert codec.network_entry(q, "encoder") == "encoder" and card["int8_encoder"]["levels"] == []
    path = tmp_path / "scene.tif"
    write_scene(path, majortom.data[:, 100:364, 200:800], Affine(*majortom.transform) * Affine.translation(200, 100),
                majortom.crs, DATE)
    for name, extra in (("auto", ()), ("fp32", ("--kernels", "fp32")), ("int8", ("--kernels", "int8"))):
        assert cli.main(["compress", str(path), "-o", str(tmp_path / name), "-q", "--model", MODEL, *extra]) == 0
    ints = {k: series.read_date(tmp_path / k, DATE, codec).ints for k in ("auto", "fp32", "int8")}
    np.testing.assert_array_equal(ints["auto"], ints["fp32"])
    changed = float((ints["int8"] != ints["fp32"]).mean())
    assert 0 < changed <= 2 * card["int8_encoder"]["test"]["levels"][str(q)]["integers_changed"] + 0.01
    assert cli.main(["compress", str(path), "-o", str(tmp_path / "e"), "-q", "--model", MODEL, "--engine", "--kernels",
                     "int8"]) == 2


def test_int8_encoding_is_the_same_on_1_and_2_threads(majortom):
    one, two = (VariableRateCodec(MODEL, threads=t, kernels="int8") for t in (1, 2))
    x = majortom.data[:, :520, :520]
    assert one.network_entry(one.default_quality, "encoder") == "encoder_int8"
    np.testing.assert_array_equal(one.encode(x, one.default_quality), two.encode(x, one.default_quality))
    with pytest.raises(Exception, match="kernels must be one of"):
        VariableRateCodec(MODEL, kernels="int4").encoder_for(one.default_quality)
