"""STAC for what corsa writes (corsa.formats.stac_catalog) on a real WorldStrat test series: the product's
Collection and Items read with pystac, their assets exist, load_stac of the Collection on the
embedded engine gives the product's cube (its decode equals the product's), a product found through
an Item decodes, decoded files carry an Item of their own; and corsa info --json says the same."""
import json

import numpy as np
import pystac
import pytest
import rasterio
from rasterio.transform import Affine

from corsa.app import cli
from corsa.formats import stream_format
from corsa.formats.datasets import LOADERS, revisit_series
from corsa.openeo.engine import Engine
from corsa.formats.sources import Catalogue
from test_service import write_scene

AREA = "Landcover-31746"


@pytest.fixture(scope="module")
def prod(data_root, tmp_path_factory):
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == AREA])
    src = tmp_path_factory.mktemp("stac") / "in"
    src.mkdir()
    for s in run[:3]:
        write_scene(src / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    out = src.parent / "prod"
    assert cli.main(["compress", str(src), "-o", str(out), "--model", "corsa2.1", "--quality", "3"]) == 0
    return out, run[:3]


def _read(path):
    with rasterio.open(path) as f:
        return f.read()


def test_the_product_has_a_collection_of_items(prod, capsys):
    out, run = prod
    collection = pystac.Collection.from_file(str(out / "collection.json"))
    items = sorted(collection.get_items(), key=lambda i: i.id)
    assert [i.properties["corsa:date"] for i in items] == [s.date for s in run]
    capsys.readouterr()
    assert cli.main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for item, record in zip(items, info["dates"]):
        asset = item.assets["product"]
        assert "corsa-product" in asset.roles
        path = asset.get_absolute_href()
        assert path.endswith(stream_format.file_name(record["date"])) and (out / record["files"][0]).stat().st_size == record["bytes"]
        assert item.properties["corsa:cf"] == pytest.approx(record["cf"], rel=1e-3)
        assert item.properties["proj:shape"] == record["shape"] and item.properties["corsa:quality"] == 3
        west, south, east, north = item.bbox
        with rasterio.open(out.parent / "in" / f"{record['date']}.tif") as f:
            b = f.bounds
        assert (west, south, east, north) == pytest.approx((b.left, b.bottom, b.right, b.top))    # EPSG:4326 here


def test_load_stac_gives_the_products_cube(prod, tmp_path):
    out, run = prod
    assert cli.main(["decompress", str(out), "-o", str(tmp_path / "direct")]) == 0
    graph = {"process_graph": {
        "load": {"process_id": "load_stac", "arguments": {"url": str(out / "collection.json")}},
        "decode": {"process_id": "corsa_openeo_decompress", "arguments": {
            "data": {"from_node": "load"}, "model": "models_onnx/corsa2.1", "quality": 3}},
        "save": {"process_id": "save_result", "arguments": {"data": {"from_node": "decode"}, "format": "GTiff",
                                                            "options": {"filename_prefix": "corsa_decoded"}},
                 "result": True},
        # the same cube saved twice: both sets of files, computed once, each written in full
        "copy": {"process_id": "save_result", "arguments": {"data": {"from_node": "decode"}, "format": "GTiff",
                                                            "options": {"filename_prefix": "copy"}}}}}
    engine = Engine(Catalogue(), output=tmp_path / "engine")
    engine.run(graph)
    direct = sorted(p.name for p in (tmp_path / "direct").glob("*.tif"))
    assert sorted(p.name for p in engine.written) == sorted(direct + [n.replace("corsa_decoded", "copy") for n in direct])
    for p in engine.written:
        np.testing.assert_array_equal(_read(p), _read(tmp_path / "direct" / p.name.replace("copy", "corsa_decoded")))


def test_a_product_found_through_its_item_decodes(prod, tmp_path):
    out, run = prod
    assert cli.main(["decompress", str(out / f"corsa_{run[1].date}.json"), "-o", str(tmp_path / "one.tif")]) == 0
    assert cli.main(["decompress", str(out), "-o", str(tmp_path / "ref.tif"), "--date", run[1].date]) == 0
    np.testing.assert_array_equal(_read(tmp_path / "one.tif"), _read(tmp_path / "ref.tif"))
    item = pystac.Item.from_file(str(tmp_path / "one.json"))
    assert item.properties["corsa:date"] == run[1].date
    data = item.assets["data"]
    assert data.media_type == pystac.MediaType.COG and (tmp_path / "one.tif").samefile(data.get_absolute_href())
    assert [b["name"] for b in data.extra_fields["bands"]][:3] == ["B02", "B03", "B04"]
    assert {b["scale"] for b in data.extra_fields["bands"]} == {1e-4}
