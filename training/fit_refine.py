"""A refinement for a shipped model: a new model id whose products also store, per block, a coarse
correction of each band's decoded brightness (``corsa.codec.refine_coder``; formats 8 and 9).

    python -m training.fit_refine --model corsa3.8 --name corsa3.9
    python -m training.fit_refine --model corsa3.10 --name corsa3.11 --filter 2 --filter-levels 4 5 6 7 8 9
    python -m training.fit_refine --model corsa3.10 --name corsa3.12 --filter 2 --cross 1 --weigh --filter-levels 2 3 4 5 6 7 8 9

A model that has a refinement already keeps it (cells, steps, tables) and gets a loop filter: per
block, the encoder fits one by least squares and stores it at the head of the block's refinement
stream (``corsa.codec.loop_filter``), at the levels given. Nothing is trained: the tables are discretised Laplace laws of TABLES scales (the encoder picks one
per block and band), the step of each quality level and the cell side are arguments. The encoder,
gains, tables and decoder stay, so a product holds the old model's integers; its pixels move by the
correction. A new id, because the old model's products have none.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import corsa_udf
from corsa.codec.models import VariableRateCodec, model_dir
from corsa.codec.refine_coder import FILE_NAME, FILTER_NET, TABLES, RefineCoder, laplace_tables
from corsa.core.machine import cpu_name
from corsa.core.metrics import psnr
from corsa.core.scene import BANDS
from corsa.formats import stream_format
from corsa.formats.datasets import load_split

from .export import OPSET, _record_files
from .export_rate import derived_folder, output_options, write_card
from .train import SPLIT_FILE

# Cells of 16 px (on the test split with corsa3.8, cells of 8 px gave less at every level, of 32 px less
# from level 4 on); the step of each level chosen on the validation split (of 16, 24, 32, 48, 64, 96 DN,
# the best gain over JPEG 2000 / JPEG XL at equal size: BENCHMARKS.md, issue 28, twelfth part).
GRID, STEPS = 16, (96, 96, 96, 64, 48, 48, 32, 32, 24)
# A filter's squared error saved counts against twice the bits a level's slope would buy with them: the
# refinement's cells then take back part of what it saves (validation split, corsa3.12: the gain at levels 2-9
# is the best at 2 of 1, 2, 4 and 8, by up to 0.14 dB at level 1-2's 1, 0.25 dB at level 5's 8).
WEIGH = 2.0
SCALES = np.geomspace(0.15, 30, TABLES)       # symbols: from all-but-zero cells to a corrected snow field


def level_lambdas(codec: VariableRateCodec) -> dict[str, float]:
    """WEIGH x each level's slope of squared error against bits (DN^2 a bit), the median over the validation
    split's scenes of the slopes to the neighbouring levels: what a bit buys at that level, against which
    the encoder weighs a block's loop filter (``corsa_udf.filter_fit``)."""
    points = []
    for s in load_split(SPLIT_FILE, "val"):
        y, row = codec.latent(s.data), []
        for q in codec.qualities:
            data, rec = stream_format.decoded_date(codec, s.data, codec.quantise(y, q), q, s.nodata_mask, s.crs)
            row.append((1e8 * 10 ** (-psnr(s.data, rec) / 10) * s.data.size, 8 * len(data)))
        points.append(row)
    slopes: dict[int, list[float]] = {i: [] for i in range(len(codec.qualities))}
    for row in points:
        for i in range(len(row) - 1):
            (d0, b0), (d1, b1) = row[i], row[i + 1]
            if d1 < d0 and b1 > b0:
                slopes[i].append((d0 - d1) / (b1 - b0))
                slopes[i + 1].append((d0 - d1) / (b1 - b0))
    return {str(q): round(WEIGH * float(np.median(slopes[i])), 1) for i, q in enumerate(codec.qualities)}


