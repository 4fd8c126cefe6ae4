"""The README's main job on a real scene given as a 10-band GeoTIFF, and bad inputs for it."""
import numpy as np
import pytest
import rasterio

from corsa.app import demo
from corsa.codec.models import DEFAULT_MODEL
from corsa.formats.datasets import LOADERS
from corsa.formats.load import InputError, read_geotiff
from corsa.core.scene import BANDS
from conftest import stored_files


def _write(path, data, names):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype) as dst:
        dst.write(data)
        for i, name in enumerate(names, 1):
            dst.set_band_description(i, name)


@pytest.fixture
def scene(data_root):
    return next(LOADERS["bigearthnet"](data_root))


def test_demo_compresses_a_geotiff_named_by_band_descriptions(tmp_path, scene):
    # bands shuffled on disk: the reader must follow the descriptions
    perm = np.random.default_rng(0).permutation(len(BANDS))
    _write(tmp_path / "in.tif", scene.data[perm], [BANDS[i] for i in perm])
    res = demo.main([str(tmp_path / "in.tif"), "-o", str(tmp_path / "out")])
    # the default model (the best shipped), measured on the product's own bytes
    assert res["model"] == DEFAULT_MODEL and res["psnr_db"] > 35 and res["cf"] > 32.7
    assert (tmp_path / "out" / "in_quicklook.png").stat().st_size > 1000
    assert sum(f.stat().st_size for f in stored_files(tmp_path / "out" / "in_product")) == res["product_bytes"]
    assert not list((tmp_path / "out").rglob("*.part*"))
    again = demo.main([str(tmp_path / "in.tif"), "-o", str(tmp_path / "out")])   # a second run rewrites its product
    assert again["product_bytes"] == res["product_bytes"]


def test_reader_takes_canonical_order_and_refuses_wrong_band_counts(tmp_path, scene):
    _write(tmp_path / "ten.tif", scene.data, [""] * 10)
    np.testing.assert_array_equal(read_geotiff(tmp_path / "ten.tif").data, scene.data)
    _write(tmp_path / "four.tif", scene.data[:4], BANDS[:4])
    with pytest.raises(InputError, match="lack.*B05"):
        read_geotiff(tmp_path / "four.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    with pytest.raises(InputError, match="cannot open"):
        read_geotiff(tmp_path / "junk.tif")
