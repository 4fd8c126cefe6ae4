"""The ``corsa`` command line: the published process graphs, run on the embedded engine. Variable-rate models (corsa2 onward) compress and decompress
through ``corsa.blocks.blockwise`` instead: the UDF's functions on the services' own chunks, without
the engine around them (the same bytes; --engine runs the graphs), on two local threads or, with
--scheduler, on the workers of a dask cluster (``corsa.core.cluster``).

    corsa compress scene.tif -o product/            # a 10-band GeoTIFF or an openEO NetCDF cube
    corsa compress scene.tif -o product/ --model corsa2 --quality 6   # a variable-rate model at a quality level
    corsa compress --stac https://earth-search.aws.element84.com/v1 --bbox ... --dates ... -o product/
    corsa decompress product/ -o decoded.tif        # --clear: cloud and cloud-shadow pixels set to 0
    corsa pack job_results/ -o product/             # a compress job's downloaded GeoTIFFs -> the product
    corsa decompress job_results/ -o decoded/       # or decode those files directly
    corsa classify product/ -o classes.tif          # scene classes on the 20 m grid, without decoding
    corsa reduce product/ --quality 3 -o smaller/   # a lower quality without the source
    corsa info product/
    corsa models [--json]                           # the shipped models, their quality levels and test figures
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

# The CLI runs its blocks on threads of its own: BLAS threads beside them only spin (a block's loop filter fit
# took 0.36 s with OpenBLAS's threads, 0.07 s without). Before numpy is loaded; a value the user set wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import corsa_udf  # noqa: E402
import numpy as np  # noqa: E402
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from corsa.blocks import blockwise
from corsa.formats import stac_catalog
from corsa.core import cluster
from corsa.formats import job_files
from corsa.formats import codebook_product, product
from corsa.formats import stream_format
from corsa.core import progress
from corsa.blocks import render
from corsa.formats import results
from corsa.formats import series
from corsa.blocks.classmap import CLASS_SETS, scene_classes, write_classes
from corsa.codec.codebook import CodebookCodec, open_codec
from corsa.codec.models import DEFAULT_MODEL, ModelError, VariableRateCodec, read_card, shipped_cards
from corsa.core.files import WriteError, exchange, product_lock
from corsa.core.metrics import compression_factor
from corsa.core.scene import BANDS

COLLECTION = "SENTINEL2_L2A"
OVERVIEW = """Compress Sentinel-2 L2A scenes (10 bands) with a learned codec, and decode, classify or reduce the
compressed products, on this machine or a dask cluster; the same services run on openEO back ends.

  corsa compress scene.tif -o product/             a GeoTIFF, a folder of dated GeoTIFFs (a time series),
                                                   an openEO NetCDF cube, or --stac URL
  corsa compress scene.tif -o product/ --quality 6 higher is better and larger (corsa models lists the levels)
  corsa decompress product/ -o decoded.tif         10-band GeoTIFF on the input's grid (--date, --fill, --clear)
  corsa classify product/ -o classes.tif           scene classes (--classes landcover: land cover), no decoding
  corsa reduce product/ --quality 3 -o smaller/    a lower quality without the source scene
  corsa pack job_results/ -o product/              a back end's compress job download -> a product
  corsa info product/                              dates, grids, quality, compression factor
  corsa models                                     the shipped models, their quality levels and figures
  corsa serve                                      a local web page to run a compress job from a form

Add --scheduler tcp://HOST:PORT to run on a dask cluster; corsa COMMAND --help for each command's options.
"""
QUALITY_HELP = {
    "compress": "quality level of a variable-rate model, higher is better and larger (default: the model's default, "
                "with --append the product's last date's; corsa models lists the levels)",
    "reduce": "the lower quality level to bring the product to",
    "pack": "the quality level the compress job used (default: from its job.json)",
    "decompress": "for a compress job's downloaded files only: the quality level the job used (default: from its "
                  "job.json); a product records its own",
}


def _bbox(text: str) -> dict:
    """A --bbox: west,south,east,north[,EPSG code], west < east and south < north."""
    parts = text.split(",")
    try:
        west, south, east, north = (float(v) for v in parts[:4]) if len(parts) in (4, 5) else ()
        epsg = int(parts[4]) if len(parts) == 5 else 4326
    except ValueError:
        west = None
    if west is None or not (west < east and south < north) or epsg <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not west,south,east,north[,EPSG code]: four numbers with "
                                         "west < east and south < north, then an optional EPSG code (default 4326)")
    return {"west": west, "south": south, "east": east, "north": north, "crs": f"EPSG:{epsg}"}


def _dates(text: str) -> list:
    """A --dates range: start/end (YYYY-MM-DD, end excluded; either may be left out), start before end."""
    start, slash, end = text.partition("/")
    try:
        days = [_day(v) if v else None for v in (start, end)]
    except argparse.ArgumentTypeError:
        days = []
    if not slash or not days or (days[0] and days[1] and days[0] >= days[1]):
        raise argparse.ArgumentTypeError(f"{text!r} is not a date range START/END (YYYY-MM-DD, END excluded and "
                                         "after START; either may be left out, e.g. 2021-01-01/)")
    return days


def _positive(text: str) -> int:
    """A count of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _pixel_size(catalogue, bbox: dict | None, dates: list | None, cloud: float) -> tuple[float, float]:
    """The input's (x, y) pixel size in CRS units: the stored layers' grids are whole multiples of it."""
    tr = catalogue.load(COLLECTION, bbox, dates, None, cloud).rio.transform()
    return float(abs(tr.a)), float(abs(tr.e))


