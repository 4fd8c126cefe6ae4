"""CORSA on openEO back ends: cubes, batch jobs, results and published UDPs, from the openeo client.

    connection = jobs.connect("https://openeo.dataspace.copernicus.eu")   # or local.EngineConnection(...)
    stored = jobs.compress(connection, bbox, ["2023-06-01", "2023-07-01"])    # one save_result per stored layer
    job = jobs.submit(stored, "corsa compress", jobs.job_options(model_archive=URL))
    files = jobs.download(jobs.follow(jobs.start(job)), "job_results/")   # corsa_<layer>_<date>.tif + job.json
    decoded = jobs.decompress(connection, jobs.results_cube(job))
    # corsa pack job_results/ -o product/: the entropy-coded product, losslessly

A graph inlines the UDP's graph unless ``namespace`` is given: then it calls the published UDP
by reference ("user" for the back end's user namespace, or the URL of the JSON file). With
``native=True`` compress / decompress call the back end's own processes corsa_compress /
corsa_decompress (VITO's, experimental) instead of our UDF, where the back end lists them: they
need no UDF nor model archive, and write and read their own format.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import urlencode

import corsa_udf
import openeo
import requests
from openeo.rest import OpenEoApiError
from openeo.rest.datacube import DataCube
from openeo.rest.job import BatchJob
from openeo.rest.multiresult import MultiResult

from corsa.openeo import processes
from corsa.codec.models import DEFAULT_MODEL, MODELS_URL, model_dir, read_card
from corsa.openeo.local import EngineConnection, LocalJob
from corsa.formats.job_files import write_job_file
from corsa.openeo.processes import GRAPHS_DIR

# Where the UDF finds the model on a back end by default: the model's folder in this repository.
REMOTE_MODEL = f"{MODELS_URL}/{DEFAULT_MODEL}"
Job = BatchJob | LocalJob
Connection = openeo.Connection | EngineConnection
NATIVE = {"compress": "corsa_compress", "decompress": "corsa_decompress"}
# A job ending in one of these saves its own results (the services' graphs end in save_result).
SAVING = {"save_result"} | {pid for pid in processes.PROCESSES if pid.endswith("_s2")}
EDITOR = "https://editor.openeo.org/"


class BackendError(RuntimeError):
    """A back end cannot be reached, refuses a request, or a job failed; the message says which."""


class JobError(BackendError):
    """A batch job ended in "error" or was canceled."""


def _api_error(action: str, url: str, e: Exception) -> BackendError:
    if isinstance(e, requests.ConnectionError):
        return BackendError(f"{action}: cannot reach the openEO back end at {url} (is the URL right and the "
                            f"server up?): {e}")
    if isinstance(e, OpenEoApiError):
        hint = {401: "not logged in, or the login expired: log in first",
                403: "this account may not do this"}.get(e.http_status_code)
        if e.code == "CredentialsInvalid":
            hint = "the credentials were refused: check user and password"
        elif hint is None and e.http_status_code >= 500:
            hint = "the back end failed (server error); try again later or ask its operators"
        return BackendError(f"{action}: {url} answered HTTP {e.http_status_code} [{e.code}] {e.message}"
                            + (f" ({hint})" if hint else ""))
    return BackendError(f"{action} at {url}: {e}")


def connect(url: str, user: str | None = None, password: str | None = None) -> openeo.Connection:
    """A connection to the back end at ``url``, with HTTP basic login when ``user`` is given
    (OIDC: call ``authenticate_oidc()`` on the result)."""
    try:
        # one plain request first: the openeo client retries a refused connection for half a minute
        requests.head(url, timeout=30)
        connection = openeo.connect(url)
        if user is not None:
            connection.authenticate_basic(user, password)
    except (requests.ConnectionError, OpenEoApiError) as e:
        raise _api_error("connecting" if user is None else f"logging in as {user!r}", url, e) from e
    return connection


def _model(connection: Connection, model: str | None) -> str:
    """Where the UDF finds the model: on the engine a local folder (a model name resolved under
    models_onnx/), on a back end the path or URL given (default: the unpacked model archive)."""
    if isinstance(connection, EngineConnection):
        return str(model_dir(model)) if model else connection.model
    return model or REMOTE_MODEL


def _card(model: str) -> dict:
    """The card of the model the UDF will read: a local folder, else the shipped model of that name
    (a back end's "models/corsa2.1" or a URL ending in the model's name)."""
    return read_card(model if Path(model).is_dir() else Path(model.rstrip("/")).name)[1]


def _native(connection: Connection, mode: str) -> str:
    """The back end's own process for ``mode``; refused where the back end does not list it."""
    pid = NATIVE[mode]
    if isinstance(connection, EngineConnection) or pid not in {p["id"] for p in connection.list_processes()}:
        raise BackendError(f"{getattr(connection, 'root_url', connection)} offers no process {pid!r}: use native=False")
    return pid


