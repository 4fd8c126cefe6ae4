"""The published processes (UDPs), built with the openeo client.

process_graphs/*.json are generated from this module (`python -m corsa.openeo.processes`) and a test
checks that they equal what it builds, so the files never drift from the code.

Ids carry the prefix ``corsa_openeo_``: the openEO API wants a user-defined process id unique
"including all pre-defined processes by the back-end", and VITO's back ends predefine
``corsa_compress`` / ``corsa_decompress`` (native, experimental). Before 2026-11 ours were named
corsa_compress, corsa_decompress, corsa_compress_s2, corsa_classify, corsa_classify_s2 and
corsa_decompress_clear (RENAMED maps them).

A compress service stores what the codec keeps, each layer of the model card's ``layers`` on its
own grid, with standard processes only: filter_bands, resample_spatial ("near", to the layer's
stride) and one save_result per layer, so a back end's generic GeoTIFF writer makes compact files
(DESIGN.md); `corsa pack` then entropy-codes them into the product, losslessly.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import corsa_udf
from openeo.api.process import Parameter
from openeo.internal.graph_building import PGNode
from openeo.rest.datacube import THIS, DataCube
from openeo.rest.udp import build_process_dict

from corsa.codec.models import DEFAULT_MODEL, MODELS_URL, read_card
from corsa.core.scene import BANDS
from corsa.openeo.windows import CHUNK, OVERLAP, UDF_TILE, compress_reach

GRAPHS_DIR = Path(__file__).resolve().parents[3] / "process_graphs"
UDF_CODE = Path(corsa_udf.__file__).read_text()
# onnxruntime for the UDF on CDSE / Terrascope, whose Python 3.11 UDF runtime lacks it: the archive
# CDSE documents for ONNX models in UDFs, unpacked into "onnx_deps", which the UDF puts on its path.
ONNX_DEPS = "onnx_deps"
ONNXRUNTIME_ARCHIVE = "https://s3.waw3-1.cloudferro.com/swift/v1/project_dependencies/onnx_deps_python311.zip"
JOB_OPTIONS = {
    "executor-memory": "2G", "executor-memoryOverhead": "3G", "python-memory": "3G",
    "udf-dependency-archives": [f"{ONNXRUNTIME_ARCHIVE}#{ONNX_DEPS}"],
}

DATA = Parameter.raster_cube("data", description="A Sentinel-2 L2A cube with the bands "
                             + ", ".join(BANDS) + " (DN = reflectance x 10000) on one 10 m grid.")
COMPRESSED = Parameter.raster_cube("data", description="A compressed cube from corsa_openeo_compress on the 10 m "
                                   "grid: bands idx0, idx1 (codebook indices replicated over their 20 m / 40 m cells) "
                                   "and nodata, or z00, ..., nodata (a variable-rate model's latent; a refined model's "
                                   "refine band before nodata, a loop-filtered model's filter bands too).")
PREFIX = "corsa_openeo_"
RENAMED = {"corsa_compress": "corsa_openeo_compress", "corsa_decompress": "corsa_openeo_decompress",
           "corsa_compress_s2": "corsa_openeo_compress_s2", "corsa_classify": "corsa_openeo_classify",
           "corsa_classify_s2": "corsa_openeo_classify_s2", "corsa_decompress_clear": "corsa_openeo_decompress_clear"}


def _model_parameter(model: str) -> Parameter:
    return Parameter.string("model", default=f"{MODELS_URL}/{model}",
                            description="Base URL or folder of the model files (model_card.json, encoder.onnx, decoder.onnx, "
                            "...); default: the model's folder in the corsa-openeo repository, fetched by the UDF. A "
                            "model archive given in the job option udf-dependency-archives (URL#models) is read as "
                            "models/<model id>.")


MODEL = _model_parameter(DEFAULT_MODEL)
QUALITY = Parameter("quality", schema={"type": ["integer", "null"], "minimum": 1}, default=None,
                    description="Quality level of a variable-rate model (corsa2: 1 = smallest files, higher is "
                    "better; null: the model card's default_quality). Decompression must use the level the data "
                    "was compressed with. Codebook models (corsa512) have one rate and ignore it.")
FILL = Parameter.boolean("fill", default=False,
                         description="Fill each date's nodata pixels (clouds masked before compression, missing data) "
                         "from the other dates of the cube instead of leaving them 0: per 64 px tile, each of the 4 "
                         "dates nearest in time brought to the date's light by a per-band gain and offset fitted on "
                         "the pixels both show around the tile; the best-fitting ones averaged. Needs the cube's "
                         "dimension t whole (not in apply_neighborhood's size).")
DATES = Parameter("dates", schema={"type": ["array", "null"], "items": {"type": "string", "format": "date"}},
                  default=None, description="The dates (YYYY-MM-DD) to return: stored dates as stored, dates between "
                  "the first and last stored date rendered from the stored dates around them by the model's time head "
                  "(between.onnx), pixel by pixel, or linear interpolation in time where the stored dates show the "
                  "head does worse at that place; null: every stored date. Needs the cube's dimension t whole.")
SPATIAL = Parameter.spatial_extent("spatial_extent", description="Area to compress (bounding box).")
TEMPORAL = Parameter.temporal_interval("temporal_extent", description="Dates to compress: [start, end).")
CLOUD = Parameter.number("max_cloud_cover", default=80,
                         description="Skip Sentinel-2 products whose cloud cover (%) is above this.")
CUBE = {"schema": {"type": "object", "subtype": "datacube"}}


def _value(v):
    return {"from_parameter": v.name} if isinstance(v, Parameter) else v


def udf_over_chunks(data: DataCube | None, mode: str, model: str | Parameter = MODEL,
                    extra: dict | None = None, quality: int | None | Parameter = QUALITY,
                    overlap: int | None = None) -> DataCube:
    """apply_neighborhood with the CORSA UDF over overlapping chunks of ``data`` (None: the
    process parameter "data"). ``model`` and ``quality`` are UDP parameters, or values when a job
    inlines the graph; ``extra`` adds to the UDF context; ``overlap`` (px) defaults to what the
    farthest-reaching shipped model needs in this mode."""
    overlap = OVERLAP[mode] if overlap is None else overlap
    context = {"mode": mode, "model": _value(model), "tile": UDF_TILE, "overlap": overlap}
    if mode in ("compress", "decompress", "classify"):
        context["quality"] = _value(quality)
    udf = PGNode("run_udf", data={"from_parameter": "data"}, udf=UDF_CODE, runtime="Python",
                 context={**context, **(extra or {})})
    node = PGNode("apply_neighborhood",
                  data=data.result_node() if data is not None else {"from_parameter": "data"},
                  process={"process_graph": udf},
                  size=[{"dimension": d, "value": CHUNK, "unit": "px"} for d in ("x", "y")],
                  overlap=[{"dimension": d, "value": overlap, "unit": "px"} for d in ("x", "y")])
    return DataCube(node, connection=data.connection if data is not None else None)


def load_s2(connection, spatial_extent: dict | Parameter, temporal_extent: list | Parameter,
            max_cloud_cover: float | Parameter, collection: str = "SENTINEL2_L2A") -> DataCube:
    """load_collection of the 10 bands, as corsa_openeo_compress_s2 does it (parameters or values)."""
    return DataCube.load_collection(collection, connection=connection, spatial_extent=spatial_extent,
                                    temporal_extent=temporal_extent, bands=list(BANDS),
                                    max_cloud_cover=max_cloud_cover, fetch_metadata=False)


LATENT_LAYER = "latent"


def layer_prefix(layer: dict) -> str:
    """The filename_prefix a layer's save_result gives its files: corsa_<layer>_<date>.tif."""
    return f"corsa_{layer['name']}"


