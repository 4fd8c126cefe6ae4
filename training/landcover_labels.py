"""Per-pixel land-cover classes on the 20 m grid, from every land-cover label source of shared/data.

Classes: the 9 of the TerraMesh LULC maps (the ESRI / Impact Observatory 10 m classes renumbered
1-9, as shared/data/README.md reads them). Sources, each a place of its own:
- TerraMesh LULC maps (4 cells, 224 px): each cell cut into its four 112 px quadrants, so that
  a cell gives training, validation and test places (the snow cell is the only snow).
- BigEarthNet v2 patch T33UUP_26_57 and its pixel-level CORINE reference map (the only one paired
  with its own bands), through ``CORINE`` below.
- BigEarthNet patches whose CORINE labels all map to one class (open sea -> water, a pasture ->
  rangeland): every pixel of the patch takes that class. Patches of mixed labels carry no pixel
  label and are left out.
CORINE level-3 codes map to the 9 classes as ``CORINE`` says (README: land cover).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from corsa.formats.datasets import default_data_root, load_bigearthnet_v1, load_configilm, load_terramesh

# value, name, the CORINE level-3 codes mapped onto it, colour (RGB): Impact Observatory's palette
CLASSES = (
    (1, "water", (511, 512, 521, 522, 523), (65, 155, 223)),
    (2, "trees", (311, 312, 313, 244), (57, 125, 73)),
    (3, "flooded_vegetation", (411, 412, 421), (122, 135, 198)),
    (4, "crops", (211, 212, 213, 221, 222, 223, 241, 242, 243), (228, 150, 53)),
    (5, "built_area", (111, 112, 121, 122, 123, 124, 133, 141, 142), (196, 40, 27)),
    (6, "bare_ground", (131, 132, 331, 332, 334, 422, 423), (165, 155, 143)),
    (7, "snow_ice", (335,), (168, 235, 255)),
    (8, "clouds", (), (97, 97, 97)),
    (9, "rangeland", (231, 321, 322, 323, 324, 333), (227, 226, 195)),
)
CORINE = {code: value for value, _, codes, _ in CLASSES for code in codes}
# The CORINE level-3 names as BigEarthNet writes them (v1 and v2 spellings).
CORINE_NAMES = {
    "Continuous urban fabric": 111, "Discontinuous urban fabric": 112, "Urban fabric": 112,
    "Industrial or commercial units": 121, "Road and rail networks and associated land": 122,
    "Port areas": 123, "Airports": 124, "Mineral extraction sites": 131, "Dump sites": 132,
    "Construction sites": 133, "Green urban areas": 141, "Sport and leisure facilities": 142,
    "Non-irrigated arable land": 211, "Arable land": 211, "Permanently irrigated land": 212, "Rice fields": 213,
    "Vineyards": 221, "Fruit trees and berry plantations": 222, "Olive groves": 223, "Permanent crops": 222,
    "Pastures": 231, "Annual crops associated with permanent crops": 241, "Complex cultivation patterns": 242,
    "Land principally occupied by agriculture, with significant areas of natural vegetation": 243,
    "Agro-forestry areas": 244, "Broad-leaved forest": 311, "Coniferous forest": 312, "Mixed forest": 313,
    "Natural grassland": 321, "Natural grassland and sparsely vegetated areas": 321, "Moors and heathland": 322,
    "Sclerophyllous vegetation": 323, "Transitional woodland/shrub": 324, "Transitional woodland, shrub": 324,
    "Beaches, dunes, sands": 331, "Bare rock": 332, "Sparsely vegetated areas": 333, "Burnt areas": 334,
    "Glaciers and perpetual snow": 335, "Inland marshes": 411, "Peatbogs": 412, "Inland wetlands": 411,
    "Salt marshes": 421, "Salines": 422, "Intertidal flats": 423, "Coastal wetlands": 421,
    "Water courses": 511, "Water bodies": 512, "Inland waters": 512, "Coastal lagoons": 521, "Estuaries": 522,
    "Sea and ocean": 523, "Marine waters": 523,
}
QUADRANT = 112
SPLITS = ("train", "val", "test")


def patch_class(labels: list[str]) -> int:
    """The one class all of a patch's CORINE labels map to, or 0 (mixed, or a name not known)."""
    values = {CORINE.get(CORINE_NAMES.get(name, 0), 0) for name in labels}
    return values.pop() if len(values) == 1 and 0 not in values else 0


def _split_of(i: int, k: int) -> str:
    """Place k of source i: test, val, then train, turning with i, so each source gives every split."""
    return {0: "test", 1: "val"}.get((k + i) % 4, "train")


def places(root: Path | None = None) -> list[dict]:
    """Every labelled place: name, location, split, source, the 10 bands (uint16, 10 m) with the
    scene they were cut from (``context``: the encoder sees the whole scene, as a product does) and
    the class of each 10 m pixel (0 = no label)."""
    root = Path(root) if root else default_data_root()
    out = []
    for i, scene in enumerate(load_terramesh(root)):
        cell = scene.location.removeprefix("terramesh-")
        with rasterio.open(root / "terramind_terramesh" / "LULC" / f"{cell}.tif") as src:
            label = src.read(1)
        for k, (r, c) in enumerate(((0, 0), (0, 1), (1, 1), (1, 0))):
            window = (slice(r * QUADRANT, (r + 1) * QUADRANT), slice(c * QUADRANT, (c + 1) * QUADRANT))
            out.append({"name": f"{cell}-q{k}", "location": f"{scene.location}/q{k}", "split": _split_of(i, k),
                        "source": "terramesh", "context": scene.data, "window": window, "label": label[window]})
    ref = next((root / "bigearthnet_s2_samples" / "Reference_Maps").rglob("*_reference_map.tif"))
    patch = ref.parent.name
    with rasterio.open(ref) as src:
        corine = src.read(1)
    lut = np.zeros(1000, np.uint8)
    lut[list(CORINE)] = list(CORINE.values())
    weak = []
    for scene in list(load_configilm(root)) + list(load_bigearthnet_v1(root)):
        window = (slice(None), slice(None))
        if scene.name == patch:
            out.append({"name": patch, "location": scene.location, "split": "test", "source": "corine_map",
                        "context": scene.data, "window": window, "label": lut[corine]})
            continue
        value = patch_class(scene.extra["labels"])
        if value:
            weak.append({"name": scene.name, "location": scene.location, "source": "corine_patch",
                         "context": scene.data, "window": window,
                         "label": np.where((scene.data == 0).all(0), 0, value).astype(np.uint8)})
    out += [{**p, "split": _split_of(0, k)} for k, p in enumerate(weak)]
    return out


