"""corsa compress | decompress | info: the published process graphs, run on the embedded engine.

    corsa compress scene.tif -o product/            # a 10-band GeoTIFF or an openEO NetCDF cube
    corsa compress --stac https://earth-search.aws.element84.com/v1 --bbox ... --dates ... -o product/
    corsa decompress product/ -o decoded.tif        # --clear: cloud and cloud-shadow pixels set to 0
    corsa classify product/ -o classes.tif          # scene classes on the 20 m grid, without decoding
    corsa info product/
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from dask.diagnostics import ProgressBar
from rasterio.transform import Affine

from . import product
from .classmap import DEFAULT_CLASSIFIER, Classifier, write_classes
from .codec import DEFAULT_MODEL, ModelError, OnnxCodec
from .engine import Engine, EngineError
from .metrics import compression_factor
from .processes import GRAPHS_DIR
from .sources import Catalogue, SourceError
from .stac import StacSource


def _udp(pid: str) -> dict:
    return json.loads((GRAPHS_DIR / f"{pid}.json").read_text())


def _bbox(text: str | None) -> dict | None:
    if not text:
        return None
    parts = text.split(",")
    if len(parts) not in (4, 5):
        raise SystemExit(f"--bbox takes west,south,east,north[,EPSG code], got {text!r}")
    west, south, east, north = map(float, parts[:4])
    return {"west": west, "south": south, "east": east, "north": north,
            "crs": f"EPSG:{parts[4]}" if len(parts) == 5 else "EPSG:4326"}


def _dates(text: str | None) -> list | None:
    if not text:
        return None
    start, _, end = text.partition("/")
    return [start or None, end or None]


def compress(args: argparse.Namespace) -> str:
    codec = OnnxCodec(args.model)
    codec.encoder  # checks encoder.onnx against its card and loads it now, not deep inside the engine
    if args.stac or str(args.input).endswith(".json"):
        source = StacSource(str(args.stac or args.input), args.collection)
    elif args.input is None:
        raise SourceError("give an INPUT file or folder, or --stac URL")
    else:
        source = args.input
    engine = Engine(Catalogue({"SENTINEL2_L2A": source}), output=args.output, scheduler=args.scheduler)
    with ProgressBar(minimum=2):
        engine.run(_udp("corsa_compress_s2"), spatial_extent=_bbox(args.bbox), temporal_extent=_dates(args.dates),
                   max_cloud_cover=args.max_cloud_cover, model=str(codec.path))
    return _summary(args.output, engine.written)


def decompress(args: argparse.Namespace) -> str:
    codec = OnnxCodec(args.model)
    graph = {"process_graph": {
        "load": {"process_id": "load_collection", "arguments": {"id": str(args.input), "spatial_extent": None,
                                                                "temporal_extent": None}},
        "decode": {"process_id": "corsa_decompress", "arguments": {"data": {"from_node": "load"},
                                                                   "model": str(codec.path)}},
        "save": {"process_id": "save_result", "arguments": {"data": {"from_node": "decode"}, "format": "GTiff"},
                 "result": True}}}
    if args.clear:
        clf = Classifier(args.classifier)
        clf.check_codec(codec)
        graph["process_graph"]["decode"]["process_id"] = "corsa_decompress_clear"
        graph["process_graph"]["decode"]["arguments"]["classifier"] = str(clf.path)
    codec.decoder  # checks decoder.onnx against its card and loads it now, not deep inside the engine
    dates = product.dates_in(args.input)
    if not dates:
        raise product.ProductError(f"{args.input} holds no complete compressed date (corsa_<date>_L0.tif)")
    for d in dates:
        _check_date(args.input, d, codec)
    out = Path(args.output)
    (out.parent if out.suffix else out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent if out.suffix else out) as tmp:
        engine = Engine(Catalogue(), output=Path(tmp), scheduler=args.scheduler)
        with ProgressBar(minimum=2):
            engine.run(graph)
        if out.suffix.lower() in (".tif", ".tiff"):
            if len(engine.written) != 1:
                raise SystemExit(f"{args.input} holds {len(engine.written)} dates: give a folder as -o")
            shutil.move(engine.written[0], out)
            written = [out]
        else:
            out.mkdir(parents=True, exist_ok=True)
            written = [Path(shutil.move(p, out / p.name)) for p in engine.written]
    return f"{len(written)} file(s) written: {', '.join(str(p) for p in written)}"


def _check_date(folder: Path, date: str, codec: OnnxCodec) -> None:
    """Refuse a date the codec cannot decode, before the engine runs (its grids are then freed)."""
    d = product.read_date(folder, date)
    product.check_model(d, codec.card["files"]["decoder"]["sha256"], codec.model_id)
    try:
        codec.check_indices(d.idx0, d.idx1)
    except ValueError as e:
        raise product.ProductError(f"date {date} of {folder}: {e} (corrupt product?)") from e


def classify(args: argparse.Namespace) -> str:
    codec, clf = OnnxCodec(args.model), Classifier(args.classifier)
    clf.check_codec(codec)
    dates = product.dates_in(args.input)
    if not dates:
        raise product.ProductError(f"{args.input} holds no complete compressed date")
    out = Path(args.output)
    single = out.suffix.lower() in (".tif", ".tiff")
    if single and len(dates) != 1:
        raise SystemExit(f"{args.input} holds {len(dates)} dates: give a folder as -o")
    graph = {"process_graph": {
        "load": {"process_id": "load_collection", "arguments": {"id": str(args.input), "spatial_extent": None,
                                                                "temporal_extent": None}},
        "classify": {"process_id": "corsa_classify", "result": True, "arguments": {
            "data": {"from_node": "load"}, "model": str(codec.path), "classifier": str(clf.path)}}}}
    engine = Engine(Catalogue(), scheduler=args.scheduler)
    cube = engine.run(graph)
    written = []
    for i, t in enumerate(cube["t"].values):
        d = product.read_date(args.input, product.date_label(t))
        product.check_model(d, codec.card["files"]["decoder"]["sha256"], codec.model_id)
        # The UDF replicates each 20 m class over its 2 x 2 pixels; cells past the input stay 0 (nodata).
        with ProgressBar(minimum=2):
            (sub,) = engine._compute(cube.isel(t=i).sel(bands="class").data[::2, ::2])
        classes = np.zeros(d.idx0.shape, np.uint8)
        classes[: sub.shape[0], : sub.shape[1]] = sub
        transform = d.transform * Affine.scale(2) if d.transform is not None else None
        path = out if single else out / f"classes_{d.date}.tif"
        written.append(write_classes(path, classes, transform, d.crs, clf.names, clf.colors))
    return f"{len(written)} class map(s) written: {', '.join(str(p) for p in written)}"


def info(args: argparse.Namespace) -> str:
    lines = []
    for d in product.dates_in(args.input):
        pd_ = product.read_date(args.input, d)
        size = product.product_bytes(args.input, d)
        pixels = pd_.shape[0] * pd_.shape[1]
        lines.append(f"{d}: model {pd_.model_id} (decoder sha256 {pd_.model_sha256[:12]}...), input grid "
                     f"{pd_.shape[1]}x{pd_.shape[0]} px {pd_.crs or 'no CRS'}, level 0 {pd_.idx0.shape[1]}x"
                     f"{pd_.idx0.shape[0]}, level 1 {pd_.idx1.shape[1]}x{pd_.idx1.shape[0]}, "
                     f"{size:,} bytes, CF {compression_factor(pixels, size):.1f}"
                     + (f", {int(pd_.nodata.sum())} nodata px" if pd_.nodata is not None else ""))
    if not lines:
        raise product.ProductError(f"{args.input} holds no complete compressed date")
    return "\n".join(lines)


def _summary(folder: Path, written: list[Path]) -> str:
    dates = sorted({p.name.split("_")[1] for p in written})
    size = sum(p.stat().st_size for p in written)
    pixels = sum(np.prod(product.read_date(folder, d).shape) for d in dates)
    return f"{len(written)} files for {len(dates)} date(s) in {folder}, {size:,} bytes, CF {compression_factor(pixels, size):.1f}"


def _unraisable(info) -> None:
    """rasterio's GDAL log handler fails to decode a message that quotes a damaged file's non-UTF-8
    bytes and would print its traceback; the GDAL error itself still reaches us as an exception."""
    if not isinstance(info.exc_value, UnicodeDecodeError):
        sys.__unraisablehook__(info)


def main(argv: list[str] | None = None) -> int:
    sys.unraisablehook = _unraisable
    p = argparse.ArgumentParser(prog="corsa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, help_ in (("compress", compress, "compress a scene into a product folder"),
                              ("decompress", decompress, "decode a product folder to GeoTIFF"),
                              ("classify", classify, "scene classes of a product folder, without decoding"),
                              ("info", info, "describe a product folder")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("input", type=Path, nargs="?" if name == "compress" else None)
        s.set_defaults(func=func)
        if name != "info":
            s.add_argument("-o", "--output", type=Path, required=True)
            s.add_argument("--model", default=DEFAULT_MODEL, help="model name under models_onnx/ or a folder")
            s.add_argument("--scheduler", help="address of a dask.distributed scheduler (default: local threads)")
        if name == "decompress":
            s.add_argument("--clear", action="store_true", help="set cloud and cloud-shadow pixels (by the classifier) to 0")
        if name in ("classify", "decompress"):
            s.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="classifier name under models_onnx/ or a folder")
        if name == "compress":
            s.add_argument("--bbox", help="west,south,east,north[,EPSG] (default EPSG 4326)")
            s.add_argument("--dates", help="start/end, e.g. 2021-01-01/2021-07-01 (end excluded)")
            s.add_argument("--stac", help="a STAC API URL to load from instead of INPUT "
                           "(a local item-collection .json can be given as INPUT)")
            s.add_argument("--collection", default="sentinel-2-l2a", help="STAC collection id (with --stac)")
            s.add_argument("--max-cloud-cover", type=float, default=80.0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        line = args.func(args)
    except (SourceError, EngineError, ModelError, product.ProductError, ValueError) as e:
        print(f"corsa {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(f"{line} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
