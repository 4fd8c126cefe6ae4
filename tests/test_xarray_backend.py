"""Products opened as xarray users open files: ``xr.open_dataset(product, engine="corsa")`` through
xarray's plugin registry (the package's entry point), read window by window against what
``corsa decompress`` writes, lazily (a window decodes only the blocks under it), with rioxarray's
CRS and transform, the latents as features, and a computation on a dask.distributed cluster."""
from pathlib import Path

import corsa_udf
import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.transform import Affine

from corsa.app import cli
from corsa.core import cluster
from corsa.formats import product, series
from corsa.formats.datasets import LOADERS
from test_service import write_scene

DATES = ("2022-07-06", "2022-07-16")
SHAPE = (598, 1031)   # 2 x 3 blocks of 512 px, not multiples of 4


@pytest.fixture(scope="module")
def scenes(data_root):
    """Two dates on one grid: two real Major-TOM windows, the second with a nodata patch."""
    s = next(LOADERS["majortom"](data_root))
    first = s.data[:, 7:7 + SHAPE[0], 11:11 + SHAPE[1]].copy()
    second = s.data[:, 60:60 + SHAPE[0], 30:30 + SHAPE[1]].copy()
    second[:, 480:540, 500:530] = 0
    return [first, second], Affine(*s.transform) * Affine.translation(11, 7), s.crs


@pytest.fixture(scope="module")
def prod(scenes, tmp_path_factory):
    """The product of the default model and its decompressed dates (``corsa decompress``)."""
    (data, transform, crs), root = scenes, tmp_path_factory.mktemp("xr")
    (root / "in").mkdir()
    for d, date in zip(data, DATES):
        write_scene(root / "in" / f"{date}.tif", d, transform, crs, date)
    assert cli.main(["compress", str(root / "in"), "-o", str(root / "prod")]) == 0
    assert cli.main(["decompress", str(root / "prod"), "-o", str(root / "dec")]) == 0
    decoded = {}
    for date in DATES:
        with rasterio.open(root / "dec" / f"corsa_decoded_{date}.tif") as f:
            decoded[date] = f.read(), f.transform, f.crs
    return root / "prod", decoded


def test_windows_dates_and_bands_are_the_decompressed_pixels(prod):
    folder, decoded = prod
    ds = xr.open_dataset(folder, engine="corsa", mask_and_scale=False)
    assert ds.reflectance.dims == ("time", "band", "y", "x") and ds.reflectance.dtype == np.uint16
    assert (ds.sizes["y"], ds.sizes["x"]) == SHAPE
    assert [str(t)[:10] for t in ds.time.values] == list(DATES)
    for i, date in enumerate(DATES):
        full = decoded[date][0]
        np.testing.assert_array_equal(ds.reflectance.isel(time=i).values, full)
        for ys, xs in ((slice(0, 512), slice(0, 512)), (slice(500, 598), slice(505, 1031)),
                       (slice(100, 101), slice(700, 900, 3)), (slice(590, 400, -7), slice(3, 40))):
            np.testing.assert_array_equal(ds.reflectance.isel(time=i, y=ys, x=xs).values, full[:, ys, xs])
    np.testing.assert_array_equal(ds.reflectance.sel(band=["B11", "B04"]).isel(time=1, y=5, x=9).values,
                                  decoded[DATES[1]][0][[8, 2], 5, 9])
    picked = ds.reflectance.sel(time="2022-07-16", y=ds.y[200:260], x=ds.x[700:710])
    np.testing.assert_array_equal(picked.values, decoded[DATES[1]][0][:, 200:260, 700:710])


def test_crs_transform_nodata_and_scale_as_rioxarray_reads_them(prod):
    pytest.importorskip("rioxarray")
    folder, decoded = prod
    ds = xr.open_dataset(folder, engine="corsa")
    _, transform, crs = decoded[DATES[1]]
    assert ds.rio.crs == crs and ds.rio.transform() == transform
    refl = ds.reflectance.isel(time=1, y=slice(470, 550), x=slice(490, 540)).values
    dn = decoded[DATES[1]][0][:, 470:550, 490:540]
    assert refl.dtype == np.float32 and np.isnan(refl[:, dn[0] == 0]).all() and (dn[0] == 0).any()
    np.testing.assert_allclose(refl[:, dn[0] > 0], dn[:, dn[0] > 0] * 1e-4, rtol=1e-6)


def test_a_window_decodes_only_the_blocks_under_it(prod, monkeypatch):
    folder, _ = prod
    calls = []
    synthesise = corsa_udf.synthesise
    monkeypatch.setattr(corsa_udf, "synthesise", lambda *a, **k: calls.append(1) or synthesise(*a, **k))
    ds = xr.open_dataset(folder, engine="corsa", mask_and_scale=False, features=True)
    assert calls == []                                          # opening reads headers only
    ds.reflectance.isel(time=0, y=slice(0, 512), x=slice(512, 1024)).values
    assert len(calls) == 1                                      # one block
    ds.reflectance.isel(time=slice(None), y=slice(500, 520), x=slice(500, 520)).values
    assert len(calls) == 1 + 2 * 4                              # four blocks of both dates
    ds.features.isel(time=1).values
    assert len(calls) == 9                                      # features: no decoder