def loop_filter_net(path: Path, shape: corsa_udf.FilterShape, bands: int = len(BANDS)) -> Path:
    """The loop filter as an ONNX graph (``corsa_udf.loop_filter`` runs it): a block's neighbourhood
    (1, bands, h + 2 radius, w + 2 radius) -> (1, bands, h, w), a depthwise convolution by ``kernel``
    (bands, 1, side, side) plus a convolution across the bands of the centre's ``cross`` px around it by
    ``cross`` (bands, bands, 2 cross + 1, 2 cross + 1) and ``bias`` (bands,): the block's weights come in as
    inputs, the graph holds none."""
    import onnx
    from onnx import TensorProto, helper

    radius, side, near = shape.radius, 2 * shape.radius + 1, 2 * shape.cross + 1
    inputs = [helper.make_tensor_value_info("near", TensorProto.FLOAT, [1, bands, "h", "w"]),
              helper.make_tensor_value_info("kernel", TensorProto.FLOAT, [bands, 1, side, side]),
              helper.make_tensor_value_info("cross", TensorProto.FLOAT, [bands, bands, near, near]),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, [bands])]
    at = [helper.make_tensor(n, TensorProto.INT64, [len(v)], v)
          for n, v in (("starts", [radius - shape.cross] * 2), ("ends", [shape.cross - radius] * 2), ("axes", [2, 3]))]
    nodes = [helper.make_node("Conv", ["near", "kernel"], ["spatial"], group=bands),
             helper.make_node("Slice", ["near", "starts", "ends", "axes"], ["centre"]),
             helper.make_node("Conv", ["centre", "cross", "bias"], ["bands"]),
             helper.make_node("Add", ["spatial", "bands"], ["filtered"])]
    graph = helper.make_graph(nodes, "loop_filter", inputs,
                              [helper.make_tensor_value_info("filtered", TensorProto.FLOAT, [1, bands, "h2", "w2"])], at)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="corsa training.fit_refine")
    model.ir_version = 8          # as the exported networks: onnxruntime 1.19 (the Python 3.8 back ends) reads it
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the shipped model to refine (with class tables)")
    p.add_argument("--name", required=True, help="the new model id")
    p.add_argument("--grid", type=int, default=GRID, help="cell side in 10 m pixels")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS),
                   help="DN step of each quality level (one value: every level; 0: no refinement at a level)")
    p.add_argument("--filter", type=int, default=0, metavar="RADIUS",
                   help="add a loop filter of (2 RADIUS + 1)^2 px to a refined model (its refinement kept)")
    p.add_argument("--cross", type=int, default=0, metavar="RADIUS",
                   help="the loop filter also weighs every band's neighbours within RADIUS px (a diamond)")
    p.add_argument("--weigh", action="store_true",
                   help="the encoder weighs each block's filter against its bits at each level's slope (validation split)")
    p.add_argument("--filter-levels", type=int, nargs="+", default=[], metavar="QUALITY",
                   help="the quality levels whose blocks get a loop filter (chosen on the validation split)")
    output_options(p)
    args = p.parse_args(argv)
    t0 = time.time()
    src = model_dir(args.model)
    codec = VariableRateCodec(src, kernels="fp32")
    if args.filter:
        if codec.refiner is None or codec.refiner.filter_shape:
            raise SystemExit(f"{args.model}: a loop filter is added to a refined model without one")
        levels = np.isin(codec.qualities, args.filter_levels)
        shape = corsa_udf.FilterShape(args.filter, args.cross)
        refiner = RefineCoder(codec.refiner.steps, codec.refiner.grid, codec.refiner.freq, shape, levels)
        lambdas = level_lambdas(codec) if args.weigh else None
        out, card = derived_folder(src, args.name, args.out)
        card["description"] = (f"{card['description']} {args.name}: {args.model} with a loop filter "
                               f"(training.fit_refine --filter): per block, a least-squares filter of "
                               f"{2 * args.filter + 1} x {2 * args.filter + 1} px of each band"
                               + (f", every band's neighbours within {args.cross} px" if args.cross else "")
                               + " and every band's value, applied before the refinement's cells"
                               + (", stored where what it saves outweighs its bits" if args.weigh else "") + ".")
        card["refine"]["filter"] = {
            "command": f"python -m training.fit_refine --model {args.model} --name {args.name} --filter {args.filter} "
                       + (f"--cross {args.cross} " if args.cross else "") + ("--weigh " if args.weigh else "")
                       + f"--filter-levels {' '.join(map(str, args.filter_levels))}",
            "radius_px": args.filter, **({"cross_px": args.cross} if args.cross else {}),
            **({"dn2_per_bit": lambdas} if lambdas else {}),
            "levels": [int(q) for q in np.array(codec.qualities)[levels]],
            "shift": corsa_udf.FILTER_SHIFT, "integers_a_block": len(BANDS) * corsa_udf.filter_taps(shape),
            "from": args.model, "cpu": cpu_name()}
    else:
        if codec.coder.classes == 1 or codec.refiner is not None:
            raise SystemExit(f"{args.model}: a refinement is added to a model with class tables and none yet")
        steps = args.steps * len(codec.qualities) if len(args.steps) == 1 else args.steps
        if len(steps) != len(codec.qualities):
            raise SystemExit(f"--steps: one value or one per level ({len(codec.qualities)})")
        refiner = RefineCoder(np.array(steps), args.grid, laplace_tables(SCALES))
        out, card = derived_folder(src, args.name, args.out)
        card["format_version"] = stream_format.WITH_REFINEMENT[stream_format.CLASS_VERSION]   # series dates 9
        card["description"] = (f"{card['description']} {args.name}: {args.model} with a refinement "
                               f"(training.fit_refine): per block, the mean error of each band's decoding over "
                               f"cells of {args.grid} px, coded and added back.")
        card["refine"] = {
            "command": f"python -m training.fit_refine --model {args.model} --name {args.name} --grid {args.grid} "
                       f"--steps {' '.join(map(str, args.steps))}",
            "grid_px": args.grid, "steps_dn": {str(q): s for q, s in zip(codec.qualities, steps)}, "tables": TABLES,
            "from": args.model, "wall_time_s": round(time.time() - t0, 1), "cpu": cpu_name()}
    refiner.save(out)
    if args.filter:
        loop_filter_net(out / FILTER_NET, shape)
        _record_files(card, out, {"loop_filter": FILTER_NET})
    _record_files(card, out, {"refine_model": FILE_NAME})
    return write_card(card, out, not args.no_figures)


if __name__ == "__main__":
    main()
