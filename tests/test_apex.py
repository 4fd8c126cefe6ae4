"""The APEx algorithm catalogue entries in apex/ (corsa.openeo.apex): what the catalogue checks, offline.

Records and scenarios against the catalogue's JSON schemas (reference copies in ../shared/apex/schemas;
they hold only internal $refs, so no cross-file registry is needed), the files against what corsa.openeo.apex
generates, the UDP JSON files against the catalogue's lint rules, and one scenario run on the
embedded engine against its stored reference output, with the catalogue's comparison and tolerances.
"""
import json
import re
import shutil
import time
from pathlib import Path

import jsonschema
import pytest
import rasterio
from openeo.testing.results import assert_job_results_allclose

from corsa.openeo import apex
from corsa.openeo.processes import GRAPHS_DIR

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "apex" / "schemas"
SERVICE_IDS = [s.id for s in apex.SERVICES]
RECORDS = sorted(apex.CATALOG.glob("*/*/records/*.json"))
SCENARIO_FILES = sorted(apex.CATALOG.glob("*/*/benchmark_scenarios/*.json"))
PROVIDERS = sorted(apex.CATALOG.glob("*/record.json"))
UDP_FILES = sorted(GRAPHS_DIR.glob("*.json"))
# The back ends the catalogue's scenario lint accepts (apex_algorithm_qa_tools.scenarios.openeo).
BACKENDS = [r"^(https://)?openeo\.dataspace\.copernicus\.eu(/.*)?$", r"^(https://)?openeofed\.dataspace\.copernicus\.eu(/.*)?$",
            r"^(https://)?openeo\.cloud(/.*)?$", r"^(https://)?openeo\.vito\.be(/.*)?$",
            r"^(https://)?openeo\.terrascope\.be(/.*)?$", r"^(https://)?openeo\.eodc\.eu(/.*)?$"]
# Platform records in the catalogue's platform_catalog/ (ESA-APEx/apex_algorithms).
PLATFORMS = {"cdse_openeo_federation.json", "openeo_platform.json", "terrascope.json", "openeo_eodc.json"}
MAX_REFERENCE_BYTES = 200_000
# What the catalogue's benchmark run passes to assert_job_results_allclose unless reference_options say otherwise.
CATALOGUE_TOLERANCE = {"rtol": 1e-3, "atol": 1, "pixel_tolerance": 1}


def _read(path: Path):
    return json.loads(path.read_text())


def schema_errors(doc, name: str) -> list[str]:
    """Where ``doc`` breaks the catalogue's schema ``name`` (empty: valid)."""
    if not SCHEMAS.is_dir():
        pytest.fail(f"the APEx schemas are not at {SCHEMAS}")
    schema = _read(SCHEMAS / f"{name}.json")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in cls(schema).iter_errors(doc)]


def feature_branch(href: str) -> str | None:
    """The branch a GitHub link names when it is not main, master or a commit (the catalogue refuses those)."""
    for pattern in (r"//raw\.githubusercontent\.com/.*?/refs/heads/(.*?)/",
                    r"//raw\.githubusercontent\.com/[^/]+/[^/]+/(.*?)/", r"//github\.com/[^/]+/[^/]+/(?:blob|tree)/(.*?)/"):
        match = re.search(pattern, href)
        if match and match.group(1) not in ("main", "master", "refs") and not re.fullmatch("[0-9a-f]{7,40}", match.group(1)):
            return match.group(1)
    return None


def udp_lint(udp: dict, path: Path) -> list[str]:
    """The catalogue's lint rules for a UDP JSON file (shared/apex/README.md)."""
    problems = [] if udp.get("id") == path.stem else [f"id {udp.get('id')!r} is not the file stem {path.stem!r}"]
    problems += [f"no {key}" for key in ("description", "parameters", "process_graph") if key not in udp]
    for i, p in enumerate(udp.get("parameters", [])):
        name = p.get("name", f"parameter {i}")
        problems += [f"{name}: no {key}" for key in ("name", "description", "schema") if key not in p]
        schema = p.get("schema", {})
        for j, s in enumerate(schema if isinstance(schema, list) else [schema]):
            if not isinstance(s, dict) or "type" not in s:
                problems.append(f"{name}: schema {j} has no type")
    problems += [f"link to branch {b!r}" for link in udp.get("links", []) if (b := feature_branch(link.get("href", "")))]
    return problems


def _hrefs(doc) -> list[str]:
    """Every string that is a URL anywhere in ``doc``."""
    if isinstance(doc, dict):
        return [h for v in doc.values() for h in _hrefs(v)]
    if isinstance(doc, list):
        return [h for v in doc for h in _hrefs(v)]
    return [doc] if isinstance(doc, str) and "://" in doc else []