def test_features_are_the_dequantised_latents(prod):
    folder, _ = prod
    ds = xr.open_dataset(folder, engine="corsa", features=True)
    codec = product.stream_codec(folder, DATES[0])
    for i, date in enumerate(DATES):
        stored = series.read_date(folder, date, codec)
        np.testing.assert_array_equal(ds.features.isel(time=i).values, codec.dequantise(stored.ints, stored.quality))
        assert int(ds.quality[i]) == stored.quality
    assert ds.features.dims == ("time", "channel", "y_latent", "x_latent")
    assert ds.sizes["y_latent"] == -(-SHAPE[0] // 4) and float(ds.x_latent[1] - ds.x_latent[0]) == 4 * float(ds.x[1] - ds.x[0])


def test_classes_are_those_of_corsa_classify_on_the_reflectances_grid(prod, tmp_path):
    folder, _ = prod
    ds = xr.open_dataset(folder, engine="corsa", classes=["scl", "landcover"], chunks={})
    assert ds.scl.dims == ("time", "y", "x") and ds.scl.dtype == np.uint8 and ds.scl.chunks[1][0] == 512
    assert ds.scl.attrs["flag_meanings"].split()[0] == "no_data" and ds.landcover.attrs["flag_values"][0] == 0
    for name in ("scl", "landcover"):
        assert cli.main(["classify", str(folder), "-o", str(tmp_path / name), "--classes", name, "-q"]) == 0
    for i, date in enumerate(DATES):
        for name in ("scl", "landcover"):
            with rasterio.open(tmp_path / name / f"classes_{date}.tif") as f:
                cells = f.read(1)
            full = np.repeat(np.repeat(cells, 2, 0), 2, 1)[:SHAPE[0], :SHAPE[1]]
            np.testing.assert_array_equal(ds[name].isel(time=i).values, full)
            # a window across blocks decodes no pixels and reads the classes of the blocks under it
            np.testing.assert_array_equal(ds[name].isel(time=i, y=slice(505, 590), x=slice(3, 1030, 5)).values,
                                          full[505:590, 3:1030:5])
    assert len(np.unique(ds.scl.values)) > 1
    # the reflectances of the usable pixels, the way a user masks clouds
    usable = ds.reflectance.where(ds.scl <= corsa_udf.LAST_USABLE_CLASS).isel(time=0).values
    assert np.isnan(usable).any() == bool((ds.scl.isel(time=0) > corsa_udf.LAST_USABLE_CLASS).any())
    with pytest.raises(product.ProductError, match="has no water head"):
        xr.open_dataset(folder, engine="corsa", classes="water")


def test_stac_collection_and_item_open_the_product(prod):
    folder, decoded = prod
    whole = xr.open_dataset(folder / "collection.json", engine="corsa", mask_and_scale=False)
    assert whole.sizes["time"] == 2
    one = xr.open_dataset(folder / f"corsa_{DATES[1]}.json", engine="corsa", mask_and_scale=False)
    assert one.sizes["time"] == 1
    np.testing.assert_array_equal(one.reflectance.isel(time=0, y=slice(0, 64), x=slice(0, 64)).values,
                                  decoded[DATES[1]][0][:, :64, :64])
    assert xr.backends.plugins.guess_engine(str(folder)) == "corsa"


def test_dask_chunks_are_the_blocks_and_compute_on_a_cluster(prod):
    distributed = pytest.importorskip("dask.distributed")
    folder, decoded = prod
    ds = xr.open_dataset(folder, engine="corsa", mask_and_scale=False, chunks={}, classes="scl")
    assert ds.reflectance.chunks == ((1, 1), (10,), (512, 86), (512, 512, 7))
    with cluster.processes(2) as address, distributed.Client(address) as client:
        means = client.compute(ds.reflectance.astype("float64").mean(("y", "x"))).result()
        counts = client.compute((ds.scl > corsa_udf.LAST_USABLE_CLASS).sum(("y", "x"))).result()
    expected = np.stack([decoded[d][0].reshape(10, -1).mean(1) for d in DATES])
    np.testing.assert_allclose(means.values, expected, rtol=1e-12)
    np.testing.assert_array_equal(counts.values, (ds.scl.load() > corsa_udf.LAST_USABLE_CLASS).sum(("y", "x")).values)


def test_what_does_not_open_is_named(tmp_path):
    with pytest.raises(product.ProductError, match="neither a CORSA product folder"):
        xr.open_dataset(tmp_path, engine="corsa")
    old = Path(__file__).parent / "products" / "format1_corsa512"
    with pytest.raises(product.ProductError, match="formats 1-2"):
        xr.open_dataset(old, engine="corsa")