def compress(args: argparse.Namespace) -> str:
    """The compress service run on the embedded engine (its generic save_result writes each
    stored layer as GeoTIFF, as a back end does), then packed into the product."""
    held = stream_format.dates_in(Path(args.output)) if args.append and args.model is None else []
    # Dates added to a product continue it: its model and the level of its last date unless told otherwise (the
    # default model's default level would fail on another model's product, or leave one that mixes levels).
    codec = product.stream_codec(Path(args.output), held[-1]) if held else open_codec(args.model or DEFAULT_MODEL)
    if isinstance(codec, VariableRateCodec):
        codec.prefetch()
    # Imported here: rioxarray takes about half a second, which decompress does not need (the model's
    # tables load meanwhile).
    from corsa.formats.sources import Catalogue, SourceError
    from corsa.formats.stac_source import StacSource

    if isinstance(codec, VariableRateCodec) and args.quality is not None and args.quality not in codec.qualities:
        # the shipped model with the best measured gain at that level, if one has it
        gains = {c["id"]: (c.get("gain_over_classical_db") or {}).get("by_quality", {}).get(str(args.quality), -np.inf)
                 for c in shipped_cards() if args.quality in [q["quality"] for q in c.get("qualities", [])]}
        raise ValueError(f"model {codec.model_id} has quality levels {codec.qualities[0]}-{codec.qualities[-1]}, not "
                         f"{args.quality}" + (f" (level {args.quality}: --model {max(gains, key=gains.get)})" if gains else ""))
    if held and args.quality is None and isinstance(codec, VariableRateCodec):
        last = stream_format.file_name(held[-1])
        args.quality = stream_format.level_of(stream_format.read_header((Path(args.output) / last).read_bytes(), last))
    quality = codec.quality_level(args.quality)
    if isinstance(codec, VariableRateCodec):
        if args.kernels != codec.kernels:
            if args.engine:
                raise ValueError(f"--kernels {args.kernels} encodes on the block-by-block path, not with --engine")
            codec = VariableRateCodec(codec.path, codec.threads, args.kernels)
        codec.encoder_for(quality)  # checks the encoder against its card and loads it now, not deep inside the engine
    else:
        codec.encoder
    if args.stac or str(args.input).endswith(".json"):
        source = StacSource(str(args.stac or args.input), args.collection)
    elif args.input is None:
        raise SourceError("give an INPUT file or folder, or --stac URL")
    else:
        source = args.input
    catalogue = Catalogue({COLLECTION: source})
    bbox, dates = args.bbox, args.dates
    if isinstance(codec, VariableRateCodec) and not args.engine:
        cube = catalogue.load(COLLECTION, bbox, dates, list(BANDS), args.max_cloud_cover)
        with _cluster(args) as run:
            return _product_written(blockwise.compress(cube, codec, quality, Path(args.output), append=args.append,
                                                       key_every=args.key_every, run=run))
    if args.append:
        raise ValueError("--append codes the new dates with the product's history: it needs a variable-rate model "
                         "and the block-by-block path (not --engine)")
    if isinstance(codec, VariableRateCodec) and codec.layer(quality) is not None:
        raise ValueError(f"level {quality} of {codec.model_id} is its level {codec.base(quality)} and a residual layer, "
                         "which the block-by-block path codes: compress without --engine (the services store the base)")
    from corsa.openeo import processes   # the openEO client: only the engine's path builds a process graph

    udp = processes.compress_s2_process(codec.card, _pixel_size(catalogue, bbox, dates, args.max_cloud_cover))
    out = Path(args.output)
    # The job's files go to a scratch folder outside the product: a killed run leaves nothing in it.
    with tempfile.TemporaryDirectory(prefix="corsa-job-") as tmp:
        engine = _engine()(catalogue, output=Path(tmp), scheduler=args.scheduler)
        engine.run(udp, spatial_extent=bbox, temporal_extent=dates, max_cloud_cover=args.max_cloud_cover,
                   model=str(codec.path), quality=quality)
        written = job_files.pack_dates(Path(tmp), job_files.job_dates(Path(tmp)), codec, quality, out)
    return _product_written(written)