def _scenarios() -> list[tuple[Path, dict]]:
    return [(path, s) for path in SCENARIO_FILES for s in _read(path)]


SCENARIOS = [pytest.param(s, id=s["id"]) for _, s in _scenarios()]


# -- layout and drift ---------------------------------------------------------------------------------
def test_every_service_has_a_record_and_a_scenario():
    assert PROVIDERS == [apex.CATALOG / apex.PROVIDER / "record.json"]
    assert sorted(p.parents[1].name for p in RECORDS) == sorted(SERVICE_IDS)
    assert sorted(p.parents[1].name for p in SCENARIO_FILES) == sorted(SERVICE_IDS)
    assert sorted(s["id"] for _, s in _scenarios()) == sorted(SERVICE_IDS)


def test_files_equal_what_corsa_apex_generates():
    generated = apex.generate()
    on_disk = {p for p in apex.CATALOG.rglob("*.json") if "reference" not in p.relative_to(apex.CATALOG).parts}
    assert on_disk == set(generated), "stale or missing files: run python -m corsa.openeo.apex"
    for path, text in generated.items():
        assert path.read_text() == text, f"{path} differs from what corsa.openeo.apex generates: run python -m corsa.openeo.apex"
    assert apex.generate() == generated  # deterministic


# -- schemas --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.stem)
def test_record_validates(path):
    record = _read(path)
    assert schema_errors(record, "record") == []
    assert path.stem == record["id"] == path.parents[1].name


@pytest.mark.parametrize("path", PROVIDERS, ids=lambda p: p.parent.name)
def test_provider_record_validates(path):
    provider = _read(path)
    assert schema_errors(provider, "provider") == []
    assert provider["id"] == path.parent.name


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=lambda p: p.stem)
def test_scenario_file_validates(path):
    scenarios = _read(path)
    assert isinstance(scenarios, list) and scenarios, "a scenario file is a list of scenarios"
    for s in scenarios:
        assert schema_errors(s, "benchmark_scenario") == []
    assert path.stem in [s["id"] for s in scenarios]


def _without_link(doc, rel):
    doc["links"] = [link for link in doc["links"] if link["rel"] != rel]


BREAKAGES = {
    "record without provider link": ("record", lambda d: _without_link(d, "provider")),
    "record with a keyword outside the taxonomy": ("record", lambda d: d["properties"]["keywords"].append("Compression")),
    "record without contacts": ("record", lambda d: d["properties"].pop("contacts")),
    "record link without title": ("record", lambda d: d["links"][0].pop("title")),
    "record platform link outside platform_catalog": ("record", lambda d: next(
        link for link in d["links"] if link["rel"] == "platform").update(href="platform.json")),
    "scenario with an unknown field": ("benchmark_scenario", lambda d: d.update(job_option={})),
    "scenario without backend": ("benchmark_scenario", lambda d: d.pop("backend")),
    "provider without logos": ("provider", lambda d: _without_link(d, "logo-dark")),
}


@pytest.mark.parametrize("case", BREAKAGES)
def test_a_broken_document_fails_validation(case):
    schema, breakage = BREAKAGES[case]
    doc = {"record": lambda: _read(RECORDS[0]), "benchmark_scenario": lambda: _read(SCENARIO_FILES[0])[0],
           "provider": lambda: _read(PROVIDERS[0])}[schema]()
    assert schema_errors(doc, schema) == []
    breakage(doc)
    assert schema_errors(doc, schema) != []


# -- links and scenario contents ------------------------------------------------------------------------
@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.stem)
def test_record_links(path):
    record = _read(path)
    links = {link["rel"]: link["href"] for link in record["links"]}
    assert (path.parent / links["provider"]).resolve() == PROVIDERS[0]
    assert links["platform"].startswith("../../../../platform_catalog/") and Path(links["platform"]).name in PLATFORMS
    assert links["application"] == f"{apex.RAW_BASE}/process_graphs/{record['id']}.json"
    assert _read(GRAPHS_DIR / f"{record['id']}.json")["id"] == record["id"]
    assert f"wizard~processUrl={links['application']}&" in links["webapp"]
    example = Path(links["example-output"].removeprefix(apex.RAW_BASE + "/"))
    assert links["example-output"].startswith(apex.RAW_BASE) and (apex.ROOT / example).is_file()


