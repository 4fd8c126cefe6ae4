"""A model with a loop filter (``training.fit_refine --filter``, ``corsa.codec.loop_filter``): per block the
encoder fits a small filter of the network's decoding to the block's truth and stores its integers at
the head of the block's refinement stream; every reader applies it before the refinement's cells.
Real scenes: the same integers as the model it comes from, pixels closer to the input; the CLI's
block path, xarray and the whole-scene path give the same pixels; damage is refused by name. The
default's filter also weighs every band's nearest neighbours, and its encoder weighs each block's filter
against its bits (``corsa_udf.filter_fit``); corsa3.11's products (own neighbours only) read as before."""
import json

import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.transform import Affine

import corsa_udf
from corsa.app import cli
from corsa.codec import loop_filter
from corsa.codec.latent_coder import StreamError
from corsa.codec.models import VariableRateCodec, model_dir
from corsa.core.metrics import psnr
from corsa.core.scene import to_uint16
from corsa.formats import series, stream_format
from corsa.formats.datasets import LOADERS
from test_service import write_scene

MODEL = "corsa3.12"
CARD = json.loads((model_dir(MODEL) / "model_card.json").read_text())
SHAPE = corsa_udf.filter_shape(CARD)
SOURCE = CARD["refine"]["filter"]["from"]


@pytest.fixture(scope="module")
def majortom(data_root):
    """A Major-TOM crop of 2 x 2 blocks (the last ones cut short), where the source model's decoding
    misses the scene's contrast the most of the test split's sources."""
    s = next(iter(LOADERS["majortom"](data_root)))
    return s, s.data[:, :600, :700].copy()


def test_the_filter_weights_round_trip_and_damage_is_refused_by_name(majortom):
    s, data = majortom
    codec = VariableRateCodec(MODEL)
    level = codec.level(9)
    rec = codec.synthesis(codec.encode(data, 9), 9, data.shape[1:])
    first = stream_format.refinement_cells(codec.refiner, level, data, rec, None)[0]
    assert first.weights is not None and first.weights.shape == (10, corsa_udf.filter_taps(SHAPE))
    stream = codec.refiner.encode(*first)
    assert codec.refiner.decode(stream, 10, first.cells.shape[1:]).same(first)
    assert loop_filter.decode(loop_filter.encode(None, SHAPE), SHAPE, 10) == (None, 1)
    rng = np.random.default_rng(0)
    head = len(loop_filter.encode(first.weights, SHAPE))
    for _ in range(40):
        bad = bytearray(stream)
        bad[rng.integers(head)] ^= int(rng.integers(1, 256))
        try:
            got = codec.refiner.decode(bytes(bad), 10, first.cells.shape[1:])
        except StreamError as e:
            assert "loop filter" in str(e) or "refinement stream" in str(e)
        else:
            assert not got.same(first)      # a weight changed: the CRC of the file is what refuses it


def test_the_encoder_weighs_each_blocks_filter_against_its_bits(majortom):
    """What a block stores is what costs it least at its level: the whole filter on a full block at a
    high level, less (its own neighbours' part, stored in half the integers, or none) where the
    bits cost more; the own part reads back as the whole filter with the other bands' weights 0."""
    s, data = majortom
    codec = VariableRateCodec(MODEL)
    rec = codec.synthesis(codec.encode(data, 9), 9, data.shape[1:])
    rows, cols = slice(0, 512), slice(0, 512)
    fit = lambda lam, r=rows, c=cols: corsa_udf.filter_fit(data[:, r, c], rec, r, c, None, SHAPE, lam)
    whole, weighed = fit(0.0), fit(corsa_udf.filter_lambda(CARD, 9))
    np.testing.assert_array_equal(weighed, whole)
    assert fit(1e9) is None                                   # no bits are worth a filter at that price
    own = [corsa_udf.own_taps(SHAPE, b) for b in range(10)]
    others = np.ones_like(whole, bool)
    for b, t in enumerate(own):
        others[b, t] = False
    assert np.abs(whole[others]).sum() > 0
    # a small block at a low level: the cheapest is less than the whole filter
    small = fit(corsa_udf.filter_lambda(CARD, 1), slice(512, 600), slice(0, 100))
    assert small is None or not small[others].any()
    part = np.where(others, 0, whole)
    stream = loop_filter.encode(part, SHAPE)
    assert len(stream) < 0.6 * len(loop_filter.encode(whole, SHAPE))
    got, n = loop_filter.decode(stream + b"rest", SHAPE, 10)
    assert n == len(stream) and np.array_equal(got, part)
    # corsa3.11's filters: own neighbours only, 35 integers a band
    old = corsa_udf.FilterShape(2)
    assert corsa_udf.filter_taps(old) == 35 and corsa_udf.filter_taps(SHAPE) == 71
    with pytest.raises(StreamError, match="loop filter of 710 integers, not 350"):
        loop_filter.decode(loop_filter.encode(whole, SHAPE), old, 10)


