"""The service UDPs as entries of ESA's APEx algorithm catalogue, generated from process_graphs/.

    python -m corsa.openeo.apex              # write the records and scenarios, then re-run the scenarios for their references
    python -m corsa.openeo.apex --json-only  # only the records and scenarios (no engine run)

Writes, in the catalogue's layout (github.com/ESA-APEx/apex_algorithms), under apex/algorithm_catalog/:

    <PROVIDER>/record.json                                   the provider record
    <PROVIDER>/<id>/records/<id>.json                        the OGC API Records "service" record of UDP <id>
    <PROVIDER>/<id>/benchmark_scenarios/<id>.json            one scenario: the UDP called by its raw URL, small area
    <PROVIDER>/<id>/benchmark_scenarios/reference/           the scenario's output on the embedded engine

The UDP JSON stays in process_graphs/ (the records and scenarios point at it there, on main). The JSON
comes from the UDP files and the constants below only, so it is deterministic and a test checks the
files equal it; the reference outputs come from running each scenario on the embedded engine over
the Major-TOM scene of ../shared/data/s2 (the scenarios' area and date lie inside it).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from corsa.codec.models import MODELS_URL, local_model
from corsa.openeo.jobs import editor_url
from corsa.openeo.processes import GRAPHS_DIR
from corsa.formats.results import file_name

ROOT = Path(__file__).resolve().parents[3]
CATALOG = ROOT / "apex" / "algorithm_catalog"
PROVIDER = "corsa-openeo"
REPO_URL = "https://github.com/corsa-openeo/corsa-openeo"
# Links must name main, never a feature branch: the catalogue refuses other branches.
RAW_BASE = "https://raw.githubusercontent.com/corsa-openeo/corsa-openeo/refs/heads/main"
BACKEND = "openeo.dataspace.copernicus.eu"
BACKEND_URL = f"https://{BACKEND}"
# The catalogue's platform record for CDSE's openEO (platform_catalog/ at the catalogue's root).
PLATFORM = "../../../../platform_catalog/cdse_openeo_federation.json"
# Fixed, not the time of generation: the files must come out the same on every run.
RECORD_DATE = "2026-11-25T00:00:00Z"
GCMD = "https://gcmd.earthdata.nasa.gov/kms/concepts/concept_scheme/sciencekeywords"
LANGUAGE = {"code": "en-US", "name": "English (United States)"}
JOB_RESULTS = "job-results.json"
GEOTIFF = "image/tiff; application=geotiff"

# The scenarios' area: 256 x 256 px (2.56 km) in the middle of the Major-TOM cell 0U_199R, Sentinel-2
# tile 33NZA, product of 2022-07-06 (corsa.formats.datasets LOADERS["majortom"], which the tests use).
BBOX = {"west": 17.9077, "south": 0.0337, "east": 17.9306, "north": 0.0567}
SCENE_DATE = "2022-07-06"
TEMPORAL_EXTENT = ["2022-07-06", "2022-07-07"]
AREA = "256 x 256 px (2.56 km x 2.56 km) of Sentinel-2 tile 33NZA on 2022-07-06"
# The scenario names one date: a product-level cloud filter must not drop it.
MAX_CLOUD_COVER = 100
# The outputs are integers (codebook indices, quantised latents, class values, a 0/1 mask), where the
# catalogue's default atol of 1 would pass any changed index or flipped mask pixel: compare exactly,
# leaving the catalogue's 1% of pixels that may differ (rounding on another CPU).
REFERENCE_OPTIONS = {"rtol": 0, "atol": 0}


@dataclass(frozen=True)
class Service:
    """What the catalogue shows of one service UDP beyond its JSON, and its scenario's extra arguments."""

    id: str
    title: str
    keywords: tuple[str, ...]
    concepts: tuple[str, ...]
    arguments: dict = field(default_factory=dict)