def test_no_link_names_a_feature_branch():
    docs = [_read(p) for p in RECORDS + SCENARIO_FILES + PROVIDERS + UDP_FILES]
    hrefs = [h for d in docs for h in _hrefs(d)]
    assert any("raw.githubusercontent.com" in h for h in hrefs)
    assert [h for h in hrefs if feature_branch(h)] == []
    assert feature_branch("https://raw.githubusercontent.com/o/r/refs/heads/apex-work/x.json") == "apex-work"
    assert feature_branch("https://raw.githubusercontent.com/o/r/apex-work/x.json") == "apex-work"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_lint(scenario):
    """The catalogue's scenario lint, with the namespace checked against the local file it names."""
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", scenario["id"])
    assert any(re.fullmatch(p, scenario["backend"]) for p in BACKENDS)
    (node,) = scenario["process_graph"].values()
    assert node["result"] is True and re.fullmatch(r"[a-zA-Z0-9_-]+", node["process_id"])
    assert node["namespace"] == f"{apex.RAW_BASE}/process_graphs/{node['process_id']}.json"
    udp = _read(GRAPHS_DIR / f"{node['process_id']}.json")
    assert udp["id"] == node["process_id"]
    params = {p["name"]: p for p in udp["parameters"]}
    args = node["arguments"]
    assert set(args) <= set(params)
    assert {n for n, p in params.items() if not p.get("optional") and "default" not in p} <= set(args)
    assert not [v for v in args.values() if isinstance(v, str) and v.startswith("/")], "a local path in the scenario"
    start, end = args["temporal_extent"]
    assert start <= apex.SCENE_DATE < end
    assert scenario["job_options"] == udp.get("default_job_options", {})


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_reference_data_is_stored_here(scenario):
    folder = apex.reference_dir(scenario["id"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(scenario["reference_data"])
    for name, url in scenario["reference_data"].items():
        assert url == f"{apex.RAW_BASE}/{(folder / name).relative_to(apex.ROOT).as_posix()}"
        assert (folder / name).stat().st_size < MAX_REFERENCE_BYTES
    for tif in folder.glob("*.tif"):
        with rasterio.open(tif) as src:
            assert src.crs is not None and src.read().size > 0


# -- the UDP JSON files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", UDP_FILES, ids=lambda p: p.stem)
def test_udp_satisfies_the_catalogue_lint(path):
    assert udp_lint(_read(path), path) == []


def test_udp_lint_catches_breakage():
    path = GRAPHS_DIR / f"{SERVICE_IDS[0]}.json"
    udp = _read(path)
    assert udp_lint(udp, path.with_name("other.json")) != []
    for breakage in (lambda u: u.pop("description"), lambda u: u["parameters"][0].pop("description"),
                     lambda u: u["parameters"][0]["schema"][1].pop("type"), lambda u: u["parameters"][-1].pop("schema"),
                     lambda u: u.update(links=[{"href": "https://raw.githubusercontent.com/o/r/refs/heads/wip/a.json"}])):
        broken = json.loads(json.dumps(udp))
        breakage(broken)
        assert udp_lint(broken, path) != []


# -- a scenario on the embedded engine ------------------------------------------------------------------
def test_scenario_reproduces_its_reference_on_the_engine(data_root, tmp_path):
    """The corsa2 scenario, run as the catalogue would (but on the embedded engine over the local copy of
    its scene), gives its stored reference within the catalogue's tolerances; a changed reference fails."""
    service = "corsa2_openeo_compress_s2"
    (scenario,) = _read(apex.entry_dir(service) / "benchmark_scenarios" / f"{service}.json")
    cpu = time.process_time()
    source, product_id = apex.write_source(tmp_path)
    apex.run_scenario(scenario, source, tmp_path / "actual", product_id)
    cpu = time.process_time() - cpu
    tolerance = {**CATALOGUE_TOLERANCE, **scenario.get("reference_options", {})}
    reference = apex.reference_dir(service)
    assert_job_results_allclose(tmp_path / "actual", reference, tmp_path=tmp_path, **tolerance)
    assert _read(tmp_path / "actual" / apex.JOB_RESULTS) == _read(reference / apex.JOB_RESULTS)
    assert cpu < 60, f"the scenario took {cpu:.0f} s of CPU"

    changed = tmp_path / "changed"
    shutil.copytree(reference, changed)
    # the one-band file: on a mismatch openeo draws every band of the file as text, slowly
    with rasterio.open(changed / f"corsa_nodata_{apex.SCENE_DATE}.tif", "r+") as dst:
        mask = dst.read()
        mask[:, :64, :64] = 1  # 6% of the pixels, past the 1% the catalogue lets differ
        dst.write(mask)
    with pytest.raises(AssertionError, match="corsa_nodata"):
        assert_job_results_allclose(tmp_path / "actual", changed, tmp_path=tmp_path, **tolerance)