def store_layers(compressed: DataCube, card: dict, pixel_size: float | tuple[float, float] = 10.0) -> list[DataCube]:
    """One save_result per stored layer of ``card``, each on its own grid, resampled "near" to
    stride x ``pixel_size`` (the input's pixel size in CRS units, or its (x, y) sizes; 10 for
    Sentinel-2 on its UTM grid) from the upper-left corner, where every value is constant over its
    cell, so the layer is kept exactly. A variable-rate model's latent layer is the whole
    compressed cube (every channel, then its nodata band sampled at 40 m): no band list in the
    graph, so a job with a model of more channels than ``card``'s keeps all of them; the other
    layers are the bands the card names (nodata, a codebook model's indices). A refined model's
    refinement cells ride in the latent layer as its band "refine" (``corsa_udf.pack_cells``)."""
    saved = []
    for layer in card["layers"]:
        whole = card.get("kind") == "variable-rate" and layer["name"] == LATENT_LAYER
        cube = compressed if whole else compressed.filter_bands(layer["bands"])
        if layer["stride"] > 1:
            # align keeps its default, "upper-left" (openeo-processes-dask's copy of the spec lacks it)
            s = layer["stride"]
            resolution = [s * pixel_size[0], s * pixel_size[1]] if isinstance(pixel_size, tuple) else s * pixel_size
            cube = cube.process("resample_spatial", data=THIS, resolution=resolution, method="near")
        saved.append(cube.save_result(format="GTiff", options={"filename_prefix": layer_prefix(layer)}))
    return saved


