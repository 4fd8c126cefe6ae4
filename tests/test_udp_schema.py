"""Every UDP JSON against the openEO process specifications shipped with openeo-processes-dask.

No JSON Schema of a whole process document is shipped, so the checks are explicit: parameter and
return schemas are valid JSON Schemas with openEO subtypes, defaults fit their schemas, and every
node calls a specified process with arguments that process defines, the required ones included.
(tests/test_process_graphs.py checks the catalogue conventions: id, summary, descriptions.)
"""
import json
from pathlib import Path

import jsonschema
import openeo_processes_dask
import pytest

from corsa.openeo.jobs import udps

SPECS = Path(openeo_processes_dask.__file__).parent / "specs" / "openeo-processes"
# (one shipped spec file, missing-processes/export_collection.json, is empty)
STANDARD = {p.stem: json.loads(p.read_text()) for d in (SPECS, SPECS / "missing-processes") for p in d.glob("*.json")
            if p.stat().st_size}
UDPS = udps()


def _subtypes(node) -> set[str]:
    if isinstance(node, dict):
        found = {node["subtype"]} if isinstance(node.get("subtype"), str) else set()
        return found.union(*(_subtypes(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_subtypes(v) for v in node))
    return set()


# The subtype catalogue (meta/subtype-schemas.json) predates "datacube", which the shipped
# process specs use: both sources count.
KNOWN_SUBTYPES = set(json.loads((SPECS / "meta" / "subtype-schemas.json").read_text())["definitions"]) \
    | _subtypes(list(STANDARD.values()))


def _schemas(schema) -> list[dict]:
    return schema if isinstance(schema, list) else [schema]


def _nodes(graph: dict):
    for node in graph.values():
        yield node
        for arg in node["arguments"].values():
            if isinstance(arg, dict) and "process_graph" in arg:
                yield from _nodes(arg["process_graph"])


def test_the_specs_are_there():
    assert {"load_collection", "apply_neighborhood", "run_udf", "save_result", "lte"} <= set(STANDARD)
    assert {"raster-cube", "bounding-box", "temporal-interval", "datacube"} <= KNOWN_SUBTYPES


@pytest.mark.parametrize("pid", sorted(UDPS))
def test_parameters_and_returns_are_openeo_schemas(pid):
    udp = UDPS[pid]
    for p in udp["parameters"]:
        for schema in _schemas(p["schema"]):
            jsonschema.Draft7Validator.check_schema(schema)
            assert schema.get("subtype") in KNOWN_SUBTYPES | {None}, (p["name"], schema)
        if "default" in p:
            assert any(jsonschema.Draft7Validator(s).is_valid(p["default"]) for s in _schemas(p["schema"])), p
            assert p.get("optional", True), f"{p['name']} has a default, so it is optional"
    for schema in _schemas(udp["returns"]["schema"]):
        jsonschema.Draft7Validator.check_schema(schema)
        assert schema.get("subtype") in KNOWN_SUBTYPES | {None}


def _call_problems(graph: dict) -> list[str]:
    problems = [] if sum(bool(n.get("result")) for n in graph.values()) == 1 else ["not one result node"]
    for node in _nodes(graph):
        spec = STANDARD.get(node["process_id"]) or UDPS.get(node["process_id"])
        if spec is None:
            problems.append(f"{node['process_id']} is neither an openEO process nor one of ours")
            continue
        names = {p["name"] for p in spec["parameters"]}
        required = {p["name"] for p in spec["parameters"] if not p.get("optional")}
        problems += [f"{node['process_id']} has no parameter {a}" for a in sorted(set(node["arguments"]) - names)]
        problems += [f"{node['process_id']} lacks {a}" for a in sorted(required - set(node["arguments"]))]
    return problems


@pytest.mark.parametrize("pid", sorted(UDPS))
def test_nodes_call_specified_processes_correctly(pid):
    assert _call_problems(UDPS[pid]["process_graph"]) == []


def test_the_checks_catch_a_broken_graph():
    graph = json.loads(json.dumps(UDPS["corsa_openeo_compress_s2"]["process_graph"]))
    load = next(n for n in graph.values() if n["process_id"] == "load_collection")
    load["arguments"]["collection"] = load["arguments"].pop("id")
    graph["extra"] = {"process_id": "corsa_teleport", "arguments": {}}
    assert _call_problems(graph) == ["load_collection has no parameter collection", "load_collection lacks id",
                                     "corsa_teleport is neither an openEO process nor one of ours"]
