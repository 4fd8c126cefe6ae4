"""The client library against a real openEO API server (openeo-driver's dummy back end, started
here from .venv-driver) and, through the same functions, against the embedded engine."""
import functools
import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import rasterio
import requests
from rasterio.transform import Affine

from corsa.openeo import jobs
from corsa.codec.models import DEFAULT_MODEL, MODELS_URL, UNPACKED_MODELS, VariableRateCodec, read_card
from corsa.formats.datasets import LOADERS
from corsa.openeo.local import EngineConnection
from corsa.core.metrics import psnr
from corsa.core.scene import BANDS, to_uint16
from corsa.formats import stream_format
from corsa.openeo.processes import GRAPHS_DIR, UDF_CODE
from test_service import write_scene

ROOT = Path(__file__).resolve().parents[1]
SERVER_DIR = Path(__file__).parent / "openeo_server"
USER, PASSWORD = "john", "JOHN!!!"           # the dummy back end's basic-auth user
BBOX = {"west": 5.0, "south": 51.1, "east": 5.1, "north": 51.2}
DATES = ["2023-06-01", "2023-07-01"]
UDP_FIELDS = ("id", "summary", "description", "parameters", "returns", "process_graph")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, results: Path):
        self.url, self.results = url, results

    def job_options(self, job_id: str) -> dict:
        return requests.get(f"{self.url}/_test/jobs/{job_id}").json()["job_options"]

    def set_job(self, job_id: str, **body) -> None:
        requests.put(f"{self.url}/_test/jobs/{job_id}", json=body).raise_for_status()

    def put_results(self, job_id: str, files: list[Path], listed: list[str] | dict[str, dict] | None = None) -> None:
        folder = self.results / job_id
        folder.mkdir(parents=True)
        for f in files:
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / "assets.json").write_text(json.dumps(listed or [f.name for f in files]))
        self.set_job(job_id, status="finished")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Setup failures fail the tests: the server tests are never skipped.
    subprocess.run(["bash", str(ROOT / "scripts" / "setup_driver.sh")], check=True)
    port, results = _free_port(), tmp_path_factory.mktemp("job_results")
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    env = {**os.environ, "CORSA_JOB_RESULTS": str(results), "OPENEO_BACKEND_CONFIG": str(SERVER_DIR / "config.py"),
           "FLASK_APP": "backend_app:create_app"}
    proc = subprocess.Popen([str(ROOT / ".venv-driver" / "bin" / "flask"), "run", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=SERVER_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                pytest.fail(f"the openEO test server exited ({proc.returncode}): {Path(log.name).read_text()}")
            try:
                if requests.get(f"{url}/.well-known/openeo", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            pytest.fail(f"the openEO test server did not answer in 30 s: {Path(log.name).read_text()}")
        yield Server(url, results)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def connection(server):
    return jobs.connect(server.url, USER, PASSWORD)


class FaultProxy:
    """A real HTTP hop in front of the server that answers job creation with HTTP 500, as a back
    end whose job store is down does; every other request passes through."""

    def __init__(self, target: str):
        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "POST" and self.path.rstrip("/").endswith("/jobs"):
                    status, headers = 500, {"Content-Type": "application/json"}
                    content = json.dumps({"id": "r-1", "code": "Internal", "message": "job store unavailable"}).encode()
                else:
                    r = requests.request(self.command, target + self.path, data=body or None,
                                         headers=dict(self.headers), allow_redirects=False)
                    status, content = r.status_code, r.content
                    headers = {k: v for k, v in r.headers.items() if k.lower() in ("content-type", "location")}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = _forward

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _bind(udp: dict, values: dict) -> dict:
    """The UDP's graph with its parameters replaced by values, as a back end does when the UDP is
    called; names a callback defines itself (its data, context) stay references inside it."""
    def sub(node, own):
        if isinstance(node, dict):
            if set(node) == {"from_parameter"} and node["from_parameter"] in values and node["from_parameter"] not in own:
                return values[node["from_parameter"]]
            if "process_graph" in node:
                return {**node, "process_graph": sub(node["process_graph"], own | {"data", "context", "value"})}
            return {k: sub(v, own) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v, own) for v in node]
        return node
    return sub(udp["process_graph"], set())


def _graph_nodes(graph: dict, process_id: str) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("process_id") == process_id:
                found.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(graph)
    return found


# -- connecting ------------------------------------------------------------------------------------

def test_connect_and_log_in(connection):
    assert connection.describe_account()["user_id"] == USER
    assert "SENTINEL2_L2A" in connection.list_collection_ids()


def test_wrong_password_is_refused_clearly(server):
    with pytest.raises(jobs.BackendError, match=r"logging in as 'john'.*HTTP 403 \[CredentialsInvalid\].*"
                                                 r"credentials were refused: check user and password"):
        jobs.connect(server.url, USER, "wrong")


def test_job_without_login_gets_401_explained(server):
    anonymous = jobs.connect(server.url)
    with pytest.raises(jobs.BackendError, match=r"creating job 'x'.*HTTP 401 \[AuthenticationRequired\].*log in first"):
        jobs.submit(jobs.compress(anonymous, BBOX, DATES), "x")


def test_server_down_is_named():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(jobs.BackendError, match=rf"cannot reach the openEO back end at {url}"):
        jobs.connect(url, USER, PASSWORD)


# -- the process graphs on the server --------------------------------------------------------------

@pytest.mark.parametrize("pid", sorted(jobs.udps()))
def test_udp_graph_validates_on_the_server(connection, pid):
    udp = jobs.udps()[pid]
    values = {"spatial_extent": BBOX, "temporal_extent": DATES, "max_cloud_cover": 50, "model": jobs.REMOTE_MODEL,
              "data": {"from_node": "load"}, "resolution": 5}
    graph = _bind(udp, values)
    if "data" in {p["name"] for p in udp["parameters"]}:
        result = next(k for k, n in graph.items() if n.get("result"))
        graph[result].pop("result")
        graph["load"] = {"process_id": "load_collection", "arguments": {"id": "SENTINEL2_L2A", "spatial_extent": BBOX,
                                                                         "temporal_extent": DATES}}
        graph["save"] = {"process_id": "save_result", "result": True,
                         "arguments": {"data": {"from_node": result}, "format": "GTiff"}}
    assert connection.validate_process_graph(graph) == []
    # the check has teeth: an unknown collection is reported
    graph["load" if "load" in graph else "loadcollection1"]["arguments"]["id"] = "NO_SUCH_COLLECTION"
    assert connection.validate_process_graph(graph)


def test_publish_and_read_back_unchanged(connection):
    assert jobs.publish(connection) == sorted(jobs.udps())
    listed = {p["id"] for p in connection.list_user_defined_processes()}
    assert set(jobs.udps()) <= listed
    for pid, udp in jobs.udps().items():
        stored = connection.user_defined_process(pid).describe()
        assert {k: stored[k] for k in UDP_FIELDS} == {k: udp[k] for k in UDP_FIELDS}, pid


# -- batch jobs ------------------------------------------------------------------------------------

def test_compress_job_reaches_the_server_with_our_graph_and_options(server, connection):
    stored = jobs.compress(connection, BBOX, DATES, max_cloud_cover=40)
    options = jobs.job_options(model_archive="https://example.org/corsa512.zip",
                               onnxruntime_archive="https://example.org/onnxruntime.zip")
    job = jobs.start(jobs.submit(stored, "corsa compress", options))
    received = job.describe()
    assert received["status"] == "running" and received["title"] == "corsa compress"
    graph = received["process"]["process_graph"]
    assert connection.validate_process_graph(graph) == []
    [load], [udf] = (_graph_nodes(graph, p) for p in ("load_collection", "run_udf"))
    assert load["arguments"]["id"] == "SENTINEL2_L2A" and load["arguments"]["spatial_extent"] == BBOX
    assert load["arguments"]["temporal_extent"] == DATES and len(load["arguments"]["bands"]) == 10
    assert load["arguments"]["properties"]["eo:cloud_cover"]["process_graph"]["lte1"]["arguments"]["y"] == 40
    assert udf["arguments"]["udf"] == UDF_CODE
    assert udf["arguments"]["context"]["model"] == jobs.REMOTE_MODEL == f"{MODELS_URL}/{DEFAULT_MODEL}"
    # several results: each stored layer saved on its own grid, all of them arriving as sent
    saves = _graph_nodes(graph, "save_result")
    assert sorted(s["arguments"]["options"]["filename_prefix"] for s in saves) == ["corsa_latent", "corsa_nodata"]
    assert {s["arguments"]["format"] for s in saves} == {"GTiff"}
    assert sorted(r["arguments"]["resolution"] for r in _graph_nodes(graph, "resample_spatial")) == [40.0]
    assert sum(bool(n.get("result")) for n in graph.values()) == 1
    assert server.job_options(job.job_id) == {
        "executor-memory": "2G", "executor-memoryOverhead": "3G", "python-memory": "3G",
        "udf-dependency-archives": ["https://example.org/corsa512.zip#models",
                                    "https://example.org/onnxruntime.zip#onnx_deps"]}


@pytest.fixture(scope="module")
def udp_host():
    """process_graphs/ over HTTP, as a repository's raw file URLs serve it."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(GRAPHS_DIR))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("pid", ["corsa_openeo_compress", "corsa_openeo_compress_s2"])
def test_udps_by_reference_to_their_json(server, connection, udp_host, pid):
    url = f"{udp_host}/{pid}.json"
    make = jobs.compressed if pid == "corsa_openeo_compress" else jobs.compress
    job = jobs.submit(make(connection, BBOX, DATES, namespace=url), "by reference")
    graph = job.describe()["process"]["process_graph"]
    [node] = _graph_nodes(graph, pid)
    assert node["namespace"] == url and node["arguments"]["model"] == jobs.REMOTE_MODEL
    assert not _graph_nodes(graph, "run_udf")       # nothing inlined
    # the service saves its own results: the job adds no save_result of its own
    assert len(_graph_nodes(graph, "save_result")) == (1 if make is jobs.compressed else 0)
    with pytest.raises(jobs.BackendError, match=r"HTTP 400 \[ProcessNamespaceInvalid\].*404"):
        jobs.submit(make(connection, BBOX, DATES, namespace=f"{udp_host}/nothing.json"), "bad reference")


def test_server_error_on_job_creation(server, connection):
    before = len(connection.list_jobs())
    with FaultProxy(server.url) as proxy:
        via_proxy = jobs.connect(proxy.url, USER, PASSWORD)
        with pytest.raises(jobs.BackendError, match=r"creating job 'x'.*HTTP 500.*job store unavailable.*server error"):
            jobs.submit(jobs.compress(via_proxy, BBOX, DATES), "x")
    assert len(connection.list_jobs()) == before


def test_job_ending_in_error_names_its_log(server, connection, tmp_path):
    job = jobs.submit(jobs.compress(connection, BBOX, DATES), "doomed")
    with pytest.raises(jobs.JobError, match="never started"):
        jobs.follow(job, poll_seconds=0.05)
    jobs.start(job)
    server.set_job(job.job_id, status="error",
                   logs=[{"id": "1", "level": "error", "message": "UDF: model file models/corsa512/encoder.onnx not found"}])
    with pytest.raises(jobs.JobError, match=rf"job {job.job_id} .* ended in 'error': UDF: model file .* not found"):
        jobs.follow(job, poll_seconds=0.05)


@pytest.fixture(scope="module")
def crop(tmp_path_factory, data_root):
    """A 128 x 128 crop of the Major-TOM scene as a dated 10-band GeoTIFF."""
    scene = next(LOADERS["majortom"](data_root))
    path = tmp_path_factory.mktemp("crop") / "scene.tif"
    write_scene(path, scene.data[:, :128, :128], Affine(*scene.transform), scene.crs, "2022-07-06")
    return path


@pytest.fixture(scope="module")
def local_product(crop, tmp_path_factory):
    """The crop's compress job files, made by the embedded engine through the client functions."""
    local = EngineConnection({"SENTINEL2_L2A": crop}, workdir=tmp_path_factory.mktemp("jobs"))
    job = jobs.follow(jobs.start(jobs.submit(jobs.compress(local, None, ["2022-07-01", "2022-07-10"]), "compress")))
    return jobs.download(job, tmp_path_factory.mktemp("product"))


def test_results_download_and_feed_the_decompress_job(server, connection, local_product, tmp_path):
    job = jobs.start(jobs.submit(jobs.compress(connection, BBOX, DATES), "compress"))
    server.put_results(job.job_id, local_product)
    files = jobs.download(jobs.follow(job, poll_seconds=0.05), tmp_path / "out")
    assert sorted(p.name for p in files) == sorted(p.name for p in local_product)
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(sorted(files), sorted(local_product)))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([p.name for p in files] + ["job.json"])
    assert json.loads((tmp_path / "out" / "job.json").read_text())["job"]["id"] == job.job_id

    decoded = jobs.decompress(connection, jobs.results_cube(job))
    graph = jobs.submit(decoded, "decompress").describe()["process"]["process_graph"]
    loads = _graph_nodes(graph, "load_stac")
    assert {load["arguments"]["url"] for load in loads} == {f"{server.url}/openeo/1.2/jobs/{job.job_id}/results"}
    card = read_card(DEFAULT_MODEL)[1]
    layers = card["layers"]
    # a refined model's latent layer carries its refinement cells (and a loop-filtered one's filters)
    cells = [f"cell_{b}" for b in BANDS] if "refine" in card else []
    cells += [f"filter_{b}" for b in BANDS] if "filter" in card.get("refine", {}) else []
    assert sorted(load["arguments"]["bands"] for load in loads) == sorted(
        l["bands"] + (cells if l["name"] == "latent" else []) for l in layers)
    assert len(_graph_nodes(graph, "resample_cube_spatial")) == len(_graph_nodes(graph, "merge_cubes")) == len(layers) - 1
    [udf] = _graph_nodes(graph, "run_udf")
    assert udf["arguments"]["context"]["mode"] == "decompress"


def test_a_job_whose_files_hold_no_refinement_cells_decodes_without_asking_for_them(server, connection, local_product):
    """A refined model's compress job made before the services refined (its latent asset lists the
    latent's bands and nodata, no cell bands, as a back end lists a GeoTIFF's bands): the decompress
    graph loads what the files hold; a job whose assets list the cells, or no bands, loads them too."""
    card = read_card(DEFAULT_MODEL)[1]
    latent = next(l for l in card["layers"] if l["name"] == "latent")
    cells = [f"cell_{b}" for b in BANDS]
    assert "refine" in card
    for stored, asked in ((latent["bands"] + ["nodata"], []), (latent["bands"] + cells + ["nodata"], cells)):
        job = jobs.start(jobs.submit(jobs.compress(connection, BBOX, DATES), "compress"))
        listed = {p.name: {"bands": [{"name": b} for b in (stored if "latent" in p.name else ["nodata"])]}
                  for p in local_product}
        server.put_results(job.job_id, local_product, listed=listed)
        graph = jobs.submit(jobs.decompress(connection, jobs.results_cube(job)), "decompress").describe()
        loads = _graph_nodes(graph["process"]["process_graph"], "load_stac")
        assert sorted(load["arguments"]["bands"] for load in loads) == sorted(
            l["bands"] + (asked if l["name"] == "latent" else []) for l in card["layers"])


def test_failed_download_leaves_nothing(server, connection, local_product, tmp_path):
    job = jobs.start(jobs.submit(jobs.compress(connection, BBOX, DATES), "compress"))
    # the result listing names a file the back end has lost: the download fails half way
    server.put_results(job.job_id, local_product, listed=[p.name for p in local_product] + ["corsa_lost.tif"])
    with pytest.raises(jobs.BackendError, match=r"downloading corsa_lost.tif of job .* failed, nothing kept"):
        jobs.download(job, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_download_cut_short_is_refused(server, connection, local_product, tmp_path):
    job = jobs.start(jobs.submit(jobs.compress(connection, BBOX, DATES), "compress"))
    # the back end lists one byte more than it serves, as when its copy of a file was cut
    sizes = {p.name: {"file:size": p.stat().st_size + (p.suffix == ".tif")} for p in local_product}
    server.put_results(job.job_id, local_product, listed=sizes)
    with pytest.raises(jobs.BackendError, match=r"downloading corsa_\w+_2022-07-06.tif of job .* failed, nothing "
                       r"kept: (\d+) bytes arrived, the back end lists \d+"):
        jobs.download(job, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_editor_link_runs_the_udp_by_url():
    link = jobs.editor_url("corsa_openeo_compress_s2", "https://example.org/process_graphs/corsa_openeo_compress_s2.json",
                           "https://openeo.dataspace.copernicus.eu")
    parsed = urlparse(link)
    assert f"{parsed.scheme}://{parsed.netloc}/" == "https://editor.openeo.org/"
    assert parse_qs(parsed.query) == {"wizard": ["UDP"], "wizard~process": ["corsa_openeo_compress_s2"],
                                      "wizard~processUrl": ["https://example.org/process_graphs/corsa_openeo_compress_s2.json"],
                                      "server": ["https://openeo.dataspace.copernicus.eu"]}


# -- the same functions on the embedded engine -----------------------------------------------------

@pytest.mark.parametrize("namespace", [None, "user"], ids=["inline", "by-reference"])
def test_embedded_engine_round_trip_through_the_client_functions(crop, tmp_path, namespace):
    local = EngineConnection({"SENTINEL2_L2A": crop}, workdir=tmp_path / "jobs")
    job = jobs.follow(jobs.start(jobs.submit(jobs.compress(local, None, ["2022-07-01", "2022-07-10"],
                                                           namespace=namespace), "compress")))
    files = jobs.download(job, tmp_path / "files")
    assert sorted(p.name for p in files) == [f"corsa_{layer}_2022-07-06.tif" for layer in ("latent", "nodata")]
    decoded_job = jobs.follow(jobs.start(jobs.submit(jobs.decompress(local, jobs.results_cube(job),
                                                                     namespace=namespace), "decompress")))
    [out] = jobs.download(decoded_job, tmp_path / "decoded")

    codec = VariableRateCodec(DEFAULT_MODEL)        # the services' default
    with rasterio.open(crop) as src:
        data = src.read()
    ints = codec.encode(data, codec.default_quality)
    with rasterio.open(tmp_path / "files" / "corsa_latent_2022-07-06.tif") as src:
        np.testing.assert_array_equal(src.read()[:len(ints)], ints)       # every channel, then nodata at 40 m
        assert src.descriptions[-1] == "nodata"
    with rasterio.open(out) as src:
        decoded = src.read()
    # the default model refines: the decompress UDF adds the refinement the compress job stored with the latent
    nodata = (data == 0).all(0)
    _, rec, cells = stream_format.encode_refined(codec, data, ints, codec.default_quality, nodata, None, None, "undated")
    expected = to_uint16(stream_format.refine(rec, cells, codec.refiner, codec.level(codec.default_quality), ~nodata))
    np.testing.assert_array_equal(decoded, np.where(nodata, 0, expected))
    assert psnr(data, decoded) > 30


def test_embedded_engine_job_error_is_reported(tmp_path):
    local = EngineConnection({"SENTINEL2_L2A": tmp_path / "missing.tif"}, workdir=tmp_path / "jobs")
    job = jobs.start(jobs.submit(jobs.compress(local, None, None), "compress"))
    with pytest.raises(jobs.JobError, match=r"ended in 'error': SourceError: .*missing.tif"):
        jobs.follow(job, poll_seconds=0)
    with pytest.raises(jobs.JobError, match="without result files"):
        jobs.download(job, tmp_path / "out")


# -- the command line ------------------------------------------------------------------------------

def test_command_line_publishes_and_explains_refusals(server, connection, capsys):
    assert jobs.main(["publish", "--backend", server.url, "--user", USER, "--password", PASSWORD]) == 0
    assert capsys.readouterr().out.strip() == "published: " + ", ".join(sorted(jobs.udps()))
    assert jobs.main(["publish", "--backend", server.url, "--user", USER, "--password", "nope"]) == 2
    assert "credentials were refused" in capsys.readouterr().err


def test_model_archive_unpacks_where_the_udf_looks(tmp_path):
    import zipfile

    from corsa.codec.models import model_dir

    assert jobs.main(["archive", "-o", str(tmp_path / "corsa512.zip"), "--model", "corsa512"]) == 0
    with zipfile.ZipFile(tmp_path / "corsa512.zip") as z:
        z.extractall(tmp_path / "models")           # what "URL#models" does on the back end
    unpacked = tmp_path / UNPACKED_MODELS / "corsa512"    # the model parameter to give with the archive
    for name in ("encoder.onnx", "decoder.onnx"):
        assert (unpacked / name).read_bytes() == (model_dir("corsa512") / name).read_bytes()
    assert not list(tmp_path.glob("*.part"))


def test_native_processes_only_where_the_back_end_lists_them(connection, crop, tmp_path):
    """VITO's own corsa_compress / corsa_decompress are opt-in and refused, by name, elsewhere."""
    listed = {p["id"] for p in connection.list_processes()}
    assert "corsa_compress" not in listed
    with pytest.raises(jobs.BackendError, match="offers no process 'corsa_compress': use native=False"):
        jobs.compress(connection, BBOX, DATES, native=True)
    local = EngineConnection({"SENTINEL2_L2A": crop}, workdir=tmp_path)
    with pytest.raises(jobs.BackendError, match="offers no process 'corsa_decompress'"):
        jobs.decompress(local, jobs.compressed(local, None, None), native=True)
