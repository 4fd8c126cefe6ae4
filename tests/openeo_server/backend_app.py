"""The openEO API server of the client tests: openeo-driver's dummy back end (run in .venv-driver).

Three additions make it stand in for a geopyspark back end in these tests:
- the collection SENTINEL2_L2A with our 10 bands, as Terrascope and CDSE name it;
- a finished job's results are the files a test puts in $CORSA_JOB_RESULTS/<job id>/, listed in
  that folder's assets.json (so a listed file can go missing, as on a broken back end), a name or a
  name with asset metadata of its own (a wrong file:size, as a back end serving a cut file lists);
- PUT /_test/jobs/<job id> {"status": ..., "logs": [...]} sets a job's status and logs, since the
  dummy back end's jobs never finish by themselves; GET there shows the job options it received,
  which the openEO API does not return.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import flask
from openeo_driver.dummy.dummy_backend import DummyBackendImplementation, DummyBatchJobs
from openeo_driver.errors import JobNotFinishedException, JobNotFoundException
from openeo_driver.views import build_app

BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
SENTINEL2_L2A = {
    "id": "SENTINEL2_L2A", "license": "proprietary", "description": "Sentinel-2 L2A (test server)",
    "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [["2015-07-01", None]]}},
    "cube:dimensions": {
        "x": {"type": "spatial", "axis": "x", "step": 10, "reference_system": "AUTO:42001"},
        "y": {"type": "spatial", "axis": "y", "step": 10, "reference_system": "AUTO:42001"},
        "t": {"type": "temporal", "extent": ["2015-07-01", None]},
        "bands": {"type": "bands", "values": BANDS},
    },
    "summaries": {"eo:bands": [{"name": b} for b in BANDS]},
}


class Jobs(DummyBatchJobs):
    def get_result_assets(self, job_id: str, user_id: str) -> dict:
        if self._get_job_info(job_id=job_id, user_id=user_id).status != "finished":
            raise JobNotFinishedException
        folder = Path(os.environ["CORSA_JOB_RESULTS"]) / job_id
        manifest = folder / "assets.json"
        listed = json.loads(manifest.read_text()) if manifest.exists() else []
        listed = listed if isinstance(listed, dict) else {name: {} for name in listed}
        return {name: {"output_dir": str(folder), "href": str(folder / name), "roles": ["data"],
                       "type": "image/tiff; application=geotiff", **metadata} for name, metadata in listed.items()}


def create_app() -> flask.Flask:
    backend = DummyBackendImplementation()
    backend.batch_jobs = Jobs()
    backend.catalog._catalog["SENTINEL2_L2A"] = SENTINEL2_L2A
    app = build_app(backend_implementation=backend)

    def test_job(job_id: str):
        owners = [user for (user, jid) in Jobs._job_registry if jid == job_id]
        if not owners:
            raise JobNotFoundException(job_id)
        if flask.request.method == "GET":
            return flask.jsonify({"job_options": Jobs._job_registry[owners[0], job_id].job_options})
        body = flask.request.get_json()
        Jobs._update_status(job_id=job_id, user_id=owners[0], status=body["status"])
        if "logs" in body:
            Jobs._custom_job_logs[job_id] = body["logs"]
        return "", 204

    app.add_url_rule("/_test/jobs/<job_id>", "corsa_test_job", test_job, methods=["GET", "PUT"])
    return app