def test_the_fit_reads_one_pixel_in_7_and_fits_as_well_as_on_every_pixel(majortom, monkeypatch):
    """The fit's samples: a seventh of a block's pixels, each of the network's 4 x 4 pixel-shuffle phases
    equally among them; the filter fitted on them takes the block's error within 1% of the filter fitted
    on every pixel, both well below the unfiltered decoding's."""
    s, data = majortom
    keep = np.zeros((512, 512), bool)
    for ys, xs in corsa_udf.filter_samples(512, 512):
        keep[ys, xs] = True
    assert np.array_equal(keep, (np.arange(512)[None] + 3 * np.arange(512)[:, None]) % 7 == 0)
    phases = [keep[dy::4, dx::4].sum() for dy in range(4) for dx in range(4)]
    assert abs(keep.mean() - 1 / 7) < 1e-3 and max(phases) - min(phases) <= 1
    codec = VariableRateCodec(MODEL)
    rec = codec.synthesis(codec.encode(data, 8), 8, data.shape[1:])
    rows, cols = slice(0, 512), slice(0, 512)
    net = corsa_udf.session(str(model_dir(MODEL) / CARD["files"]["loop_filter"]["path"]), 1)

    def error(weights) -> float:
        out = rec[:, rows, cols] if weights is None else corsa_udf.loop_filter(net, rec, weights, rows, cols, SHAPE)
        return float(((data[:, rows, cols] - out) ** 2).mean())

    sampled = corsa_udf.filter_fit(data[:, rows, cols], rec, rows, cols, None, SHAPE)
    monkeypatch.setattr(corsa_udf, "filter_samples", lambda h, w: [(slice(0, h, 1), slice(0, w, 1))])
    every = corsa_udf.filter_fit(data[:, rows, cols], rec, rows, cols, None, SHAPE)
    assert not np.array_equal(sampled, every)
    assert error(sampled) < 1.01 * error(every) < 0.9 * error(None)


def test_the_fit_gives_the_same_integers_whatever_threads_blas_runs(majortom, tmp_path):
    """A product is the same bytes wherever it is compressed: the CLI keeps BLAS to one thread, a dask
    worker or a back end's UDF may not, and the fit's products are BLAS's (float32 sums, which BLAS splits
    over its threads, gave other integers; tests/test_cluster.py saw it first)."""
    import subprocess
    import sys
    from pathlib import Path

    s, data = majortom
    codec = VariableRateCodec(MODEL)
    rec = codec.synthesis(codec.encode(data, 5), 5, data.shape[1:])
    np.savez(tmp_path / "block.npz", truth=data[:, :512, :512], rec=rec)
    script = (f"import sys, numpy as np, corsa_udf; b = np.load({str(tmp_path / 'block.npz')!r}); "
              f"w = corsa_udf.filter_fit(b['truth'], b['rec'], slice(0, 512), slice(0, 512), None, "
              f"corsa_udf.FilterShape{tuple(SHAPE)!r}, {float(CARD['refine']['filter']['dn2_per_bit']['5'])!r}); "
              f"sys.stdout.write(w.tobytes().hex())")
    udf = str(Path(corsa_udf.__file__).parent)
    outs = []
    for threads in ("1", "2"):
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": udf, **{v: threads for v in
               ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(out.stdout)
    assert outs[0] and outs[0] == outs[1]