def compressed(connection: Connection, spatial_extent: dict | None, temporal_extent: list | None,
               max_cloud_cover: float = 80, model: str | None = None, namespace: str | None = None,
               collection: str = "SENTINEL2_L2A", quality: int | None = None) -> DataCube:
    """The compressed cube of ``collection`` over the extents, on its 10 m grid (to chain with
    decompress or classify in one job): bands idx0, idx1, nodata (codebook models) or z00, ...,
    nodata at ``quality`` (variable-rate models; None: the model's default). To store it, use
    ``compress``: this cube's layers are replicated over their cells."""
    data = processes.load_s2(connection, spatial_extent, temporal_extent, max_cloud_cover, collection)
    if namespace is None:
        return processes.udf_over_chunks(data, "compress", _model(connection, model), quality=quality)
    return data.process("corsa_openeo_compress", data=data, model=_model(connection, model), quality=quality,
                        namespace=namespace)


def compress(connection: Connection, spatial_extent: dict | None, temporal_extent: list | None,
             max_cloud_cover: float = 80, model: str | None = None, namespace: str | None = None,
             collection: str = "SENTINEL2_L2A", quality: int | None = None,
             native: bool = False) -> MultiResult | DataCube:
    """What a compress job stores: each layer of the model's card on its own grid, one
    save_result each (corsa_<layer>_<date>.tif). ``namespace``: call the published
    corsa_openeo_compress_s2 instead of inlining it (a variable-rate model: the service stores
    every channel whatever the model)."""
    if native:
        data = processes.load_s2(connection, spatial_extent, temporal_extent, max_cloud_cover, collection)
        return data.process(_native(connection, "compress"), data=data)
    model_path = _model(connection, model)
    card = _card(model_path)
    variable = card.get("kind") == "variable-rate"
    if namespace is not None:
        if not variable:
            raise BackendError(f"the published compress service stores a variable-rate model's layers, not those of "
                               f"the codebook model {card['id']}: compress it inline (namespace=None)")
        pid = "corsa_openeo_compress_s2"
        args = {"spatial_extent": spatial_extent, "temporal_extent": temporal_extent,
                "max_cloud_cover": max_cloud_cover, "model": model_path, **({"quality": quality} if variable else {})}
        return connection.datacube_from_process(pid, namespace=namespace, **args)
    return MultiResult(processes.compress_s2_graph(connection, card, spatial_extent, temporal_extent, max_cloud_cover,
                                                   model_path, quality, collection=collection))


def decompress(connection: Connection, compressed: DataCube, model: str | None = None, namespace: str | None = None,
               quality: int | None = None, native: bool = False) -> DataCube:
    """The 10 bands back from a compressed cube (from ``compressed`` or ``results_cube``), at the
    quality it was compressed with."""
    if compressed.connection is not connection:
        raise BackendError("the compressed cube belongs to another connection than the one given")
    if native:
        return compressed.process(_native(connection, "decompress"), data=compressed)
    if namespace is None:
        return processes.udf_over_chunks(compressed, "decompress", _model(connection, model), quality=quality)
    return compressed.process("corsa_openeo_decompress", data=compressed, model=_model(connection, model),
                             quality=quality, namespace=namespace)