def _layers_text(card: dict) -> str:
    return "; ".join(f"{layer_prefix(l)}_<date>.tif: {', '.join(l['bands'][:2])}{', ... (every channel), nodata' if len(l['bands']) > 2 else ''} "
                     f"at {l['resolution_m']} m" for l in card["layers"])


def compress_s2_graph(connection, card: dict, spatial_extent: dict | Parameter = SPATIAL,
                      temporal_extent: list | Parameter = TEMPORAL, max_cloud_cover: float | Parameter = CLOUD,
                      model: str | Parameter = MODEL, quality: int | None | Parameter = QUALITY,
                      pixel_size: float | tuple[float, float] = 10.0, collection: str = "SENTINEL2_L2A") -> list[DataCube]:
    """load_collection, compress (chunks overlapping by the card's reach, ``compress_reach``), and the
    stored layers of ``card`` saved on their own grids."""
    cube = load_s2(connection, spatial_extent, temporal_extent, max_cloud_cover, collection)
    compressed = udf_over_chunks(cube, "compress", model, quality=quality, overlap=compress_reach(card))
    return store_layers(compressed, card, pixel_size)


def corsa_openeo_compress() -> dict:
    return build_process_dict(
        udf_over_chunks(None, "compress"), process_id="corsa_openeo_compress",
        summary="Compress a Sentinel-2 L2A cube into CORSA codes (indices or integer latents)",
        description="Encodes the 10 bands with the CORSA encoder (ONNX, in a UDF). Codebook models (corsa512): level-0 "
                    "indices on a 20 m grid and level-1 indices on a 40 m grid, returned on the input's 10 m grid "
                    "(each index replicated over its cell) as bands idx0, idx1, plus a nodata band. Variable-rate "
                    "models (corsa2): the integer latent at the quality level, bands z00, ..., replicated over its 40 m "
                    "cells, plus nodata; a refined model (corsa3.9) adds, before nodata, the band refine: each band's "
                    "mean decoding error over 160 m cells in the level's steps, the 10 values of a cell in its 4 x 4 "
                    "cells of 40 m; a model with a loop filter (corsa3.11) adds after it the bands filter_B02, ...: "
                    "each 512 px block's filter, 35 integers a band (corsa3.12: 71) on the block's first 40 m cells, 6 a row "
                    "(all 0: none). To store it "
                    "compactly, save each layer on its own grid as "
                    "corsa_openeo_compress_s2 does.",
        parameters=[DATA, MODEL, QUALITY], returns={**CUBE, "description": "bands idx0, idx1, nodata (or z00, ..., "
                                                                 "(refine,) nodata)"},
        categories=["compression", "machine learning"], default_job_options=JOB_OPTIONS)


def corsa_openeo_decompress() -> dict:
    return build_process_dict(
        udf_over_chunks(None, "decompress", extra={"fill": {"from_parameter": "fill"}, "dates": {"from_parameter": "dates"}}),
        process_id="corsa_openeo_decompress",
        summary="Decompress CORSA codes into Sentinel-2 L2A reflectances",
        description="Decodes a cube from corsa_openeo_compress (its stored layers brought back to the 10 m grid with "
                    "resample_spatial \"near\") to the 10 bands " + ", ".join(BANDS)
                    + " (DN = reflectance x 10000, uint16) on the 10 m grid; nodata pixels come back as 0, or "
                    "filled from the other dates (fill); at the stored dates or at any dates between them (dates).",
        parameters=[COMPRESSED, MODEL, QUALITY, FILL, DATES], returns={**CUBE, "description": "the 10 bands"},
        categories=["compression", "machine learning"], default_job_options=JOB_OPTIONS)


