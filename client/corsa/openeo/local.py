"""The embedded engine behind the openEO client's connection interface.

``EngineConnection`` answers the calls that ``corsa.openeo.jobs`` and openeo's ``DataCube`` make of an
``openeo.Connection`` (load_collection, create_job, load_stac_from_job), and runs the process
graphs on the embedded engine, so a user switches between this machine and a back end by
changing the line that makes the connection:

    connection = openeo.connect("openeo.dataspace.copernicus.eu").authenticate_oidc()
    connection = EngineConnection({"SENTINEL2_L2A": "scenes/"})
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

from openeo.internal.graph_building import PGNode, as_flat_graph
from openeo.rest.capabilities import OpenEoCapabilities
from openeo.rest.datacube import DataCube

from corsa.codec.models import DEFAULT_MODEL, model_dir
from corsa.openeo.engine import Engine
from corsa.formats.sources import Catalogue
from corsa.formats.stac_source import StacSource

_job_numbers = itertools.count(1)


class LocalAsset:
    """One result file of a local job, downloaded (copied) like a back end's result asset."""

    def __init__(self, path: Path):
        self.path = path
        self.key = path.name  # as openeo.rest.job.ResultAsset.key
        self.metadata = {"href": str(path), "file:size": path.stat().st_size}  # as ResultAsset.metadata

    def download(self, target: Path) -> Path:
        target = Path(target)
        if target.is_dir():
            target = target / self.key
        shutil.copyfile(self.path, target)
        return target


class LocalResults:
    def __init__(self, job: LocalJob):
        self.job = job

    def get_assets(self) -> list[LocalAsset]:
        return [LocalAsset(p) for p in sorted(self.job.results.glob("*"))]  # none if the job wrote none


class LocalJob:
    """A batch job on the embedded engine: it runs when started, and its results are files."""

    def __init__(self, connection: EngineConnection, process_graph: dict, title: str | None):
        self.connection = connection
        self.job_id = f"local-{next(_job_numbers)}"
        self.title = title
        self.process_graph = process_graph
        self.results = connection.workdir / self.job_id
        self._status = "created"
        self._logs: list[dict] = []

    def status(self) -> str:
        return self._status

    def describe(self) -> dict:
        return {"id": self.job_id, "title": self.title, "status": self._status,
                "process": {"process_graph": self.process_graph}}

    def start(self) -> LocalJob:
        """Runs the graph to the end (the engine works synchronously); failures end in "error"."""
        self._status = "running"
        engine = Engine(self.connection.catalogue, output=self.results, scheduler=self.connection.scheduler)
        try:
            engine.run(self.process_graph)
        except Exception as e:  # the job's status and log carry the failure, as on a back end
            self._logs.append({"id": str(len(self._logs) + 1), "level": "error", "message": f"{type(e).__name__}: {e}"})
            self._status = "error"
        else:
            self._status = "finished"
        return self

    def logs(self, level: str | None = None) -> list[dict]:
        return list(self._logs)

    def get_results(self) -> LocalResults:
        return LocalResults(self)


class EngineConnection:
    """``collections`` maps collection ids (SENTINEL2_L2A) to local files, folders or STAC sources;
    jobs write their results under ``workdir`` (a temporary folder by default)."""

    def __init__(self, collections: dict[str, str | Path | StacSource] | None = None, workdir: Path | None = None,
                 scheduler: str | None = None, model: str = DEFAULT_MODEL):
        self.catalogue = Catalogue({k: v if isinstance(v, StacSource) else Path(v)
                                    for k, v in (collections or {}).items()})
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="corsa-jobs-"))
        self.scheduler = scheduler
        self.model = str(model_dir(model))
        self.root_url = "embedded engine"

    def capabilities(self) -> OpenEoCapabilities:
        """No REST endpoints: DataCube asks before fetching collection queryables."""
        return OpenEoCapabilities({"api_version": "1.2.0", "endpoints": []})

    def list_output_formats(self) -> dict:
        return {"GTiff": {"title": "GeoTIFF", "gis_data_types": ["raster"]}}

    def load_collection(self, collection_id: str, spatial_extent: dict | None = None,
                        temporal_extent: list | None = None, bands: list[str] | None = None,
                        max_cloud_cover: float | None = None) -> DataCube:
        return DataCube.load_collection(collection_id, connection=self, spatial_extent=spatial_extent,
                                        temporal_extent=temporal_extent, bands=bands,
                                        max_cloud_cover=max_cloud_cover, fetch_metadata=False)

    def datacube_from_process(self, process_id: str, namespace: str | None = None, **kwargs) -> DataCube:
        """A cube calling a process by id (our UDPs, which the engine knows by id)."""
        return DataCube(graph=PGNode(process_id=process_id, namespace=namespace, arguments=kwargs), connection=self)

    def load_stac_from_job(self, job: LocalJob) -> DataCube:
        """A finished job's results as a cube: the engine reads a product folder as a collection."""
        return DataCube.load_collection(str(job.results), connection=self, fetch_metadata=False)

    def create_job(self, process_graph: dict, *, title: str | None = None, job_options: dict | None = None,
                   **_) -> LocalJob:
        # job options size a back end's executors; the engine runs in this process and needs none
        return LocalJob(self, as_flat_graph(process_graph), title)