def job_options(model_archive: str | None = None, onnxruntime_archive: str | None = processes.ONNXRUNTIME_ARCHIVE,
                executor_memory: str = "2G", executor_memory_overhead: str = "3G",
                python_memory: str = "3G") -> dict:
    """Job options of a geopyspark back end (Terrascope, CDSE) for the ONNX UDF.

    ``model_archive``: URL of the zip written by ``model_archive`` (unpacked into "models": give the
    model as models/<id>; without it the UDF fetches the model's files from this repository);
    ``onnxruntime_archive``: URL of a zip of onnxruntime (default: CDSE's for its Python 3.11 UDF
    runtime, which lacks it), unpacked into "onnx_deps", which the UDF puts on its Python path."""
    archives = [f"{url}#{name}" for url, name in ((model_archive, "models"), (onnxruntime_archive, processes.ONNX_DEPS)) if url]
    return {**processes.JOB_OPTIONS, "executor-memory": executor_memory,
            "executor-memoryOverhead": executor_memory_overhead, "python-memory": python_memory,
            "udf-dependency-archives": archives}


def model_archive(out: Path, model: str = DEFAULT_MODEL) -> Path:
    """The zip to publish for ``job_options(model_archive=...)``: <model>/encoder.onnx, ..."""
    folder, out = model_dir(model), Path(out)
    part = out.with_name(out.name + ".part")
    with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                z.write(f, f"{folder.name}/{f.name}")
    part.replace(out)
    return out


def submit(result: DataCube | MultiResult, title: str, options: dict | None = None) -> Job:
    """Create (not start) a batch job: a cube is saved as GeoTIFF; ``compress``'s layers (a
    MultiResult, or a published service's call) save themselves."""
    if isinstance(result, MultiResult):
        connection = result._connection
        try:
            return result.create_job(title=title, job_options=options, validate=False)
        except (requests.ConnectionError, OpenEoApiError) as e:
            raise _api_error(f"creating job {title!r}", connection.root_url, e) from e
    connection = result.connection
    saves = result.result_node().process_id in SAVING
    try:
        if saves:
            return connection.create_job(result.flat_graph(), title=title, job_options=options, validate=False)
        return result.create_job(out_format="GTiff", title=title, job_options=options, validate=False)
    except (requests.ConnectionError, OpenEoApiError) as e:
        raise _api_error(f"creating job {title!r}", connection.root_url, e) from e


def start(job: Job) -> Job:
    try:
        job.start()
    except (requests.ConnectionError, OpenEoApiError) as e:
        raise _api_error(f"starting job {job.job_id}", job.connection.root_url, e) from e
    return job


def follow(job: Job, poll_seconds: float = 30, timeout_seconds: float | None = None) -> Job:
    """Wait for a started job to finish; JobError with its error log if it ends otherwise."""
    t0 = time.monotonic()
    while True:
        try:
            status = job.status()
        except (requests.ConnectionError, OpenEoApiError) as e:
            raise _api_error(f"polling job {job.job_id}", job.connection.root_url, e) from e
        if status == "finished":
            return job
        if status == "created":
            raise JobError(f"job {job.job_id} was never started (jobs.start)")
        if status in ("error", "canceled"):
            messages = [entry.get("message", "") for entry in job.logs(level="error")]
            raise JobError(f"job {job.job_id} at {job.connection.root_url} ended in {status!r}"
                           + (": " + "; ".join(messages) if messages else " (no error log)"))
        if timeout_seconds is not None and time.monotonic() - t0 > timeout_seconds:
            raise JobError(f"job {job.job_id} is still {status!r} after {timeout_seconds:.0f} s")
        time.sleep(poll_seconds)