def _cluster(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The dask cluster of --scheduler for the block-by-block path (None: this machine's threads)."""
    return cluster.runner(args.scheduler) if getattr(args, "scheduler", None) else contextlib.nullcontext()


def _engine():
    """The engine class, imported on first use: openeo-processes-dask takes a second or two to
    import, which the block-by-block path does not need."""
    from corsa.openeo.engine import Engine
    return Engine


def _catalogue():
    """An empty catalogue for the engine (imported on first use, as the engine is)."""
    from corsa.formats.sources import Catalogue
    return Catalogue()


def _handled_errors() -> tuple[type, ...]:
    """Errors reported as one line; the engine's only when it was imported (else it raised none)."""
    engine = sys.modules.get("corsa.openeo.engine")
    return (ModelError, product.ProductError, ValueError, WriteError) + ((engine.EngineError,) if engine else ())


def pack_files(args: argparse.Namespace) -> str:
    """A compress job's downloaded files -> the entropy-coded product (the same integers)."""
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError("give another folder as -o than the job's files")
    return _product_written(job_files.pack(args.input, args.output, args.model, args.quality))


def _stream_product(folder: Path, model: str | None) -> tuple[VariableRateCodec, int] | None:
    """The model and quality of a stream-format product (None for a format 1 or 2 product). Its dates are
    checked now, before the engine runs; one decompression takes one quality level."""
    dates = stream_format.dates_in(folder)
    if not dates:
        return None
    heads = [stream_format.read_header((folder / stream_format.file_name(d)).read_bytes(), stream_format.file_name(d)) for d in dates]
    qualities = sorted({stream_format.level_of(h) for h in heads})
    if len(qualities) > 1:
        raise product.ProductError(f"{folder} mixes quality levels {qualities}: decompress its dates separately "
                                   "(or bring them to one level with corsa reduce)")
    codec = product.stream_codec(folder, dates[0], model)
    codec.level(qualities[0])
    return codec, qualities[0]


def _opened(folder: Path, model: str | None, network: str = "decoder") -> tuple[CodebookCodec | VariableRateCodec, int | None, list[str]]:
    """A product's model, quality level and dates, checked before anything runs: a variable-rate
    product (formats 3-13), else an older codebook one (formats 1-2, ``codebook_product.opened``)."""
    stream = _stream_product(folder, model)
    if stream:
        return (*stream, stream_format.dates_in(folder))
    codec, dates = codebook_product.opened(folder, model, network)
    return codec, None, dates


def _cleared_shares(written: list[Path]) -> str:
    """How much of each file --clear left as 0 (cloud, cloud shadow or nodata): a head that calls a hazy scene cloud
    leaves little, which the user should hear of."""
    shares = []
    for path in written:
        with rasterio.open(path) as f:
            shares.append(f"{100 * float((f.read(1) == 0).mean()):.1f}%")
    return f"; pixels 0 (cloud, cloud shadow or nodata): {', '.join(shares)}"


def _decoded_written(written: list[Path], dates: list[str | None], source: Path) -> str:
    """A STAC Item beside each decoded file (``corsa.formats.stac_catalog``), and one line on them."""
    for path, date in zip(written, dates):
        stac_catalog.write_decoded(path, date, source)
    return f"{len(written)} file(s) written: {', '.join(str(p) for p in written)}"


def decompress(args: argparse.Namespace) -> str:
    if stac_catalog.is_ours(args.input):      # a product found through its STAC Collection or Item
        args.input, dates = stac_catalog.product_of(args.input)
        if len(dates) == 1 and not args.date:
            args.date = dates[0] if dates[0] != stac_catalog.UNDATED else None
    from_job = bool(job_files.job_dates(args.input)) and not (codebook_product.dates_in(args.input) or stream_format.dates_in(args.input))
    if not from_job:
        stac_catalog.check_complete(args.input)
    if from_job:
        codec, quality = job_files.resolve(args.input, args.model, args.quality)
        stored = job_files.job_dates(args.input)
    elif args.quality is not None:
        raise ValueError(f"{args.input} is a product: it records its quality level (--quality is for job files)")
    else:
        codec, quality, stored = _opened(args.input, args.model)
    if isinstance(codec, VariableRateCodec) and args.kernels != codec.kernels:
        if args.engine:
            raise ValueError(f"--kernels {args.kernels} decodes on the block-by-block path, not with --engine")
        codec = VariableRateCodec(codec.path, codec.threads, args.kernels)
    stream = not from_job and isinstance(codec, VariableRateCodec)
    if stream:
        codec.prefetch()
    out = Path(args.output)
    if stream and not args.engine:
        if args.clear:
            scene_classes(codec, args.classifier)      # a model without a scene-class head is refused by name now
        with _cluster(args) as run:
            written = render.decompress(args.input, codec, out, single=out.suffix.lower() in (".tif", ".tiff"),
                                        date=args.date, fill_gaps=args.fill, scale=args.scale, like_path=args.like,
                                        run=run, clear=args.clear)
        dates = [args.date] if args.date else stored
        return _decoded_written(written, dates, args.input) + (_cleared_shares(written) if args.clear else "")
    if stream and codec.layer(quality) is not None:
        raise ValueError(f"{args.input} is at level {quality} of {codec.model_id}, its level {codec.base(quality)} and a "
                         "residual layer, which the block-by-block path adds: decompress it without --engine")
    on_engine = stream and args.scale is not None and not args.like and not args.clear
    if (args.scale is not None and not on_engine) or args.like or (args.date and not stream):
        raise ValueError("--like works on variable-rate products (formats 3-13) on the block-by-block path: without "
                         "--engine (--scale also on the engine, not with --clear)" if stream else
                         "--date, --scale and --like work on variable-rate products (formats 3-13)")
    graph = {"process_graph": {
        "load": {"process_id": "load_collection", "arguments": {"id": str(args.input), "spatial_extent": None,
                                                                "temporal_extent": None}},
        "decode": {"process_id": "corsa_openeo_decompress", "arguments": {
            "data": {"from_node": "load"}, "model": str(codec.path), "quality": quality, "fill": args.fill,
            "dates": [args.date] if args.date else None}},
        "save": {"process_id": "save_result", "arguments": {"data": {"from_node": "decode"}, "format": "GTiff",
                                                            "options": {"filename_prefix": "corsa_decoded"}},
                 "result": True}}}
    if on_engine:       # the service corsa_openeo_render: smaller pixels only, as resample_spatial "near" makes them
        if not args.scale >= 1:
            raise ValueError(f"--scale {args.scale} on the engine: corsa_openeo_render makes pixels smaller (a scale "
                             "of 1 or more); without --engine, larger pixels are averaged")
        head = series.header(args.input, stream_format.dates_in(args.input)[0])[1]
        (h, w), transform = head["shape"], head["transform"]
        graph["process_graph"]["decode"]["process_id"] = "corsa_openeo_render"
        # render.scaled's pixel size: a whole number of pixels on the stored bounds
        graph["process_graph"]["decode"]["arguments"]["resolution"] = [
            abs(transform.a) * w / max(1, round(w * args.scale)), abs(transform.e) * h / max(1, round(h * args.scale))]
    if args.clear:
        _, _, classifier = scene_classes(codec, args.classifier)
        graph["process_graph"]["decode"]["process_id"] = "corsa_openeo_decompress_clear"
        graph["process_graph"]["decode"]["arguments"]["classifier"] = str(classifier) if classifier else None
        if args.fill:
            raise ValueError("--fill and --clear combine on the block-by-block path (without --engine): the services "
                             "have no such graph")
        for name in ("fill", "dates"):
            del graph["process_graph"]["decode"]["arguments"][name]
    # checks the decoder against its card and loads it now, not deep inside the engine
    codec.decoder(quality) if isinstance(codec, VariableRateCodec) else codec.decoder
    single = out.suffix.lower() in (".tif", ".tiff")
    if single and not args.date and len(stored) > 1:
        raise ValueError(f"{args.input} holds {len(stored)} dates: give a folder as -o")
    (out.parent if out.suffix else out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent if out.suffix else out) as tmp:
        engine = _engine()(_catalogue(), output=Path(tmp), scheduler=args.scheduler)
        engine.run(graph)
        dates = [p.name.removeprefix(f"{blockwise.DECODED_PREFIX}_").removesuffix(".tif") for p in engine.written]
        if single:
            if len(engine.written) != 1:
                raise ValueError(f"{args.input} gave {len(engine.written)} dates: give a folder as -o")
            written = [results.as_cog(engine.written[0], out)]
        else:
            out.mkdir(parents=True, exist_ok=True)
            written = [results.as_cog(p, out / p.name) for p in engine.written]
    return _decoded_written(written, dates, args.input)


def classify(args: argparse.Namespace) -> str:
    stac_catalog.check_complete(args.input)
    codec, quality, dates = _opened(args.input, args.model, "features_session")
    names, colors, classifier = scene_classes(codec, args.classifier, args.classes)
    out = Path(args.output)
    single = out.suffix.lower() in (".tif", ".tiff")
    if single and len(dates) != 1:
        raise ValueError(f"{args.input} holds {len(dates)} dates: give a folder as -o")
    if isinstance(codec, VariableRateCodec):      # block by block, the classify service's own windows (on a cluster with --scheduler)
        written = []
        with _cluster(args) as run:
            for date in dates:
                grid = series.header(args.input, date)[1]
                sub = blockwise.classify_date(args.input, date, codec, args.classes, run)
                written.append(_class_file(out if single else out / f"classes_{date}.tif", sub, grid["shape"],
                                           grid["transform"], grid["crs"], names, colors))
        return f"{len(written)} class map(s) written: {', '.join(str(p) for p in written)}"
    graph = {"process_graph": {
        "load": {"process_id": "load_collection", "arguments": {"id": str(args.input), "spatial_extent": None,
                                                                "temporal_extent": None}},
        "classify": {"process_id": "corsa_openeo_classify", "result": True, "arguments": {
            "data": {"from_node": "load"}, "model": str(codec.path), "quality": quality,
            "classifier": str(classifier) if classifier else None, "classes": args.classes}}}}
    engine = _engine()(_catalogue(), scheduler=args.scheduler)
    cube = engine.run(graph)
    written = []
    for i, date in enumerate(dates):
        d = codebook_product.read_date(args.input, date)
        # The UDF replicates each 20 m class over its 2 x 2 pixels.
        (sub,) = engine._compute(cube.isel(t=i).sel(bands="class").data[::2, ::2])
        written.append(_class_file(out if single else out / f"classes_{date}.tif", sub, d.shape, d.transform, d.crs,
                                   names, colors))
    return f"{len(written)} class map(s) written: {', '.join(str(p) for p in written)}"


def _class_file(path: Path, sub: np.ndarray, shape: tuple[int, int], transform, crs, names: dict, colors: dict) -> Path:
    """The class GeoTIFF of a date on the 20 m grid of a product's input grid ``shape``; cells past
    the input stay 0 (nodata)."""
    classes = np.zeros((-(-shape[0] // 4) * 2, -(-shape[1] // 4) * 2), np.uint8)
    classes[: sub.shape[0], : sub.shape[1]] = sub
    return write_classes(path, classes, transform * Affine.scale(2) if transform is not None else None, crs, names, colors)


def info(args: argparse.Namespace) -> str:
    stac_catalog.check_complete(args.input)
    records = stac_catalog.describe(args.input)
    if args.json:
        return json.dumps({"product": str(args.input), "dates": records}, indent=1)
    lines = []
    for r in records:
        h, w = r["shape"]
        head = (f"{r['date']}: model {r['model_id']} (decoder sha256 "
                f"{(r.get('decoder_sha256_prefix') or r.get('decoder_sha256'))[:12]}...)")
        if r["format"] >= 3:
            lines.append(f"{head}, quality {r['quality']}, input grid {w}x{h} px {r['crs'] or 'no CRS'}, latent "
                         f"{r['latent_cells'][1]}x{r['latent_cells'][0]} in {r['blocks']} block(s), {r['bytes']:,} bytes, "
                         f"CF {r['cf']:.1f}" + (", nodata mask" if r["nodata_mask"] else "")
                         + (f", refinement {r['refinement_bytes']:,} bytes" if r["refinement_bytes"] else "")
                         + (f", residual layer {r['layer_bytes']:,} bytes" if r.get("layer_bytes") else "")
                         + (f", coded with references to {', '.join(r['references'])}" if r["references"] else ", coded alone"))
        else:
            lines.append(f"{head}, input grid {w}x{h} px {r['crs'] or 'no CRS'}, level 0 {r['level0'][1]}x{r['level0'][0]}, "
                         f"level 1 {r['level1'][1]}x{r['level1'][0]}, {r['bytes']:,} bytes, CF {r['cf']:.1f}"
                         + (f", {r['nodata_pixels']} nodata px" if r["nodata_pixels"] else ""))
    return "\n".join(lines)


def _product_written(written: list[Path]) -> str:
    """The STAC Collection and Items of the product ``written`` went into (``corsa.formats.stac_catalog``), and
    one line on what was written: files, dates, bytes and CF (against the input grids)."""
    folder = written[0].parent if written else Path(".")
    if written:
        stac_catalog.write_product(folder)
    dates = sorted({p.name[len("corsa_"):].split("_")[0].removesuffix(stream_format.SUFFIX) for p in written})
    size = sum(p.stat().st_size for p in written)
    pixels = 0
    for d in dates:
        path = folder / stream_format.file_name(d)
        pixels += int(np.prod(stream_format.read_header(path.read_bytes(), path.name)["shape"] if path.exists()
                              else codebook_product.read_date(folder, d).shape))
    return f"{len(written)} files for {len(dates)} date(s) in {folder}, {size:,} bytes, CF {compression_factor(pixels, size):.1f}"


RENDER_HEADS = (("between", "--date"), ("render", "--scale / --like"))   # card key, decompress option


def models(args: argparse.Namespace) -> str:
    """The shipped models with their quality levels and measured test figures."""
    entries = []
    for card in shipped_cards():
        if "encoder" not in card.get("files", {}):
            continue  # a classifier, not a codec
        if card.get("kind") == "variable-rate":
            qualities = [{"quality": q["quality"], "cf": q["test"]["mean_over_sources"]["cf"],
                          "psnr_db": _default_psnr(card, q)} for q in card["qualities"]]
            entry = {"id": card["id"], "kind": "variable-rate", "qualities": [q["quality"] for q in qualities],
                     "default_quality": card["default_quality"], "test": qualities}
        else:
            t = card.get("test", {})
            entry = {"id": card["id"], "kind": "codebook", "qualities": [], "default_quality": None,
                     "test": [{"quality": None, "cf": t.get("product_cf"), "psnr_db": t.get("mean_psnr_db"),
                               "cf_range_coded": t.get("entropy_coded_cf")}]}
        entry["default"] = card["id"] == DEFAULT_MODEL
        entry["gain_db"] = (card.get("gain_over_classical_db") or {}).get("mean_over_levels_1_8")
        entry["heads"] = sorted(card.get("heads", {}))
        # the decompress options a model's own heads serve (without them: linear interpolation, cubic)
        entry["renders"] = [option for key, option in RENDER_HEADS if key in card]
        entry["description"] = card.get("description", "")
        entries.append(entry)
    if args.json:
        return json.dumps({"models": entries}, indent=1)
    if args.table:
        return figures_table(next(e for e in entries if e["default"]))
    lines = []
    for e in entries:
        head = f"{e['id']}{' (default)' if e['default'] else ''}: {e['kind']}"
        if e["qualities"]:
            head += f", quality levels {e['qualities'][0]}-{e['qualities'][-1]} (default {e['default_quality']})"
        if e["gain_db"] is not None:
            head += f", {e['gain_db']:+.2f} dB over JPEG 2000 / JPEG XL (levels 1-8, test split)"
        if e["heads"]:
            head += f", heads: {', '.join(e['heads'])}"
        if e["renders"]:
            head += f", own heads for {' and '.join(e['renders'])}"
        lines.append(head)
        for t in e["test"]:
            label = f"quality {t['quality']}" if t["quality"] is not None else "single rate"
            extra = (f" (product files: GeoTIFF index grids; range-coded indices would give CF {t['cf_range_coded']})"
                     if t.get("cf_range_coded") else "")
            lines.append(f"  {label}: test split CF {t['cf']}, PSNR {t['psnr_db']} dB{extra}")
    return "\n".join(lines)


def _default_psnr(card: dict, level: dict) -> float:
    """A level's test PSNR (mean over sources) as the default kernels decode it: measured so where the
    card has it (``training.train_int8``), else the int8 decoder's where it decodes the level
    (``corsa_udf.network_file``), else the float decoder's of the export."""
    if corsa_udf.network_file(card, {}, level["quality"]) == "decoder_int8":
        figures = card["int8"]["test"]["levels"][str(level["quality"])]
        return figures.get("psnr_db_default", figures["psnr_db_int8"])
    return level["test"]["mean_over_sources"]["psnr_db"]


def figures_table(entry: dict) -> str:
    """The default model's test figures as a Markdown table (the README's, from the card)."""
    _, card = read_card(entry["id"])
    gains = (card.get("gain_over_classical_db") or {}).get("by_quality", {})
    rows = [f"| {t['quality']}{' (default)' if t['quality'] == entry['default_quality'] else ''} | {t['cf']:.1f} | "
            f"{t['psnr_db']:.2f} | {gains[str(t['quality'])]:+.2f} |" for t in entry["test"] if str(t["quality"]) in gains]
    return "\n".join([f"| {entry['id']} quality | CF | PSNR (dB) | gain over the best of JPEG 2000 / JPEG XL at the same CF (dB) |",
                      "|---|---|---|---|", *rows])


def reduce(args: argparse.Namespace) -> str:
    """A stream-format product brought to a lower quality without the source: its integers are
    dequantised and quantised again at the lower level; where that level is refined, each block is
    refined against the product's own decoding (``blockwise.reduced_refinement``)."""
    stac_catalog.check_complete(args.input)
    stream = _stream_product(args.input, args.model)
    if stream is None:
        raise product.ProductError(f"{args.input} holds no variable-rate product (corsa_<date>{stream_format.SUFFIX})")
    codec, quality = stream
    codec.level(args.quality)
    base, to = codec.base(quality), codec.base(args.quality)    # the levels of the integers stored
    if args.quality > quality:
        raise ValueError(f"{args.input} has quality {quality}: it can be reduced, not raised to {args.quality}")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError("give another folder as -o: the product is read while the reduced one is written")
    dates = stream_format.dates_in(args.input)
    heads = [series.header(args.input, d)[1] for d in dates]
    grids = {(h["shape"], h["transform"], h["crs"]) for h in heads}
    if len(grids) > 1:
        raise ValueError(f"{args.input} holds dates on {len(grids)} different grids: reduce them one folder a grid")
    # Coded again at the new level with the same key dates and reference dates (each sub-block's
    # choice made afresh: the integers changed).
    planned = series.plan(dates, [to] * len(dates), [h["refs"] for h in heads])
    blocks = -(-heads[0]["cells"][0] // heads[0]["block"]) * -(-heads[0]["cells"][1] // heads[0]["block"])
    folder, out = args.input, Path(args.output)
    masks = {i: m for i, (d, h) in enumerate(zip(dates, heads))
             if (m := stream_format.read_mask(series.header(args.input, d)[0], h, stream_format.file_name(d))) is not None}
    h = heads[0]
    with _cluster(args) as run:
        coded = series.encode_dates(codec, planned, list(range(len(dates))), blocks, lambda i, k: codec.requantise(
            series.block_ints(folder, dates[i], k, codec), base, to), run,
            # the same integers keep their refinement (a layer dropped or coded again)
            refinement_of=lambda i, k: series.block_refinement(folder, dates[i], k, codec) if to == base
            else blockwise.reduced_refinement(folder, dates[i], codec, to, k))
        written = series.write_dates(out, codec, planned, list(range(len(dates))), coded, masks, h["shape"],
                                     h["transform"], h["crs"])
        if codec.layer(args.quality) is not None:      # each block's layer against the stored decoding
            written = [blockwise.with_layer(out, d, blockwise.decoded_blocks(folder, d, codec), codec, args.quality, run)
                       for d in dates]
    return _product_written(written)


INPUT_HELP = {
    "compress": "a 10-band GeoTIFF (bands by description B02 ... B12, or exactly 10 in that order; DN = "
                "reflectance x 10000), a folder of dated GeoTIFFs of one grid (a time series), an openEO NetCDF "
                "cube, or a STAC item collection .json (omit with --stac)",
    "decompress": "a product folder (from corsa compress or pack) or a compress job's downloaded files",
    "pack": "a compress job's downloaded files (its job.json and layer GeoTIFFs)",
    "classify": "a product folder",
    "reduce": "a product folder of a variable-rate model",
    "info": "a product folder",
}
OUTPUT_HELP = {
    "compress": "the product folder to write (one file a date; created if missing)",
    "decompress": "a .tif file for one date, or a folder for corsa_decoded_<date>.tif of every date",
    "pack": "the product folder to write",
    "classify": "the class GeoTIFF to write (uint8 on the 20 m grid, colour table)",
    "reduce": "the folder of the reduced product (not INPUT)",
}


SERVE_SERVICE = "corsa2_openeo_compress_s2"
WRITES_PRODUCT = ("compress", "pack", "reduce")     # one writer at a time into their -o folder


@contextlib.contextmanager
def _into_product(args: argparse.Namespace):
    """compress / pack into -o: a folder already holding a product is refused unless --append
    (compress: later dates of the same place) or --overwrite, which writes the new product beside
    the old one and swaps the folders when it is complete (``files.exchange``), so no folder ever
    mixes two products."""
    out = Path(args.output)
    held = sorted(codebook_product.dates_in(out) + stream_format.dates_in(out)) if out.is_dir() else []
    append = getattr(args, "append", False)
    if append and args.overwrite:
        raise ValueError("--append and --overwrite exclude each other: add dates to the product, or replace it")
    if not held or append:
        yield lambda line: line
        return
    if not args.overwrite:
        raise ValueError(f"{out} already holds a product ({len(held)} date(s): {', '.join(held[:3])}"
                         f"{', ...' if len(held) > 3 else ''}): "
                         + ("--append adds later dates of the same place, " if args.command == "compress" else "")
                         + "--overwrite replaces the product, or give another folder")
    staging = out.with_name(f".{out.name}.new-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    args.output = staging
    try:
        yield lambda line: line.replace(str(staging), str(out))
        exchange(staging, out)      # staging now holds the old product
    finally:
        args.output = out
        shutil.rmtree(staging, ignore_errors=True)


def _collection(text: str) -> Path:
    name, sep, path = text.partition("=")
    if not sep or name != "SENTINEL2_L2A" or not Path(path).exists():
        raise argparse.ArgumentTypeError(f"{text!r}: give SENTINEL2_L2A=PATH with an existing file or folder")
    return Path(path)


def serve(args: argparse.Namespace) -> str:
    from corsa.app.serve import serve as run

    run(args.port, args.collection, args.service, ready=lambda line: print(line, flush=True))
    return "corsa serve: stopped"


def _day(text: str) -> str:
    """A --date: YYYY-MM-DD, a real day."""
    try:
        if len(text) == 10 and str(np.datetime64(text, "D")) == text:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD")


def _unraisable(info) -> None:
    """rasterio's GDAL log handler fails to decode a message that quotes a damaged file's non-UTF-8
    bytes and would print its traceback; the GDAL error itself still reaches us as an exception."""
    if not isinstance(info.exc_value, UnicodeDecodeError):
        sys.__unraisablehook__(info)


def _printed(kind, value, tb) -> None:
    """The same failure, where the log handler runs inside a callback that prints what it raised."""
    if not isinstance(value, UnicodeDecodeError):
        sys.__excepthook__(kind, value, tb)


def _heap_in_large_steps() -> None:
    """glibc's heap grown (and kept) 64 MiB at a time in this process, where glibc is the C library.

    The UDF fixes the mmap threshold at 1 MiB, which also fixes the trim threshold at 128 KiB: the heap
    then shrank and grew by a few pages per block, faulting them in again each time (2.7 s of kernel
    time in a 7.5 s ``corsa decompress`` of 4.6 Mpx, 0.6 s with the padding; BENCHMARKS.md, issue 28,
    eighth part). Here only, not in the UDF: with room at the heap's top, blocks above the threshold
    come from the heap too, and a back end's worker lives for many more chunks than a CLI run."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-2, 64 << 20)  # -2: M_TOP_PAD
    except (OSError, AttributeError):  # another C library: leave its allocator alone
        pass


def main(argv: list[str] | None = None) -> int:
    sys.unraisablehook, sys.excepthook = _unraisable, _printed
    _heap_in_large_steps()
    # Whether a file is georeferenced as it must be is ours to check and say (grids are checked by name).
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    p = argparse.ArgumentParser(prog="corsa", description=OVERVIEW, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, help_ in (("compress", compress, "compress a scene into a product folder"),
                              ("decompress", decompress, "decode a product folder (or a compress job's files) to GeoTIFF"),
                              ("pack", pack_files, "turn a back end's compress job download into a product (smaller, the same pixels)"),
                              ("classify", classify, "scene classes or land cover of a product folder, without decoding"),
                              ("reduce", reduce, "bring a variable-rate product to a lower quality, without the source"),
                              ("info", info, "describe a product folder"),
                              ("models", models, "list the shipped models, their quality levels and test figures"),
                              ("serve", serve, "a local web page to run a compress job from a form, on this machine")):
        s = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        s.set_defaults(func=func)
        s.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr (errors still go there)")
        if name == "models":
            s.add_argument("--json", action="store_true", help='machine-readable: {"models": [...]}')
            s.add_argument("--table", action="store_true", help="the default model's figures as a Markdown table")
            continue
        if name == "info":
            s.add_argument("--json", action="store_true", help='machine-readable: {"product": ..., "dates": [...]}')
        if name == "serve":
            s.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free one; default 8765)")
            s.add_argument("--collection", metavar="SENTINEL2_L2A=PATH", type=_collection,
                           help="the local data the service's load_collection reads (a GeoTIFF, a folder of them, a "
                           "NetCDF cube; default the shared data's Major-TOM scene)")
            s.add_argument("--service", default=SERVE_SERVICE, help=f"the UDP whose form the page shows (default "
                           f"{SERVE_SERVICE}; a compress service of process_graphs/)")
            continue
        s.add_argument("input", type=Path, nargs="?" if name == "compress" else None, metavar="INPUT",
                       help=INPUT_HELP[name])
        if name != "info":
            s.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help=OUTPUT_HELP[name])
            s.add_argument("--model", default=None, help="model name under models_onnx/ or a folder (compress: "
                           f"default {DEFAULT_MODEL}, with --append the product's; otherwise the model the product names)")
        if name in ("compress", "decompress", "classify", "reduce"):
            s.add_argument("--scheduler", metavar="ADDRESS", help="run the blocks on the workers of this dask.distributed "
                           "scheduler, e.g. tcp://127.0.0.1:8786 (default: this machine's threads); the workers must "
                           "see INPUT and the models at the same paths")
        if name in ("compress", "decompress"):
            s.add_argument("--engine", action="store_true",
                           help="run the published openEO process graph on the embedded engine, as a back end would "
                           "(the same bytes as without it, slower)")
        if name in ("compress", "reduce", "pack", "decompress"):
            s.add_argument("--quality", type=int, required=name == "reduce", help=QUALITY_HELP[name])
        if name == "decompress":
            s.add_argument("--date", type=_day, help="decode only this date (YYYY-MM-DD) of a variable-rate product: a "
                           "stored date as stored, a date between stored dates rendered from those around it")
            s.add_argument("--scale", type=float, help="render onto pixels S times smaller (S > 0) on the same bounds")
            s.add_argument("--like", type=Path, help="render onto the grid and CRS of this raster (GRID.tif)")
            s.add_argument("--fill", action="store_true",
                           help="fill a date's gaps (its nodata pixels) from the other dates of the series, brought to "
                           "the date's light; other pixels are unchanged")
            s.add_argument("--clear", action="store_true", help="set the pixels the scene classes call cloud or "
                           "cloud shadow to 0 (nodata); with --fill, fill them from the other dates")
            s.add_argument("--kernels", choices=corsa_udf.KERNELS, default="auto",
                           help="auto (default): decode with the model's int8 decoder where it has one (about 1.4x "
                           "faster), at the quality levels its card lists; int8: with that one at every level; "
                           "fp32: with its float decoder (docs/models.md: how far apart they are)")
        if name == "classify":
            s.add_argument("--classes", choices=CLASS_SETS, default="scl",
                           help="scl: scene classes (vegetation, not vegetated, water, snow/ice, cloud, cloud shadow); "
                           "landcover: land cover (water, trees, flooded vegetation, crops, built area, bare ground, "
                           "snow/ice, clouds, rangeland; variable-rate models)")
        if name in ("classify", "decompress"):
            s.add_argument("--classifier", help="for corsa512 products only: the classifier's name under models_onnx/ "
                           "or its folder (default corsa512-scl); other models carry their own")
        if name in ("compress", "pack"):
            s.add_argument("--overwrite", action="store_true",
                           help="replace the product already in -o, as a whole: the new one is written beside it and "
                           "swapped in when complete")
        if name == "compress":
            s.add_argument("--bbox", type=_bbox, help="only this area of the input: west,south,east,north[,EPSG] (default EPSG 4326)")
            s.add_argument("--dates", type=_dates, help="only these dates of the input: start/end, e.g. 2021-01-01/2021-07-01 "
                           "(end excluded)")
            s.add_argument("--stac", help="a STAC API URL to load from instead of INPUT "
                           "(a local item-collection .json can be given as INPUT)")
            s.add_argument("--collection", default="sentinel-2-l2a", help="STAC collection id (with --stac)")
            s.add_argument("--max-cloud-cover", type=float, default=80.0,
                           help="with --stac: skip items whose eo:cloud_cover (%%) is above this (default 80)")
            s.add_argument("--append", action="store_true",
                           help="add the input's dates to the product in -o (after its last date), coded with its "
                           "history; the dates already there stay as they are")
            s.add_argument("--kernels", choices=corsa_udf.KERNELS, default="auto",
                           help="auto (default): encode with the model's int8 encoder where it has one, at the "
                           "quality levels its card lists; int8: with that one at every level; fp32: with its float "
                           "encoder (the integers, so the product's bytes, differ slightly: docs/models.md)")
            s.add_argument("--key-every", type=_positive, default=series.KEY_EVERY,
                           help=f"a date coded alone every N dates of a series (default {series.KEY_EVERY}): decoding "
                           "one date reads at most N-1 others; 1 codes every date alone")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        # a decompress off the engine counts rows of blocks, not dask's tasks: it runs without importing dask
        with progress.shown(f"corsa {args.command}", quiet=args.quiet or args.command in ("info", "models", "serve"),
                            dask_tasks=args.command != "decompress" or args.engine), \
                (product_lock(args.output) if args.command in WRITES_PRODUCT else contextlib.nullcontext()), \
                (_into_product(args) if args.command in ("compress", "pack") else contextlib.nullcontext(lambda line: line)) \
                as shown:
            line = shown(args.func(args))
    except _handled_errors() as e:
        print(f"corsa {args.command}: error: {e}", file=sys.stderr)
        return 2
    # Listings stay parseable (models --json); work says how long it took.
    print(line if args.command in ("info", "models", "serve") else f"{line} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
