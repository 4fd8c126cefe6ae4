"""Decoded outputs are on the input's grid bit for bit (CRS and every digit of the geotransform), from
every kind of input: a GeoTIFF in EPSG:4326 (float pixel sizes) through the block-by-block path, the
engine and corsa512, an openEO-style NetCDF cube, a STAC item collection, a compress job's downloaded
files (decoded directly and packed), and a time series' dates."""
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.crs import CRS
from rasterio.transform import Affine

from benchmarks.fuzz import _job_files
from corsa.app import cli
from corsa.formats.datasets import LOADERS
from corsa.core.scene import BANDS
from test_service import majortom, write_scene  # noqa: F401  (majortom: a fixture)


def _grid(path: Path) -> tuple:
    with rasterio.open(path) as f:
        return f.transform.to_gdal(), f.crs


@pytest.fixture(scope="module")
def geographic(data_root, tmp_path_factory):
    """A WorldStrat scene: EPSG:4326, pixel sizes like 9.154661820492227e-05 degrees."""
    s = next(LOADERS["worldstrat"](data_root))
    path = tmp_path_factory.mktemp("grids") / "scene.tif"
    write_scene(path, s.data, Affine(*s.transform), s.crs, s.date)
    assert Affine(*s.transform).a != round(Affine(*s.transform).a, 12)
    return path


@pytest.mark.parametrize("model,compress_extra,decompress_extra", [
    ("corsa2.1", [], []), ("corsa2.1", ["--engine"], ["--engine"]), ("corsa3.1", [], ["--scale", "1"]),
    ("corsa512", [], [])])
def test_geotiff_round_trip_keeps_the_grid(geographic, tmp_path, model, compress_extra, decompress_extra):
    assert cli.main(["compress", str(geographic), "-o", str(tmp_path / "p"), "--model", model] + compress_extra) == 0
    assert cli.main(["decompress", str(tmp_path / "p"), "-o", str(tmp_path / "d.tif")] + decompress_extra) == 0
    assert _grid(tmp_path / "d.tif") == _grid(geographic)


def test_netcdf_round_trip_keeps_the_grid(data_root, tmp_path):
    """A cube as openEO back ends write it: one (t, y, x) variable a band, the grid in crs's GeoTransform."""
    s = next(LOADERS["worldstrat"](data_root))
    t = Affine(*s.transform)
    h, w = s.data.shape[1:]
    ds = xr.Dataset({b: (("t", "y", "x"), s.data[i][None]) for i, b in enumerate(BANDS)},
                    coords={"t": [np.datetime64(s.date, "ns")], "x": t.c + t.a * (np.arange(w) + 0.5),
                            "y": t.f + t.e * (np.arange(h) + 0.5)})
    ds["crs"] = xr.DataArray(0, attrs={"spatial_ref": CRS.from_user_input(s.crs).to_wkt(),
                                       "GeoTransform": " ".join(repr(v) for v in t.to_gdal())})
    for b in BANDS:
        ds[b].attrs["grid_mapping"] = "crs"
    ds.to_netcdf(tmp_path / "cube.nc", engine="scipy")      # NetCDF3: uint16 stored with _Unsigned
    assert cli.main(["compress", str(tmp_path / "cube.nc"), "-o", str(tmp_path / "p"), "--model", "corsa2.1"]) == 0
    assert cli.main(["decompress", str(tmp_path / "p"), "-o", str(tmp_path / "d.tif")]) == 0
    transform, crs = _grid(tmp_path / "d.tif")
    assert transform == t.to_gdal() and crs == CRS.from_user_input(s.crs)


def test_job_files_keep_the_grid(majortom, tmp_path):
    """A compress job's files over a crop at a fractional offset of the Major-TOM scene (UTM)."""
    data = majortom.data[:, 100:300, 200:420]
    transform = Affine(*majortom.transform) * Affine.translation(200.5, 100.25)
    write_scene(tmp_path / "s.tif", data, transform, majortom.crs, "2022-07-06")
    files = _job_files(tmp_path / "s.tif", tmp_path / "job")
    assert cli.main(["decompress", str(files), "-o", str(tmp_path / "direct.tif")]) == 0
    assert cli.main(["pack", str(files), "-o", str(tmp_path / "packed")]) == 0
    assert cli.main(["decompress", str(tmp_path / "packed"), "-o", str(tmp_path / "packed.tif")]) == 0
    assert _grid(tmp_path / "direct.tif") == _grid(tmp_path / "packed.tif") == _grid(tmp_path / "s.tif")


def test_stac_round_trip_keeps_the_grid(data_root, tmp_path):
    """A static STAC item collection of the Major-TOM scene's band files (odc-stac onto the 10 m grid),
    cut to a bounding box: the decode is on the grid that load gives, bit for bit."""
    from datetime import datetime

    import pystac

    from corsa.formats.stac_source import StacSource, item_from_files

    folder = next((data_root / "majortom_core_s2l2a").glob("*/*/S2*"))
    item = item_from_files(folder.name, datetime(2022, 7, 6, 8, 56), {b: folder / f"{b}.tif" for b in BANDS},
                           {"s2:processing_baseline": "04.00", "eo:cloud_cover": 3.0})
    pystac.ItemCollection([item]).save_object(dest_href=str(tmp_path / "items.json"))
    bbox = "17.901,0.0213,17.9137,0.0341"
    loaded = StacSource(str(tmp_path / "items.json")).load(dict(zip(("west", "south", "east", "north", "crs"),
                                                                    [*map(float, bbox.split(",")), 4326])), None)
    assert cli.main(["compress", str(tmp_path / "items.json"), "-o", str(tmp_path / "p"), "--bbox", bbox,
                     "--model", "corsa2.1"]) == 0
    assert cli.main(["decompress", str(tmp_path / "p"), "-o", str(tmp_path / "d.tif")]) == 0
    transform, crs = _grid(tmp_path / "d.tif")
    assert transform == loaded.rio.transform().to_gdal() and crs == loaded.rio.crs


@pytest.mark.parametrize("layout,side", [({"tiled": True, "blockxsize": 256, "blockysize": 256}, 512),
                                         ({"tiled": True, "blockxsize": 768, "blockysize": 768}, 768),
                                         ({"tiled": False}, 1024)])
def test_a_geotiff_is_read_in_chunks_of_its_own_tiles(majortom, tmp_path, layout, side):
    """A tiled GeoTIFF's dask chunks are whole internal tiles, at least a block (512 px) a side: a block's
    window reads little beyond itself. A file in strips: 1024 px. The pixels are the file's either way."""
    from corsa.formats.sources import Catalogue

    data = majortom.data
    path = tmp_path / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=len(BANDS),
                       dtype="uint16", crs=majortom.crs, transform=Affine(*majortom.transform), **layout) as dst:
        dst.write(data)
    cube = Catalogue({"S2": path}).load("S2", bands=list(BANDS))
    n = data.shape[1]
    assert cube.chunks[cube.dims.index("y")] == (side,) * (n // side) + ((n % side,) if n % side else ())
    np.testing.assert_array_equal(cube.isel(t=0).values, data)
