"""Each shared group comes out as the canonical scene: band order, grid, scale, offset."""
import json

import numpy as np
import rasterio

from corsa.formats.datasets import LOADERS, load_all, load_split
from corsa.core.scene import BANDS, baseline_offset, remove_offset

from conftest import SPLIT_FILE


def test_worldstrat_bands_follow_the_band_descriptions(data_root):
    scene = next(LOADERS["worldstrat"](data_root))
    aoi = data_root / "worldstrat_l2a" / scene.location
    with rasterio.open(aoi / f"{scene.name}.tif") as src:
        raw = src.read()
        names = src.descriptions
    for i, band in enumerate(BANDS):
        np.testing.assert_array_equal(scene.data[i], raw[names.index(band)])


def test_majortom_offset_removed_and_20m_bands_on_10m_grid(data_root):
    (scene,) = LOADERS["majortom"](data_root)
    folder = next((data_root / "majortom_core_s2l2a").glob("*/*/S2*"))
    assert scene.data.shape == (10, 1068, 1068)
    with rasterio.open(folder / "B04.tif") as src:
        b04 = src.read(1)
    np.testing.assert_array_equal(scene.data[BANDS.index("B04")], b04 - 1000)
    with rasterio.open(folder / "B11.tif") as src:
        b11 = src.read(1).astype(np.int32) - 1000
    # nearest-neighbour: each 20 m pixel covers a 2x2 block of 10 m pixels
    np.testing.assert_array_equal(scene.data[BANDS.index("B11")][::2, ::2], b11)
    np.testing.assert_array_equal(scene.data[BANDS.index("B11")][1::2, 1::2], b11)


def test_eurosat_b8a_is_taken_from_the_last_band(data_root):
    scenes = list(LOADERS["eurosat"](data_root))
    with rasterio.open(data_root / "eurosat_ms_samples" / "AnnualCrop" / "AnnualCrop_1.tif") as src:
        raw = src.read()
    ac = next(s for s in scenes if s.name == "AnnualCrop_1")
    np.testing.assert_array_equal(ac.data[BANDS.index("B8A")], raw[12])
    np.testing.assert_array_equal(ac.data[BANDS.index("B11")], raw[10])


def test_every_loaded_scene_is_canonical(data_root):
    for group, loader in LOADERS.items():
        for scene in loader(data_root):
            assert scene.data.dtype == np.uint16 and scene.data.shape[0] == len(BANDS), group
            # reflectance x 10000: medians in the hundreds to thousands of DN (bright cloud or snow up to ~2.0);
            # open sea is dark (red at 1 DN over a whole patch) but not at 0-1 reflectance in every visible band
            med = np.median(scene.data.reshape(10, -1), axis=1)
            top = np.percentile(scene.data[[0, 1, 2]].reshape(3, -1), 99, axis=1)
            assert np.all(med < 25000) and top.max() > 10, (scene.name, med, top)


def test_baseline_offset_from_product_id():
    assert baseline_offset("S2A_MSIL2A_20220706T085611_N0400_R007_T33NZA_20220706T153419") == 1000
    assert baseline_offset("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP") == 0
    assert baseline_offset("S2B_MSIL2A_20210101T000000_N0300_R001_T31UFS_x") == 0
    out = remove_offset(np.array([0, 500, 1000, 1500], np.uint16), 1000)
    np.testing.assert_array_equal(out, [0, 1, 1, 500])


def test_split_is_by_location_and_covers_all_data(data_root):
    split = json.loads(SPLIT_FILE.read_text())
    sets = {k: set(split[k]) for k in ("train", "val", "test")}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"]) and not (sets["val"] & sets["test"])
    test = load_split(SPLIT_FILE, "test")
    train = load_split(SPLIT_FILE, "train")
    assert {s.location for s in test}.isdisjoint({s.location for s in train})
    assert len(test) >= 40
    # every location of the shared data is in a split (a half counts for its scene)
    named = {entry.split("/")[0] for entries in sets.values() for entry in entries}
    assert {s.location for s in load_all(data_root)} - named == set()
    # the new groups (open sea, snow, a city) are trained on and tested on
    groups = {k: {s.group for s in load_split(SPLIT_FILE, k, data_root)} for k in ("train", "val", "test")}
    assert all({"configilm_v1", "configilm_v2"} <= g for g in groups.values())