def test_the_cli_gives_the_whole_scene_pixels_closer_to_the_input_than_its_source(majortom, tmp_path):
    s, data = majortom
    write_scene(tmp_path / "in.tif", data, Affine(*s.transform), s.crs, s.date)
    codec, source = VariableRateCodec(MODEL), VariableRateCodec(SOURCE)
    for model in (MODEL, SOURCE):
        assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / model), "--model", model,
                         "--quality", "9", "-q"]) == 0
        assert cli.main(["decompress", str(tmp_path / model), "-o", str(tmp_path / f"{model}.tif"), "-q"]) == 0
    (date,) = stream_format.dates_in(tmp_path / MODEL)
    stored = series.read_date(tmp_path / MODEL, date, codec)
    np.testing.assert_array_equal(stored.ints, series.read_date(tmp_path / SOURCE, date, source).ints)
    assert len(stored.refinement) == 4 and stored.refinement[0].weights is not None
    rec = codec.synthesis(stored.ints, 9, data.shape[1:])
    whole = to_uint16(stream_format.refine(rec, stored.refinement, codec.refiner, codec.level(9)))
    (filtered, plain) = (rasterio.open(tmp_path / f"{m}.tif").read() for m in (MODEL, SOURCE))
    diff = np.abs(filtered.astype(np.int64) - whole)
    assert diff.max() <= 1, diff.max()             # each block filtered with its neighbours' pixels
    # measured: 48.08 against 46.72 dB, files 0.9% larger
    assert psnr(data, filtered) > psnr(data, plain) + 0.8, (psnr(data, filtered), psnr(data, plain))
    sizes = [sum(f.stat().st_size for f in (tmp_path / m).glob("*.corsa")) for m in (MODEL, SOURCE)]
    assert sizes[0] < 1.03 * sizes[1], sizes
    # xarray's windows (blocks side by side, as the CLI's) read the same pixels
    with xr.open_dataset(tmp_path / MODEL, engine="corsa", mask_and_scale=False) as ds:
        np.testing.assert_array_equal(ds["reflectance"].isel(time=0).values, filtered)


def test_the_embedded_engine_decodes_a_filtered_product_as_the_cli(majortom, tmp_path):
    """The product cube carries each block's filter in bands of its own (corsa_udf.FILTER_BANDS); the
    decompress UDF filters its chunk's middle block as the CLI's block path does."""
    s, data = majortom
    write_scene(tmp_path / "in.tif", data, Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "p"), "--model", MODEL,
                     "--quality", "7", "-q"]) == 0
    for name, extra in (("block", []), ("engine", ["--engine"])):
        assert cli.main(["decompress", str(tmp_path / "p"), "-o", str(tmp_path / f"{name}.tif"), "-q", *extra]) == 0
    block, engine = (rasterio.open(tmp_path / f"{n}.tif").read() for n in ("block", "engine"))
    np.testing.assert_array_equal(block, engine)


def test_a_reduced_filtered_product_is_filtered_against_its_own_decoding(majortom, tmp_path):
    s, data = majortom
    data = data[:, 100:400, 200:560]
    write_scene(tmp_path / "in.tif", data, Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(tmp_path / "in.tif"), "-o", str(tmp_path / "q8"), "--model", MODEL,
                     "--quality", "8", "-q"]) == 0
    assert cli.main(["reduce", str(tmp_path / "q8"), "--quality", "6", "-o", str(tmp_path / "q6"), "-q"]) == 0
    assert cli.main(["decompress", str(tmp_path / "q6"), "-o", str(tmp_path / "q6.tif"), "-q"]) == 0
    codec = VariableRateCodec(MODEL)
    stored = series.read_date(tmp_path / "q6", s.date, codec)
    assert stored.quality == 6 and all(r.weights is not None for r in stored.refinement)
    with rasterio.open(tmp_path / "q6.tif") as f:
        reduced = f.read()
    unrefined = to_uint16(codec.synthesis(stored.ints, 6, data.shape[1:]))
    assert psnr(data, reduced) > psnr(data, unrefined) + 0.5
