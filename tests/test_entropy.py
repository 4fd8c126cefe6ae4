"""Index coding on real scenes' indices: lossless, smaller than fixed width, corrupt streams refused."""
import numpy as np
import pytest

from corsa.codec.codebook import CodebookCodec
from corsa.formats.datasets import LOADERS
from corsa.codec.index_coder import EntropyModel, StreamError, pack_fixed


@pytest.fixture(scope="module")
def coded(data_root):
    codec = CodebookCodec("corsa512")
    entropy = EntropyModel.load(codec.path)
    scenes = [next(LOADERS["terracodec"](data_root)), next(LOADERS["bigearthnet"](data_root))]
    return codec, entropy, [codec.encode(s.data) for s in scenes]


def test_pack_fixed_is_exactly_the_index_bits(coded):
    codec, _, indices = coded
    for idx0, idx1 in indices:
        bits = idx0.size * 9 + idx1.size * 7
        assert len(pack_fixed(idx0, idx1, 512, 128)) == -(-bits // 8)


def test_range_coding_is_lossless_and_beats_fixed_width(coded):
    _, entropy, indices = coded
    for idx0, idx1 in indices:
        stream = entropy.encode(idx0, idx1)
        back0, back1 = entropy.decode(stream, idx0.shape)
        np.testing.assert_array_equal(back0, idx0)
        np.testing.assert_array_equal(back1, idx1)
        assert len(stream) < 0.9 * len(pack_fixed(idx0, idx1, 512, 128))
        # the coder stays within 2% (plus its header) of the model's ideal code length
        assert len(stream) <= entropy.bits(idx0, idx1) / 8 * 1.02 + 64


def test_bad_streams_are_refused(coded):
    _, entropy, indices = coded
    idx0, idx1 = indices[1]
    stream = entropy.encode(idx0, idx1)
    with pytest.raises(StreamError, match="magic"):
        entropy.decode(b"XXXX" + stream[4:])
    with pytest.raises(StreamError, match="expected"):
        entropy.decode(stream, (idx0.shape[0] + 2, idx0.shape[1]))
    with pytest.raises(StreamError):
        entropy.decode(stream[:7])
    with pytest.raises(StreamError, match="inconsistent"):
        entropy.decode(stream[:-1])


def test_rare_codes_stay_codable(coded):
    """A code the training split never used must still round-trip (smoothing keeps p > 0)."""
    _, entropy, indices = coded
    idx0, idx1 = indices[1]
    idx0 = idx0.copy()
    idx0[:4, :4] = np.argmin(entropy.marg[0])
    back0, _ = entropy.decode(entropy.encode(idx0, idx1))
    np.testing.assert_array_equal(back0, idx0)
