"""STAC for what corsa writes: a product folder carries a STAC Collection (``collection.json``) with
one Item per date (``corsa_<date>.json``), and each decoded GeoTIFF an Item beside it
(``<name>.json``), so pystac, odc-stac, QGIS and catalogue browsers find them, and ``load_stac`` of
a product's Collection or Item on the embedded engine gives the product's cube.

An Item says where the date lies (geometry and bbox in WGS84, ``proj:code`` / ``proj:shape`` /
``proj:transform`` of the input grid), when (``datetime``), what coded it (``corsa:model``,
``corsa:quality``, ``corsa:format``), how compact it is (``corsa:cf``, from the bytes of its files),
and its files as assets (role ``corsa-product`` for a product's, ``data`` for decoded
reflectances, with their bands, nodata and DN scale).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pystac
import rasterio
import rasterio.warp

from corsa.formats import codebook_product, product
from corsa.formats import stream_format
from corsa.core.metrics import compression_factor
from corsa.core.scene import BANDS

PROJECTION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
COLLECTION = "collection.json"
PRODUCT_ROLE = "corsa-product"
PRODUCT_MEDIA_TYPE = "application/x-corsa"
UNDATED = "undated"


def describe(folder: Path) -> list[dict]:
    """What a product folder holds, a record per date (``corsa info``; the Items say the same)."""
    records = []
    for d in stream_format.dates_in(folder):
        path = folder / stream_format.file_name(d)
        h = stream_format.read_header(path.read_bytes(), path.name)
        size = path.stat().st_size
        records.append({"date": d, "format": h["version"], "files": [path.name], "model_id": h["model_id"],
                        "decoder_sha256_prefix": h["sha_prefix"], "quality": stream_format.level_of(h), "shape": list(h["shape"]),
                        "crs": h["crs"], "transform": list(h["transform"])[:6] if h["transform"] else None,
                        "latent_cells": list(h["cells"]), "blocks": len(h["blocks"]), "bytes": size,
                        "cf": compression_factor(h["shape"][0] * h["shape"][1], size), "nodata_mask": bool(h["mask_len"]),
                        "references": list(h["refs"]), "refinement_bytes": sum(h["refine_lengths"] or []),
                        "layer_bytes": sum(h["layer_lengths"] or [])})
    for d in codebook_product.dates_in(folder):
        pd_ = codebook_product.read_date(folder, d)
        size = codebook_product.product_bytes(folder, d)
        records.append({"date": d, "format": 2, "files": sorted(p.name for p in folder.glob(f"corsa_{d}_*.tif")),
                        "model_id": pd_.model_id, "decoder_sha256": pd_.model_sha256, "quality": None,
                        "shape": list(pd_.shape), "crs": pd_.crs,
                        "transform": list(pd_.transform)[:6] if pd_.transform else None,
                        "level0": list(pd_.idx0.shape), "level1": list(pd_.idx1.shape), "bytes": size,
                        "cf": compression_factor(pd_.shape[0] * pd_.shape[1], size),
                        "nodata_pixels": int(pd_.nodata.sum()) if pd_.nodata is not None else 0})
    if not records:
        raise product.ProductError(f"{folder} holds no complete compressed date")
    return records


def _where(shape: tuple[int, int], transform: list | None, crs: str | None) -> tuple[dict | None, list | None, dict]:
    """Geometry and bbox in WGS84 and the projection fields of a grid (no geometry without a CRS)."""
    fields = {"proj:code": crs, "proj:shape": list(shape)}
    if transform is None:
        return None, None, fields
    fields["proj:transform"] = list(transform)[:6]
    if not crs:
        return None, None, fields
    t = rasterio.Affine(*transform[:6])
    left, top = t * (0, 0)
    right, bottom = t * (shape[1], shape[0])
    w, s, e, n = rasterio.warp.transform_bounds(crs, "EPSG:4326", min(left, right), min(top, bottom),
                                                max(left, right), max(top, bottom))
    ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
    return {"type": "Polygon", "coordinates": [ring]}, [w, s, e, n], fields


def _when(date: str) -> tuple[datetime | None, dict]:
    """An Item's time: the date's day, or for an undated date any time (STAC needs one), said so."""
    if date == UNDATED:
        return None, {"corsa:date": UNDATED, "start_datetime": "0001-01-01T00:00:00Z",
                      "end_datetime": "9999-12-31T23:59:59Z"}
    return datetime.fromisoformat(date).replace(tzinfo=timezone.utc), {"corsa:date": date}


def product_items(folder: Path) -> list[pystac.Item]:
    """One STAC Item per date of a product folder, its files as assets."""
    folder = Path(folder)
    items = []
    for r in describe(folder):
        geometry, bbox, proj = _where(tuple(r["shape"]), r["transform"], r["crs"])
        when, extra = _when(r["date"])
        props = {**proj, **extra, "corsa:model": r["model_id"], "corsa:quality": r["quality"],
                 "corsa:format": r["format"], "corsa:cf": round(r["cf"], 3), "corsa:bytes": r["bytes"]}
        if r.get("references"):
            props["corsa:references"] = r["references"]
        item = pystac.Item(f"corsa_{r['date']}", geometry, bbox, when, props, stac_extensions=[PROJECTION])
        for name in r["files"]:
            media = PRODUCT_MEDIA_TYPE if name.endswith(stream_format.SUFFIX) else pystac.MediaType.GEOTIFF
            key = "product" if media == PRODUCT_MEDIA_TYPE else name.removeprefix(f"corsa_{r['date']}_").removesuffix(".tif")
            item.add_asset(key, pystac.Asset(f"./{name}", media_type=media, roles=[PRODUCT_ROLE]))
        items.append(item)
    return items


def write_product(folder: Path) -> Path:
    """The product's ``collection.json`` and its Items (replacing those of an earlier run)."""
    folder = Path(folder)
    items = product_items(folder)
    for old in set(folder.glob("corsa_*.json")) - {folder / f"{i.id}.json" for i in items}:
        old.unlink()
    spatial = [i.bbox for i in items if i.bbox] or [[-180.0, -90.0, 180.0, 90.0]]
    box = [min(b[0] for b in spatial), min(b[1] for b in spatial), max(b[2] for b in spatial), max(b[3] for b in spatial)]
    times = sorted(i.datetime for i in items if i.datetime) or [None]
    # Named by what it holds, not by its folder: the same product is the same bytes wherever it lies.
    dates = [i.properties["corsa:date"] for i in items]
    collection = pystac.Collection(
        f"corsa-{dates[0]}-{dates[-1]}", f"CORSA-compressed Sentinel-2 L2A: {len(items)} date(s)",
        pystac.Extent(pystac.SpatialExtent([box]), pystac.TemporalExtent([[times[0], times[-1]]])),
        license="other", stac_extensions=[PROJECTION], extra_fields={"corsa:product": True})
    collection.add_items(items)
    # Saved beside, then each file renamed into place: a reader sees the old or the new document.
    staging = Path(tempfile.mkdtemp(prefix=".stac-", dir=folder))
    try:
        for item in items:
            item.set_self_href(str(staging / f"{item.id}.json"))
        collection.set_self_href(str(staging / COLLECTION))
        collection.save(pystac.CatalogType.SELF_CONTAINED)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == COLLECTION):   # the collection last
            path.replace(folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / COLLECTION


def write_decoded(path: Path, date: str | None, source: Path | None = None) -> Path:
    """A STAC Item beside a decoded GeoTIFF (``<name>.json``): its grid, date and the COG as asset."""
    path = Path(path)
    with rasterio.open(path) as f:
        shape, transform, crs = f.shape, list(f.transform)[:6], f.crs.to_string() if f.crs else None
        scales, nodata = f.scales, f.nodata
    geometry, bbox, proj = _where(shape, transform, crs)
    when, extra = _when(date or UNDATED)
    props = {**proj, **extra}
    if source is not None:
        props["corsa:decoded_from"] = str(source)
    item = pystac.Item(path.stem, geometry, bbox, when, props, stac_extensions=[PROJECTION])
    item.add_asset("data", pystac.Asset(f"./{path.name}", media_type=pystac.MediaType.COG, roles=["data"],
                                        extra_fields={"bands": [{"name": b, "nodata": nodata, "scale": s, "offset": 0.0,
                                                                 "unit": "reflectance x 10000 (DN)"}
                                                                for b, s in zip(BANDS, scales)]}))
    out = path.with_suffix(".json")
    item.set_self_href(str(out))
    item.save_object(include_self_link=False, dest_href=str(out))
    return out


def check_complete(folder: Path) -> None:
    """Refuse, by name, a folder that holds no product, and a product whose ``collection.json``
    lists a date whose files are gone (a reader cannot otherwise tell a lost date from one never
    written): the date and the files its STAC Item names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise product.ProductError(f"{folder} is not a folder: give a product folder (from corsa compress or pack)")
    stored = set(stream_format.dates_in(folder)) | set(codebook_product.dates_in(folder))
    path = folder / COLLECTION
    if path.is_file():
        try:
            links = json.loads(path.read_text()).get("links", [])
            listed = {Path(link["href"]).stem.removeprefix("corsa_") for link in links if link.get("rel") == "item"}
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
            raise product.ProductError(f"{path} is damaged: {e}") from None
        missing = sorted(listed - stored)
        if missing:
            named = [f for d in missing for f in _item_files(folder, d)]
            files = [f for f in named if not (folder / f).is_file()] or named
            raise product.ProductError(f"{folder}: its {COLLECTION} lists the date(s) {', '.join(missing)}, but "
                                       f"{', '.join(files)} {'is' if len(files) == 1 else 'are'} missing or incomplete "
                                       "(deleted, or not copied whole?)")
    if not stored:
        present = sorted(p.name for p in folder.iterdir())
        if not present:
            raise product.ProductError(f"{folder} is empty: give a product folder (from corsa compress or pack)")
        raise product.ProductError(f"{folder} holds no CORSA product (corsa_<date>{stream_format.SUFFIX}, or "
                                   f"corsa_<date>_L0.tif and _L1.tif): it holds {', '.join(present[:4])}"
                                   + (f" and {len(present) - 4} more" if len(present) > 4 else ""))


def _item_files(folder: Path, date: str) -> list[str]:
    """The product files the STAC Item of ``date`` names (the stream-format name if it cannot be read)."""
    try:
        doc = json.loads((folder / f"corsa_{date}.json").read_text())
        names = [Path(a["href"]).name for a in doc.get("assets", {}).values() if PRODUCT_ROLE in a.get("roles", [])]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        names = []
    return names or [stream_format.file_name(date)]


def product_of(href: str | Path) -> tuple[Path, list[str]]:
    """The product folder and dates a STAC Collection or Item of ours describes (load_stac)."""
    doc = json.loads(Path(href).read_text())
    folder = Path(href).resolve().parent
    if doc.get("type") == "Feature":
        assets = [a for a in doc.get("assets", {}).values() if PRODUCT_ROLE in a.get("roles", [])]
        if not assets:
            raise product.ProductError(f"{href} is a STAC Item of no CORSA product (no asset with role {PRODUCT_ROLE})")
        return folder, [doc["properties"]["corsa:date"]]
    if not doc.get("corsa:product"):
        raise product.ProductError(f"{href} is no STAC Collection of a CORSA product")
    dates = [d for d in (stream_format.dates_in(folder) or codebook_product.dates_in(folder))]
    return folder, dates


def is_ours(href: str | Path) -> bool:
    """Whether ``href`` is a local STAC document written by ``write_product``."""
    p = Path(href)
    if p.suffix != ".json" or not p.is_file():
        return False
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return bool(doc.get("corsa:product")) or (doc.get("type") == "Feature" and any(
        PRODUCT_ROLE in a.get("roles", []) for a in doc.get("assets", {}).values()))