def download(job: Job, folder: Path | str) -> list[Path]:
    """Download a finished job's result files into ``folder``: all of them or none, with the
    job's description beside them (job.json: its process graph says which model and quality
    wrote them, for ``corsa pack`` and ``corsa decompress``, which also check each file against the
    sha256 recorded there). A file whose size differs from the back end's ``file:size`` is refused.

    Files arrive in a temporary folder beside ``folder`` and are moved in only when every one
    is complete, so a failed download leaves nothing that looks like a result."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        assets = job.get_results().get_assets()
    except (requests.ConnectionError, OpenEoApiError) as e:
        raise _api_error(f"listing the results of job {job.job_id}", job.connection.root_url, e) from e
    if not assets:
        raise JobError(f"job {job.job_id} finished without result files")
    # An asset key names the file (openEO back ends use file names); only its last part is kept,
    # so a key cannot place a file outside the folder.
    names = [Path(a.key).name for a in assets]
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        for asset, name in zip(assets, names):
            try:
                asset.download(Path(tmp) / name)
            except (requests.RequestException, OpenEoApiError, OSError) as e:
                raise BackendError(f"downloading {asset.key} of job {job.job_id} failed, nothing kept: {e}") from e
            size, arrived = asset.metadata.get("file:size"), (Path(tmp) / name).stat().st_size
            if isinstance(size, int) and arrived != size:
                raise BackendError(f"downloading {asset.key} of job {job.job_id} failed, nothing kept: "
                                   f"{arrived} bytes arrived, the back end lists {size}")
        try:
            description = job.describe()
        except (requests.ConnectionError, OpenEoApiError) as e:
            raise _api_error(f"describing job {job.job_id}", job.connection.root_url, e) from e
        record = write_job_file(Path(tmp), description, [Path(tmp) / name for name in names])
        files = [Path(shutil.move(Path(tmp) / name, folder / name)) for name in names]
        shutil.move(record, folder / record.name)
        return files


def _result_bands(job: BatchJob) -> set[str] | None:
    """The band names a job's result assets list (STAC "bands", or the older "eo:bands", as
    openeo-driver writes them from a back end's asset metadata); None where no asset lists any."""
    assets = job.get_results().get_metadata().get("assets") or {}
    names = {b.get("name") for a in assets.values() for b in (a.get("bands") or a.get("eo:bands") or [])}
    return (names - {None}) or None


def results_cube(job: Job, model: str | None = None) -> DataCube:
    """A finished compress job's results as the input cube of a decompress job: each stored layer
    of the model's card loaded (load_stac on the results) and brought back to the 10 m grid of
    the nodata layer ("near": every value over its cell), merged into one cube."""
    connection = job.connection
    try:
        if isinstance(connection, EngineConnection):
            return connection.load_stac_from_job(job)  # the engine reads the job's folder as one cube
        card = _card(_model(connection, model))
        # a refined model's refinement cells ride in its latent layer (corsa_udf.CELL_BANDS), but not
        # in a job made before the services refined (its files list no cell bands): it decodes unrefined
        listed = _result_bands(job)
        cells = list(corsa_udf.CELL_BANDS) if corsa_udf.refine_grid(card) and (
            listed is None or set(corsa_udf.CELL_BANDS) <= listed) else []
        # and a loop-filtered model's filters (corsa_udf.FILTER_BANDS), where its files hold them
        cells += list(corsa_udf.FILTER_BANDS) if cells and corsa_udf.filter_shape(card) and (
            listed is None or set(corsa_udf.FILTER_BANDS) <= listed) else []
        cubes = [connection.load_stac_from_job(job, bands=layer["bands"] + (cells if layer["name"] == "latent" else []))
                 for layer in card["layers"]]
    except (requests.ConnectionError, OpenEoApiError) as e:
        raise _api_error(f"reading the results of job {job.job_id}", connection.root_url, e) from e
    grid = cubes[-1]  # the nodata layer, on the input's 10 m grid (layers list it last)
    out = grid
    for layer, cube in zip(card["layers"][:-1], cubes[:-1]):
        cube = cube.resample_cube_spatial(grid, method="near") if layer["stride"] > 1 else cube
        out = cube.merge_cubes(out)
    return out


