"""The JPEG 2000 residual layer's coder (``corsa.codec.residual_coder``) on a real residual: corsa4.1's level-9
decoding of a Major-TOM block, a band's codestream at the target where its error falls by lambda a bit (within 2 %
of the cheapest of targets 3 dB apart by squared error plus lambda times the bits), decoded by GDAL to the integers OpenJPEG's own decoder gives; none where it does not pay; a
damaged codestream refused by name."""
import numpy as np
import pytest

imagecodecs = pytest.importorskip("imagecodecs")

from corsa.codec import residual_coder
from corsa.codec.latent_coder import StreamError
from corsa.codec.models import VariableRateCodec
from corsa.formats import stream_format
from test_service import majortom  # noqa: F401  (a fixture)

LEVEL = 9


@pytest.fixture(scope="module")
def residual(majortom):
    data = majortom.data[:, 100:356, 200:456].copy()
    codec = VariableRateCodec("corsa4.1", threads=1)
    ints = codec.quantise(codec.latent(data, LEVEL), LEVEL)
    valid = np.ones(data.shape[1:], bool)
    _, rec, cells = stream_format.encode_refined(codec, data, ints, LEVEL, ~valid, None, None, "undated")
    stream_format.refine(rec, cells, codec.refiner, codec.level(LEVEL), valid)
    return data[0].astype(np.float32) - rec[0]


def test_a_band_is_coded_where_its_error_falls_by_lambda_and_readers_decode_it_by_gdal(residual):
    lam = 1500.0
    stream, decoded = residual_coder.encode(residual, lam)
    assert stream
    r = residual.astype(np.float64)

    def cost(s, d):
        return float(((r - d) ** 2).sum()) + lam * 8 * len(s) if s else float((r ** 2).sum())

    mse = float(((r - decoded) ** 2).mean())
    assert 0.5 < mse / (lam / (2 * np.log(2))) < 1.5, mse       # the slope's error, as the rule expects
    # the rule's one encoding against the best of targets 3 dB apart: within 2 % of its cost
    best = min(cost(*residual_coder.encode(residual, lam, target=t)) for t in np.arange(56.0, 75.0, 3.0))
    assert cost(stream, decoded) < 1.02 * best
    read = residual_coder.decode(stream, residual.shape)
    np.testing.assert_array_equal(read, decoded)
    np.testing.assert_array_equal(read, imagecodecs.jpeg2k_decode(stream))
    before, after = float((residual ** 2).mean()), float(((residual - read) ** 2).mean())
    assert after < 0.5 * before                       # the layer takes off most of the level's error
    assert (before - after) * residual.size > lam * 8 * len(stream)


def test_where_no_codestream_pays_there_is_none(residual):
    stream, decoded = residual_coder.encode(residual, 1e9)
    assert stream == b"" and not decoded.any()
    assert not residual_coder.decode(b"", residual.shape).any()


def test_a_damaged_or_foreign_codestream_is_refused_by_name(residual):
    stream, _ = residual_coder.encode(residual, 1500.0)
    with pytest.raises(StreamError, match="residual codestream"):
        residual_coder.decode(b"\x00" * 64 + stream[64:], residual.shape)
    with pytest.raises(StreamError, match="expected one of 128 x 128"):
        residual_coder.decode(stream, (128, 128))