def compress_s2_process(card: dict, pixel_size: float | tuple[float, float] = 10.0,
                        process_id: str | None = None) -> dict:
    """The compress service for models with ``card``'s stored layers: load_collection, compress,
    and each layer saved on its own grid (``pixel_size``: the input's, in CRS units)."""
    variable = card.get("kind") == "variable-rate"
    model = _model_parameter(card["id"])
    saved = compress_s2_graph(None, card, model=model, quality=QUALITY if variable else None, pixel_size=pixel_size)
    what = f"corsa2-like variable-rate model {card['id']}, by quality level" if variable else \
        f"codebook model {card['id']}, one rate"
    return build_process_dict(
        saved, process_id=process_id or f"{PREFIX}compress_s2",
        summary=f"Compress Sentinel-2 L2A of an area and date range into compact GeoTIFFs ({what})",
        description="Loads SENTINEL2_L2A (10 bands) for the area and dates, skips products above the cloud-cover "
                    f"limit, compresses each date with the CORSA model {card['id']} (or another with the same stored "
                    "layers) and saves what it stores, each layer on its own grid, as GeoTIFF: "
                    + _layers_text(card) + ". `corsa pack` turns a download of these files into the entropy-coded "
                    "product; `corsa decompress` reads either.",
        parameters=[SPATIAL, TEMPORAL, CLOUD, model] + ([QUALITY] if variable else []),
        returns={"schema": {"type": "boolean"}}, categories=["compression", "sentinel-2"],
        default_job_options=JOB_OPTIONS)


RESOLUTION = Parameter.number("resolution", description="The output pixel size, in the cube's CRS units (for "
                              "10 m data, 5: 5 m pixels, twice as many per side), at most the stored one: the "
                              "decoded cube is brought to it with resample_spatial \"near\" and each pixel "
                              "rendered by the model's space head (render.onnx) at its centre and size. Exact "
                              "for up to 8 output pixels per stored one and side (the chunks' overlap). For "
                              "larger pixels, resample_spatial the decoded cube with method \"average\"; onto "
                              "another grid, resample_cube_spatial the rendered cube at that grid's pixel size.")


def corsa_openeo_render() -> dict:
    decoded = udf_over_chunks(None, "decompress", extra={
        "fill": {"from_parameter": "fill"}, "dates": {"from_parameter": "dates"}, "positions": True})
    finer = decoded.process("resample_spatial", data=THIS, resolution=RESOLUTION, method="near")
    return build_process_dict(
        udf_over_chunks(finer, "render"), process_id="corsa_openeo_render",
        summary="Decompress CORSA codes at a smaller pixel size (any scale) and at any dates",
        description="corsa_openeo_decompress of a variable-rate model's cube (its time head for dates between "
                    "stored ones), rendered at the pixel size resolution by the model's space head, LIIF-style: "
                    "each output pixel from the decode's features around its centre, its offset there and its "
                    "size; the 10 bands " + ", ".join(BANDS) + " (DN, uint16), nodata 0. `corsa decompress "
                    "--scale` does the same on a product.",
        parameters=[COMPRESSED, MODEL, QUALITY, FILL, DATES, RESOLUTION],
        returns={**CUBE, "description": "the 10 bands at the pixel size resolution"},
        categories=["compression", "machine learning"], default_job_options=JOB_OPTIONS)


def corsa_openeo_compress_s2() -> dict:
    return compress_s2_process(read_card(DEFAULT_MODEL)[1], process_id="corsa_openeo_compress_s2")


def corsa2_openeo_compress_s2() -> dict:
    """The variable-rate compress service under the id it was published with first (corsa2.1's
    time); today the same service as corsa_openeo_compress_s2."""
    return compress_s2_process(read_card(DEFAULT_MODEL)[1], process_id="corsa2_openeo_compress_s2")


CLASSIFIER = Parameter("classifier", schema={"type": ["string", "null"]}, default=None,
                       description="null: the model's own scene-class head (a variable-rate model's scl.onnx, listed "
                       "in its card). A codebook model (corsa512) needs the base URL or folder of its classifier "
                       f"(classifier.onnx; {MODELS_URL}/corsa512-scl).")