SERVICES = (
    Service("corsa_openeo_compress_s2", "CORSA learned compression of Sentinel-2 L2A (codebook model corsa512)",
            ("Sentinel-2",), ("Sentinel-2 MSI",)),
    Service("corsa2_openeo_compress_s2",
            "CORSA learned compression of Sentinel-2 L2A by quality level (variable-rate model corsa2)",
            ("Sentinel-2",), ("Sentinel-2 MSI",), {"quality": 4}),
    Service("corsa_openeo_classify_s2", "Sentinel-2 L2A scene classes from CORSA compressed features",
            ("Sentinel-2", "Land Use/Land Cover Classification"), ("Sentinel-2 MSI", "LAND USE/LAND COVER")),
)


# -- paths and URLs ---------------------------------------------------------------------------------
def udp_url(process_id: str) -> str:
    """The raw URL of a UDP's JSON on main: the scenario's namespace and the record's application link."""
    return f"{RAW_BASE}/process_graphs/{process_id}.json"


def entry_dir(process_id: str) -> Path:
    """The catalogue folder of one service."""
    return CATALOG / PROVIDER / process_id


def reference_dir(process_id: str) -> Path:
    """Where a scenario's reference output lies in the repository (served from RAW_BASE)."""
    return entry_dir(process_id) / "benchmark_scenarios" / "reference"


def raw_url(path: Path) -> str:
    """The raw URL on main of a file of this repository."""
    return f"{RAW_BASE}/{path.relative_to(ROOT).as_posix()}"


def read_udp(process_id: str) -> dict:
    """A service UDP as process_graphs/ holds it."""
    return json.loads((GRAPHS_DIR / f"{process_id}.json").read_text())


# -- benchmark scenarios ------------------------------------------------------------------------------
def reference_names(udp: dict) -> list[str]:
    """The files a run of the scenario makes: one GeoTIFF per save_result for its one date (named as the
    engine's save_result names them), plus the job's metadata that the catalogue downloads with them."""
    prefixes = [(node["arguments"].get("options") or {}).get("filename_prefix")
                for node in udp["process_graph"].values() if node["process_id"] == "save_result"]
    return sorted([file_name(p, SCENE_DATE) for p in prefixes] + [JOB_RESULTS])


def scenario_arguments(service: Service) -> dict:
    """The UDP's arguments in the scenario. Model parameters name the shipped model's folder in this
    repository by URL (the UDF fetches its files from there), so the scenario needs no model archive."""
    models = {p["name"]: p["default"] for p in read_udp(service.id)["parameters"]
              if isinstance(p.get("default"), str) and p["default"].startswith(MODELS_URL)}
    return {"spatial_extent": BBOX, "temporal_extent": TEMPORAL_EXTENT, "max_cloud_cover": MAX_CLOUD_COVER,
            **models, **service.arguments}


def scenario(service: Service) -> dict:
    """The benchmark scenario: one node calling the UDP by its raw URL, and where its reference lies."""
    udp = read_udp(service.id)
    node = {"process_id": service.id, "namespace": udp_url(service.id), "arguments": scenario_arguments(service),
            "result": True}
    reference = {name: raw_url(reference_dir(service.id) / name) for name in reference_names(udp)}
    return {"id": service.id, "type": "openeo", "description": f"{service.title}: {AREA}", "backend": BACKEND,
            "process_graph": {service.id.replace("_", "") + "1": node},
            "job_options": udp.get("default_job_options", {}), "reference_data": reference,
            "reference_options": REFERENCE_OPTIONS}


# -- records --------------------------------------------------------------------------------------------
def link(rel: str, type_: str, title: str, href: str) -> dict:
    """One link of a record, with the fields the schema requires."""
    return {"rel": rel, "type": type_, "title": title, "href": href}


CONTACT = {"name": "corsa-openeo", "organization": "corsa-openeo",
           "links": [link("about", "text/html", "GitHub repository", REPO_URL)],
           "contactInstructions": f"Open an issue at {REPO_URL}/issues", "roles": ["principal investigator", "processor"]}


