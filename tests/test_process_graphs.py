"""process_graphs/*.json are exactly what the client code generates, and follow UDP conventions."""
import json

import pytest

from corsa.classmap import DEFAULT_CLASSIFIER
from corsa.codec import DEFAULT_MODEL, MODELS_DIR, read_card
from corsa.processes import GRAPHS_DIR, PROCESSES, UDF_CODE, render

FILES = sorted(GRAPHS_DIR.glob("*.json"))


def test_every_process_has_its_file_and_no_stray_files():
    assert {f.stem for f in FILES} == set(PROCESSES)


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_file_equals_generated(path):
    assert path.read_text() == render(PROCESSES[path.stem]()), \
        f"{path.name} is stale: run python -m corsa.processes"


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_udp_conventions(path):
    udp = json.loads(path.read_text())
    assert udp["id"] == path.stem
    assert udp["summary"] and udp["description"] and udp["returns"]["schema"]
    for p in udp["parameters"]:
        schemas = p["schema"] if isinstance(p["schema"], list) else [p["schema"]]
        assert p["name"] and p["description"] and all(s.get("type") for s in schemas), p
    names = {p["name"] for p in udp["parameters"]}
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "from_parameter" in node:
                refs.add(node["from_parameter"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(udp["process_graph"])
    # callback parameters (data of run_udf, value of the property filter) are not UDP parameters
    assert refs - {"data", "value"} <= names


def test_udf_code_is_embedded_verbatim():
    for path in FILES:
        text = path.read_text()
        if "run_udf" in text:
            assert json.dumps(UDF_CODE) in text


def _neighborhoods(node):
    """(mode, overlap px) of every apply_neighborhood running the CORSA UDF below ``node``."""
    if isinstance(node, dict):
        if node.get("process_id") == "apply_neighborhood":
            (udf,) = node["arguments"]["process"]["process_graph"].values()
            overlaps = {o["dimension"]: o["value"] for o in node["arguments"]["overlap"]}
            assert overlaps["x"] == overlaps["y"]
            yield udf["arguments"]["context"]["mode"], overlaps["x"]
        for v in node.values():
            yield from _neighborhoods(v)


def test_chunk_overlap_covers_each_networks_reach():
    """Chunks overlap by what the mode's network reaches (model cards: the farthest-reaching codec),
    in whole level-1 cells: less would leave seams at chunk borders."""
    cards = [read_card(p.parent)[1] for p in MODELS_DIR.glob("*/model_card.json")]
    codecs = [c for c in cards if "encoder" in c["files"]]
    assert DEFAULT_MODEL in {c["id"] for c in codecs} and "corsa2" in {c["id"] for c in codecs}
    _, clf_card = read_card(DEFAULT_CLASSIFIER)
    reach = {"compress": max(c["receptive_radius_px"]["encoder"] for c in codecs),
             "decompress": max(c["receptive_radius_px"]["decoder"] for c in codecs),
             "classify": clf_card["receptive_radius_px"]["grid10"]}
    seen = set()
    for path in FILES:
        for mode, overlap in _neighborhoods(json.loads(path.read_text())):
            assert overlap % 4 == 0 and reach[mode] <= overlap < reach[mode] + 4, (path.name, mode, overlap)
            seen.add(mode)
    assert seen == set(reach)