CLASS_SET = Parameter("classes", schema={"type": "string", "enum": ["scl", "landcover"]}, default="scl",
                      description="scl: Sen2Cor-like scene classes (vegetation, not vegetated, water, snow/ice, cloud, "
                      "cloud shadow/dark); landcover: the 9 land-cover classes of Impact Observatory's maps (water, "
                      "trees, flooded vegetation, crops, built area, bare ground, snow/ice, clouds, rangeland), from "
                      "a variable-rate model's land-cover head.")
CLASSIFY = {"classifier": {"from_parameter": "classifier"}}
CLASSIFY_SET = {**CLASSIFY, "classes": {"from_parameter": "classes"}}
CLASSIFY_DESCRIPTION = ("Classes come from the codes without decoding: a variable-rate model's head reads the "
                        "dequantised latent (40 m) and gives classes on the 20 m grid; a codebook model's classifier "
                        "reads the codebook vectors of its indices. Band class holds the class value (1..n, "
                        "0 = nodata), replicated over each 20 m cell on the 10 m grid.")


def corsa_openeo_classify() -> dict:
    return build_process_dict(
        udf_over_chunks(None, "classify", extra=CLASSIFY_SET), process_id="corsa_openeo_classify",
        summary="Classify a CORSA-compressed cube per pixel without decompressing it",
        description="Maps a cube from corsa_openeo_compress (z00, ..., nodata or idx0, idx1, nodata) to Sen2Cor-like "
                    "scene classes (vegetation, not vegetated, water, snow/ice, cloud, cloud shadow/dark) or to "
                    "land cover (parameter classes). " + CLASSIFY_DESCRIPTION,
        parameters=[COMPRESSED, MODEL, QUALITY, CLASSIFIER, CLASS_SET], returns={**CUBE, "description": "band class (uint8)"},
        categories=["classification", "machine learning"], default_job_options=JOB_OPTIONS)


def corsa_openeo_classify_s2() -> dict:
    cube = load_s2(None, SPATIAL, TEMPORAL, CLOUD)
    classes = udf_over_chunks(udf_over_chunks(cube, "compress", quality=None), "classify", extra=CLASSIFY_SET,
                              quality=None)
    return build_process_dict(
        classes.save_result(format="GTiff"), process_id="corsa_openeo_classify_s2",
        summary="Scene classes or land cover of Sentinel-2 L2A over an area and date range, from CORSA features",
        description="Loads SENTINEL2_L2A (10 bands) for the area and dates, compresses each date with the CORSA "
                    "encoder and classifies the compressed cube (scene classes or land cover, parameter classes). "
                    + CLASSIFY_DESCRIPTION,
        parameters=[SPATIAL, TEMPORAL, CLOUD, MODEL, CLASSIFIER, CLASS_SET], returns={"schema": {"type": "boolean"}},
        categories=["classification", "sentinel-2"], default_job_options=JOB_OPTIONS)


def corsa_openeo_decompress_clear() -> dict:
    decoded = udf_over_chunks(None, "decompress")
    unusable = udf_over_chunks(None, "classify", extra=CLASSIFY).reduce_dimension(
        # gt, not gte: openeo-processes-dask 2026.9.1's gte gave true everywhere inside a reducer here
        dimension="bands", reducer=lambda x: x.array_element(index=0) > corsa_udf.LAST_USABLE_CLASS)
    return build_process_dict(
        decoded.mask(unusable, replacement=0), process_id="corsa_openeo_decompress_clear",
        summary="Decompress CORSA codes, with cloud and cloud-shadow pixels set to 0",
        description="corsa_openeo_decompress, with the pixels that corsa_openeo_classify puts in the classes cloud or "
                    "cloud shadow/dark (from the codes, no decoding needed for the mask) set to 0 like nodata.",
        parameters=[COMPRESSED, MODEL, QUALITY, CLASSIFIER], returns={**CUBE, "description": "the 10 bands, unusable pixels 0"},
        categories=["compression", "cloud detection"], default_job_options=JOB_OPTIONS)


PROCESSES = {f.__name__: f for f in (corsa_openeo_compress, corsa_openeo_decompress, corsa_openeo_render,
                                     corsa_openeo_compress_s2,
                                     corsa2_openeo_compress_s2, corsa_openeo_classify, corsa_openeo_classify_s2,
                                     corsa_openeo_decompress_clear)}


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