def record(service: Service) -> dict:
    """The OGC API Records service record, laid out as the catalogue's example (max_ndvi_composite)."""
    udp = read_udp(service.id)
    example = next(n for n in reference_names(udp) if n != JOB_RESULTS)
    properties = {
        "created": RECORD_DATE, "updated": RECORD_DATE, "type": "service", "title": service.title,
        "description": udp["description"], "keywords": list(service.keywords),
        "language": LANGUAGE, "languages": [LANGUAGE], "contacts": [CONTACT],
        "themes": [{"concepts": [{"id": c} for c in service.concepts], "scheme": GCMD}],
        "formats": [{"name": "GeoTIFF"}],
    }
    links = [
        link("application", "application/vnd.openeo+json;type=process", "openEO Process Definition", udp_url(service.id)),
        link("service", "application/json", "CDSE openEO", BACKEND_URL),
        link("platform", "application/json", "CDSE openEO federation", PLATFORM),
        link("provider", "application/json", "corsa-openeo", "../../record.json"),
        link("webapp", "text/html", "OpenEO Web Editor", editor_url(service.id, udp_url(service.id), BACKEND_URL)),
        link("example-output", GEOTIFF, f"Example output: {example} of the benchmark scenario",
             raw_url(reference_dir(service.id) / example)),
        link("code", "text/html", "Source code", REPO_URL),
    ]
    return {"id": service.id, "type": "Feature",
            "conformsTo": ["https://www.opengis.net/spec/ogcapi-records-1/1.0/req/record-core",
                           "https://apex.esa.int/core/openeo-udp"],
            "geometry": None, "properties": properties, "linkTemplates": [], "links": links}


def provider_record() -> dict:
    """The provider record (<provider>/record.json) that every service record links to."""
    logo = "https://github.com/corsa-openeo.png"  # the GitHub organisation's avatar
    # a provider's contact links may only be website or logos
    contact = {**CONTACT, "links": [link("website", "text/html", "GitHub repository", REPO_URL)]}
    properties = {"created": RECORD_DATE, "updated": RECORD_DATE, "type": "algorithm_provider",
                  "title": "corsa-openeo", "description": "Learned compression of Sentinel-2 L2A (CORSA) on openEO.",
                  "keywords": [], "language": LANGUAGE, "languages": [LANGUAGE], "contacts": [contact],
                  "themes": [], "acl": {"admin": []}}
    links = [link("website", "text/html", "corsa-openeo", REPO_URL),
             link("logo-light", "image/png", "Logo", logo), link("logo-dark", "image/png", "Logo", logo)]
    return {"id": PROVIDER, "type": "Feature",
            "conformsTo": ["https://www.opengis.net/spec/ogcapi-records-1/1.0/req/record-core"],
            "properties": properties, "linkTemplates": [], "links": links}