def udps(folder: Path = GRAPHS_DIR) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def publish(connection: openeo.Connection, public: bool = False) -> list[str]:
    """Store our UDPs in the back end's user namespace (save_user_defined_process)."""
    ids = []
    for pid, udp in udps().items():
        try:
            connection.save_user_defined_process(
                pid, udp["process_graph"], parameters=udp["parameters"], public=public, summary=udp["summary"],
                description=udp["description"], returns=udp["returns"], categories=udp.get("categories"))
        except (requests.ConnectionError, OpenEoApiError) as e:
            raise _api_error(f"publishing {pid}", connection.root_url, e) from e
        ids.append(pid)
    return ids


def editor_url(process_id: str, process_url: str, backend: str) -> str:
    """The openEO web editor's wizard link that runs the UDP published at ``process_url``."""
    query = urlencode({"wizard": "UDP", "wizard~process": process_id, "wizard~processUrl": process_url,
                       "server": backend}, safe=":/")
    return f"{EDITOR}?{query}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m corsa.openeo.jobs", description="CORSA on an openEO back end.")
    sub = p.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="store the UDPs in the back end's user namespace")
    run = sub.add_parser("compress", help="run a compress batch job and download the GeoTIFFs")
    for s in (pub, run):
        s.add_argument("--backend", required=True, help="openEO back end URL")
        s.add_argument("--user", help="HTTP basic login (default: OIDC)")
        s.add_argument("--password")
    run.add_argument("--bbox", required=True, help="west,south,east,north (EPSG:4326)")
    run.add_argument("--dates", required=True, help="start/end, end excluded")
    run.add_argument("--max-cloud-cover", type=float, default=80.0)
    run.add_argument("--model-archive", help="URL of the model zip (python -m corsa.openeo.jobs archive)")
    run.add_argument("--namespace", help="call the published UDP: 'user' or the JSON's URL")
    run.add_argument("--model", help=f"where the UDF finds the model on the back end (default {REMOTE_MODEL})")
    run.add_argument("--quality", type=int, help="quality level of a variable-rate model (default: its card's)")
    run.add_argument("-o", "--output", type=Path, required=True)
    run.add_argument("--poll", type=float, default=30.0, help="seconds between status polls")
    arc = sub.add_parser("archive", help="write the model zip for udf-dependency-archives")
    arc.add_argument("-o", "--output", type=Path, required=True)
    arc.add_argument("--model", default=DEFAULT_MODEL, help=f"the model to pack (default {DEFAULT_MODEL})")
    args = p.parse_args(argv)
    try:
        if args.command == "archive":
            print(model_archive(args.output, args.model))
            return 0
        connection = connect(args.backend, args.user, args.password)
        if args.user is None:
            connection.authenticate_oidc()
        if args.command == "publish":
            print("published: " + ", ".join(publish(connection)))
            return 0
        west, south, east, north = map(float, args.bbox.split(","))
        cube = compress(connection, {"west": west, "south": south, "east": east, "north": north},
                        args.dates.split("/"), args.max_cloud_cover, model=args.model, namespace=args.namespace,
                        quality=args.quality)
        job = start(submit(cube, "corsa compress", job_options(args.model_archive)))
        print(f"job {job.job_id} started")
        for path in download(follow(job, args.poll), args.output):
            print(path)
        print(f"corsa pack {args.output} -o <product folder>   # the entropy-coded product, losslessly")
    except BackendError as e:
        print(f"corsa {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
