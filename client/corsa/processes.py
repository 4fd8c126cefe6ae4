"""The published processes (UDPs), built with the openeo client.

process_graphs/*.json are generated from this module (`python -m corsa.processes`) and a test
checks that they equal what it builds, so the files never drift from the code.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import corsa_udf
from openeo.api.process import Parameter
from openeo.internal.graph_building import PGNode
from openeo.rest.datacube import DataCube
from openeo.rest.udp import build_process_dict

from .scene import BANDS

GRAPHS_DIR = Path(__file__).resolve().parents[2] / "process_graphs"
UDF_CODE = Path(corsa_udf.__file__).read_text()
# apply_neighborhood chunks: 512 px plus, on each side, the context that one mode's network
# reaches (receptive_radius_px in the shipped model cards: encoder 54, decoder 44, classifier 2),
# rounded up to whole level-1 cells; a test checks them against the cards. Compress needs only the
# encoder's reach and decompress only the decoder's: the sum (the cards' tile.overlap, 100 px)
# would nearly double the pixels each chunk runs through the network. Inside a chunk the UDF
# works in one piece.
CHUNK, UDF_TILE = 512, 1024
OVERLAP = {"compress": 56, "decompress": 44, "classify": 4}
JOB_OPTIONS = {
    "executor-memory": "2G", "executor-memoryOverhead": "3G", "python-memory": "3G",
    "udf-dependency-archives": [],
}

DATA = Parameter.raster_cube("data", description="A Sentinel-2 L2A cube with the bands "
                             + ", ".join(BANDS) + " (DN = reflectance x 10000) on one 10 m grid.")
COMPRESSED = Parameter.raster_cube("data", description="A compressed cube from corsa_compress: bands idx0, "
                                   "idx1 (codebook indices replicated over their 20 m / 40 m cells) and nodata.")
MODEL = Parameter.string("model", default="models/corsa512",
                         description="Folder or base URL of the model files (encoder.onnx, decoder.onnx). On "
                         "geopyspark back ends the job option udf-dependency-archives unpacks them here.")
QUALITY = Parameter("quality", schema={"type": ["integer", "null"], "minimum": 1}, default=None,
                    description="Quality level of a variable-rate model (corsa2: 1 = smallest files, higher is "
                    "better; null: the model card's default_quality). Decompression must use the level the data "
                    "was compressed with. Codebook models (corsa512) have one rate and ignore it.")
SPATIAL = Parameter.spatial_extent("spatial_extent", description="Area to compress (bounding box).")
TEMPORAL = Parameter.temporal_interval("temporal_extent", description="Dates to compress: [start, end).")
CLOUD = Parameter.number("max_cloud_cover", default=80,
                         description="Skip Sentinel-2 products whose cloud cover (%) is above this.")
CUBE = {"schema": {"type": "object", "subtype": "datacube"}}


def _value(v):
    return {"from_parameter": v.name} if isinstance(v, Parameter) else v


def udf_over_chunks(data: DataCube | None, mode: str, model: str | Parameter = MODEL,
                    extra: dict | None = None, quality: int | None | Parameter = QUALITY) -> DataCube:
    """apply_neighborhood with the CORSA UDF over overlapping chunks of ``data`` (None: the
    process parameter "data"). ``model`` and ``quality`` are UDP parameters, or values when a job
    inlines the graph; ``extra`` adds to the UDF context."""
    context = {"mode": mode, "model": _value(model), "tile": UDF_TILE, "overlap": OVERLAP[mode]}
    if mode != "classify":
        context["quality"] = _value(quality)
    udf = PGNode("run_udf", data={"from_parameter": "data"}, udf=UDF_CODE, runtime="Python",
                 context={**context, **(extra or {})})
    node = PGNode("apply_neighborhood",
                  data=data.result_node() if data is not None else {"from_parameter": "data"},
                  process={"process_graph": udf},
                  size=[{"dimension": d, "value": CHUNK, "unit": "px"} for d in ("x", "y")],
                  overlap=[{"dimension": d, "value": OVERLAP[mode], "unit": "px"} for d in ("x", "y")])
    return DataCube(node, connection=data.connection if data is not None else None)


def load_s2(connection, spatial_extent: dict | Parameter, temporal_extent: list | Parameter,
            max_cloud_cover: float | Parameter, collection: str = "SENTINEL2_L2A") -> DataCube:
    """load_collection of the 10 bands, as corsa_compress_s2 does it (parameters or values)."""
    return DataCube.load_collection(collection, connection=connection, spatial_extent=spatial_extent,
                                    temporal_extent=temporal_extent, bands=list(BANDS),
                                    max_cloud_cover=max_cloud_cover, fetch_metadata=False)


def corsa_compress() -> dict:
    return build_process_dict(
        udf_over_chunks(None, "compress"), process_id="corsa_compress",
        summary="Compress a Sentinel-2 L2A cube into CORSA codebook indices",
        description="Encodes the 10 bands with the CORSA encoder (ONNX, in a UDF) into level-0 indices on a "
                    "20 m grid and level-1 indices on a 40 m grid, returned on the input's 10 m grid "
                    "(each index replicated over its cell) as bands idx0, idx1, plus a nodata band.",
        parameters=[DATA, MODEL, QUALITY], returns={**CUBE, "description": "bands idx0, idx1, nodata"},
        categories=["compression", "machine learning"], default_job_options=JOB_OPTIONS)


def corsa_decompress() -> dict:
    return build_process_dict(
        udf_over_chunks(None, "decompress"), process_id="corsa_decompress",
        summary="Decompress CORSA codebook indices into Sentinel-2 L2A reflectances",
        description="Decodes a cube from corsa_compress back to the 10 bands " + ", ".join(BANDS)
                    + " (DN = reflectance x 10000) on the 10 m grid; nodata pixels come back as 0.",
        parameters=[COMPRESSED, MODEL, QUALITY], returns={**CUBE, "description": "the 10 bands"},
        categories=["compression", "machine learning"], default_job_options=JOB_OPTIONS)


def corsa_compress_s2() -> dict:
    compressed = udf_over_chunks(load_s2(None, SPATIAL, TEMPORAL, CLOUD), "compress")
    saved = compressed.save_result(format="GTiff")
    return build_process_dict(
        saved, process_id="corsa_compress_s2",
        summary="Compress Sentinel-2 L2A of an area and date range into compact GeoTIFFs",
        description="Loads SENTINEL2_L2A (10 bands) for the area and dates, skips products above the cloud-cover "
                    "limit, compresses each date with the CORSA encoder and saves the index maps as GeoTIFF.",
        parameters=[SPATIAL, TEMPORAL, CLOUD, MODEL, QUALITY], returns={"schema": {"type": "boolean"}},
        categories=["compression", "sentinel-2"], default_job_options=JOB_OPTIONS)


CLASSIFIER = Parameter.string("classifier", default="models/corsa512-scl",
                              description="Folder or base URL of the classifier (classifier.onnx, made for the "
                              "codec given as model; its model card lists the class values and names).")
CLASSIFY = {"classifier": {"from_parameter": "classifier"}}
CLASSIFY_DESCRIPTION = ("Classes come from the codebook vectors of the indices (the codec's features.onnx) through "
                        "a small ONNX classifier on the 20 m grid, without decoding; band class holds the class "
                        "value (1..n, 0 = nodata), replicated over each 20 m cell on the 10 m grid.")


def corsa_classify() -> dict:
    return build_process_dict(
        udf_over_chunks(None, "classify", extra=CLASSIFY), process_id="corsa_classify",
        summary="Classify a CORSA-compressed cube per pixel without decompressing it",
        description="Maps a cube from corsa_compress (bands idx0, idx1, nodata) to Sen2Cor-like scene classes "
                    "(vegetation, not vegetated, water, snow/ice, cloud, cloud shadow/dark). " + CLASSIFY_DESCRIPTION,
        parameters=[COMPRESSED, MODEL, CLASSIFIER], returns={**CUBE, "description": "band class (uint8)"},
        categories=["classification", "machine learning"], default_job_options=JOB_OPTIONS)


def corsa_classify_s2() -> dict:
    cube = load_s2(None, SPATIAL, TEMPORAL, CLOUD)
    classes = udf_over_chunks(udf_over_chunks(cube, "compress", quality=None), "classify", extra=CLASSIFY)
    return build_process_dict(
        classes.save_result(format="GTiff"), process_id="corsa_classify_s2",
        summary="Scene classes of Sentinel-2 L2A over an area and date range, from CORSA features",
        description="Loads SENTINEL2_L2A (10 bands) for the area and dates, compresses each date with the CORSA "
                    "encoder and classifies the compressed cube. " + CLASSIFY_DESCRIPTION,
        parameters=[SPATIAL, TEMPORAL, CLOUD, MODEL, CLASSIFIER], returns={"schema": {"type": "boolean"}},
        categories=["classification", "sentinel-2"], default_job_options=JOB_OPTIONS)


# Class values above this one (cloud, cloud shadow/dark) mark a pixel unusable. (gt, not gte:
# openeo-processes-dask 2026.9.1's gte gave true everywhere inside a reducer here.)
LAST_USABLE_CLASS = 4


def corsa_decompress_clear() -> dict:
    decoded = udf_over_chunks(None, "decompress", quality=None)  # classifiers read codebook models only
    unusable = udf_over_chunks(None, "classify", extra=CLASSIFY).reduce_dimension(
        dimension="bands", reducer=lambda x: x.array_element(index=0) > LAST_USABLE_CLASS)
    return build_process_dict(
        decoded.mask(unusable, replacement=0), process_id="corsa_decompress_clear",
        summary="Decompress CORSA codebook indices, with cloud and cloud-shadow pixels set to 0",
        description="corsa_decompress, with the pixels that corsa_classify puts in the classes cloud or cloud "
                    "shadow/dark (from the codebook vectors, no decoding needed for the mask) set to 0 like nodata.",
        parameters=[COMPRESSED, MODEL, CLASSIFIER], returns={**CUBE, "description": "the 10 bands, unusable pixels 0"},
        categories=["compression", "cloud detection"], default_job_options=JOB_OPTIONS)


PROCESSES = {"corsa_compress": corsa_compress, "corsa_decompress": corsa_decompress,
             "corsa_compress_s2": corsa_compress_s2, "corsa_classify": corsa_classify,
             "corsa_classify_s2": corsa_classify_s2, "corsa_decompress_clear": corsa_decompress_clear}


def render(process: dict) -> str:
    return json.dumps(process, indent=2, sort_keys=False) + "\n"


def write_all(folder: Path = GRAPHS_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for pid, build in PROCESSES.items():
        path = folder / f"{pid}.json"
        path.write_text(render(build()))
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description="Generate process_graphs/*.json from the client code.")
    p.add_argument("--out", type=Path, default=GRAPHS_DIR)
    for path in write_all(p.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