def render(doc: dict | list) -> str:
    """JSON text as stored: 2-space indent, key order as built, newline at the end."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def generate() -> dict[Path, str]:
    """Every catalogue JSON file (path -> text), from the UDP files and the constants only."""
    files = {CATALOG / PROVIDER / "record.json": render(provider_record())}
    for service in SERVICES:
        folder = entry_dir(service.id)
        files[folder / "records" / f"{service.id}.json"] = render(record(service))
        files[folder / "benchmark_scenarios" / f"{service.id}.json"] = render([scenario(service)])
    return files


def write_json() -> list[Path]:
    """Write what generate() makes."""
    files = generate()
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)


# -- reference outputs ----------------------------------------------------------------------------------
def write_source(folder: Path) -> tuple[Path, str]:
    """The Major-TOM scene as the 10-band dated GeoTIFF that SENTINEL2_L2A maps to, and its product id.

    Written at run time from ../shared/data/s2: the shared data is never copied into the repository."""
    from benchmarks.scale import write_mosaic  # the repository root is on the path (python -m, the tests)
    from corsa.formats.datasets import LOADERS, default_data_root

    (scene,) = LOADERS["majortom"](default_data_root())
    if scene.date != SCENE_DATE:
        raise RuntimeError(f"the Major-TOM scene is of {scene.date}, the scenarios ask for {SCENE_DATE}")
    path = Path(folder) / "majortom.tif"
    write_mosaic(path, scene.data.shape[1])
    return path, scene.name


def local_arguments(arguments: dict) -> dict:
    """The scenario's arguments for the embedded engine: a model named by its URL in this repository
    is read from the same folder here (models_onnx/<name>)."""
    return {k: local_model(v) if isinstance(v, str) else v for k, v in arguments.items()}


def job_results(scenario_: dict, names: list[str], product_id: str) -> dict:
    """The job metadata the catalogue downloads with the results (it compares their derived_from links):
    STAC with the source product as a back end on CDSE names it (an /eodata/... .SAFE path)."""
    day = product_id.split("_")[2][:8]
    safe = f"/eodata/Sentinel-2/MSI/L2A/{day[:4]}/{day[4:6]}/{day[6:]}/{product_id}.SAFE"
    return {"type": "Collection", "stac_version": "1.0.0", "id": scenario_["id"],
            "description": f"Reference output of the APEx benchmark scenario {scenario_['id']}, made by the "
                           "embedded openEO engine of corsa-openeo (python -m corsa.openeo.apex).",
            "license": "proprietary",
            "extent": {"spatial": {"bbox": [[BBOX["west"], BBOX["south"], BBOX["east"], BBOX["north"]]]},
                       "temporal": {"interval": [[f"{SCENE_DATE}T00:00:00Z", f"{SCENE_DATE}T00:00:00Z"]]}},
            "links": [{"rel": "derived_from", "href": safe, "title": f"Derived from {product_id}"}],
            "assets": {n: {"href": f"./{n}", "type": GEOTIFF, "roles": ["data"]} for n in names}}


def run_scenario(scenario_: dict, source: Path, out: Path, product_id: str) -> list[Path]:
    """Run a scenario's process graph on the embedded engine over ``source`` into ``out`` (created,
    must be new or empty), with the job metadata; returns the files, sorted by name.

    The engine runs our UDPs by process_id from process_graphs/ and ignores the node's namespace: the
    raw URL there is the same file on main, so the graph runs unchanged but for the model folders."""
    from corsa.openeo.engine import Engine
    from corsa.formats.sources import Catalogue

    graph = json.loads(json.dumps(scenario_["process_graph"]))
    for node in graph.values():
        node["arguments"] = local_arguments(node["arguments"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    Engine(Catalogue({"SENTINEL2_L2A": source}), output=out).run({"process_graph": graph})
    images = sorted(p.name for p in out.iterdir())
    (out / JOB_RESULTS).write_text(render(job_results(scenario_, images, product_id)))
    made = sorted(images + [JOB_RESULTS])
    if made != sorted(scenario_["reference_data"]):
        raise RuntimeError(f"scenario {scenario_['id']} made {made}, its reference_data names "
                           f"{sorted(scenario_['reference_data'])}")
    return [out / n for n in made]


def write_references() -> list[Path]:
    """Run every scenario on the engine and replace its reference folder with what it made."""
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        source, product_id = write_source(Path(tmp))
        for service in SERVICES:
            made = run_scenario(scenario(service), source, Path(tmp) / service.id, product_id)
            target = reference_dir(service.id)
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            written += [Path(shutil.copyfile(p, target / p.name)) for p in made]
    return written


def main(argv: list[str] | None = None) -> int:
    """python -m corsa.openeo.apex: the JSON always (cheap, deterministic); the references unless --json-only."""
    p = argparse.ArgumentParser(prog="python -m corsa.openeo.apex", description=__doc__.splitlines()[0])
    p.add_argument("--json-only", action="store_true", help="write the records and scenarios, run nothing")
    args = p.parse_args(argv)
    paths = write_json() + ([] if args.json_only else write_references())
    for path in paths:
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size} B")
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # benchmarks.scale writes the source scene
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
