"""process_graphs/*.json are exactly what the client code generates, and follow UDP conventions."""
import json

import pytest

from corsa.blocks.classmap import DEFAULT_CLASSIFIER
from corsa.codec.models import DEFAULT_MODEL, MODELS_DIR, MODELS_URL, read_card
from corsa.openeo.processes import GRAPHS_DIR, PROCESSES, UDF_CODE, render
from corsa.openeo.windows import RENDER_EXACT_SCALE, compress_reach

FILES = sorted(GRAPHS_DIR.glob("*.json"))


def test_every_process_has_its_file_and_no_stray_files():
    assert {f.stem for f in FILES} == set(PROCESSES)


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_file_equals_generated(path):
    assert path.read_text() == render(PROCESSES[path.stem]()), \
        f"{path.name} is stale: run python -m corsa.openeo.processes"


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
    reach = {"compress": max(compress_reach(c) for c in codecs),
             "decompress": max(c["receptive_radius_px"]["decoder"] for c in codecs),
             "classify": max([clf_card["receptive_radius_px"]["grid10"]]
                             + [h["receptive_radius_px"] for c in cards for h in (c.get("heads") or {}).values()]),
             "render": (max(c["render"]["reach_px"] for c in cards if "render" in c) + 1) * RENDER_EXACT_SCALE}
    seen = set()
    for path in FILES:
        for mode, overlap in _neighborhoods(json.loads(path.read_text())):
            if "compress_s2" in path.stem and mode == "compress":
                continue  # a service overlaps by its own model's reach (test_compress_services_store_their_models_layers)
            assert overlap % 4 == 0 and reach[mode] <= overlap < reach[mode] + 4, (path.name, mode, overlap)
            seen.add(mode)
    assert seen == set(reach)


def _upstream(graph: dict, node_id: str) -> list[dict]:
    """The nodes ``node_id`` takes its data from, nearest first (one graph level, callbacks aside)."""
    chain, current = [], graph[node_id]
    while isinstance(current["arguments"].get("data"), dict) and "from_node" in current["arguments"]["data"]:
        current = graph[current["arguments"]["data"]["from_node"]]
        chain.append(current)
    return chain


def _is_compress(node: dict) -> bool:
    return node["process_id"] == "apply_neighborhood" and any(
        n["arguments"]["context"]["mode"] == "compress" for n in node["arguments"]["process"]["process_graph"].values()
        if n["process_id"] == "run_udf")


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_no_graph_saves_a_replicated_compressed_cube(path):
    """Whatever a graph saves of a compressed cube is one stored layer on its own grid: the nodata
    band at 10 m, every other band resampled to its layer's coarser grid."""
    graph = json.loads(path.read_text())["process_graph"]
    for node_id, node in graph.items():
        if node["process_id"] != "save_result":
            continue
        chain = _upstream(graph, node_id)
        udfs = [n for n in chain if n["process_id"] == "apply_neighborhood"]
        if not udfs or not _is_compress(udfs[0]):
            continue  # no compressed cube (or one a UDF already turned into something else)
        assert node["arguments"]["format"] == "GTiff"
        steps = [n["process_id"] for n in chain[:chain.index(next(n for n in chain if _is_compress(n)))]]
        bands = next((n["arguments"]["bands"] for n in chain if n["process_id"] == "filter_bands"), None)
        if bands == ["nodata"]:
            assert steps == ["filter_bands"], path.name
        else:
            # a latent saved whole (every channel, whatever the model) or a codebook model's indices
            assert steps == ["resample_spatial"] + (["filter_bands"] if bands else []), path.name
            assert chain[0]["arguments"]["method"] == "near" and chain[0]["arguments"]["resolution"] > 10


@pytest.mark.parametrize("pid, model", [("corsa_openeo_compress_s2", DEFAULT_MODEL), ("corsa2_openeo_compress_s2", DEFAULT_MODEL)])
def test_compress_services_store_their_models_layers(pid, model):
    """The layers a service saves are the model card's (bands, grid), under their file prefixes,
    and its chunks overlap by that model's encoder reach."""
    udp = json.loads((GRAPHS_DIR / f"{pid}.json").read_text())
    _, card = read_card(model)
    assert next(p for p in udp["parameters"] if p["name"] == "model")["default"] == f"{MODELS_URL}/{model}"
    graph = udp["process_graph"]
    saved = {}
    for node_id, node in graph.items():
        if node["process_id"] == "save_result":
            chain = _upstream(graph, node_id)
            bands = next((n["arguments"]["bands"] for n in chain if n["process_id"] == "filter_bands"), "every band")
            resample = [n["arguments"]["resolution"] for n in chain if n["process_id"] == "resample_spatial"]
            saved[node["arguments"]["options"]["filename_prefix"]] = (bands, resample[0] if resample else 10)
    whole = card.get("kind") == "variable-rate"    # the latent layer: no band list that could miss a channel
    assert saved == {f"corsa_{l['name']}": ("every band" if whole and l["name"] == "latent" else l["bands"],
                                            l["resolution_m"]) for l in card["layers"]}
    [(mode, overlap)] = list(_neighborhoods(udp))
    # the encoder's reach, and a refined model's decoder's on top, in whole cells (4 px, 16 px refined)
    refined = "refine" in card
    reach, cell = card["receptive_radius_px"]["encoder"] + refined * card["receptive_radius_px"]["decoder"], 4 + 12 * refined
    assert mode == "compress" and overlap == compress_reach(card) and reach <= overlap < reach + cell and overlap % cell == 0
    assert ("quality" in {p["name"] for p in udp["parameters"]}) == (card.get("kind") == "variable-rate")
