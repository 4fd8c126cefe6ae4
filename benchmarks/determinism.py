"""What a product decodes to on another machine: the integers it stores are decoded bit for bit
anywhere (integer tables, CRC-checked); the decoder network's float arithmetic may differ with the
onnxruntime build or CPU kernels. Measured here by decoding the same product's integers with
onnxruntime's graph optimisations on (the default) and off (other kernels and fusions, as another
build or CPU would pick), and with 1 and 2 threads.

    python -m benchmarks.determinism --model corsa3.1 --out benchmarks/results/determinism.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import corsa_udf
import numpy as np
import onnxruntime as ort

from corsa.openeo import windows
from corsa.codec.models import VariableRateCodec
from corsa.formats.datasets import LOADERS, default_data_root

from corsa.core.machine import cpu_name
from . import report


def _session(path: Path, threads: int, optimise: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise \
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa3.1")
    p.add_argument("--quality", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/determinism.json"))
    args = p.parse_args(argv)
    codec = VariableRateCodec(args.model)
    scene = next(LOADERS["majortom"](default_data_root()))
    ints = codec.encode(scene.data, args.quality)
    z = codec.dequantise(ints, args.quality)
    decoder = codec.path / codec.card["files"]["decoder"]["path"]
    runs = {}
    for name, threads, optimise in (("default_2_threads", 2, True), ("default_1_thread", 1, True),
                                    ("unoptimised_1_thread", 1, False)):
        rec = corsa_udf.synthesise(_session(decoder, threads, optimise), z, windows.UDF_TILE, windows.OVERLAP["decompress"])
        runs[name] = (rec, np.clip(np.rint(rec), 0, 65535).astype(np.uint16))
    ref_f, ref_u = runs["default_2_threads"]
    result = {"model": args.model, "quality": args.quality, "cpu": cpu_name(), "onnxruntime": ort.__version__,
              "pixels": int(ref_u[0].size), "against_default_2_threads": {}}
    for name, (rec, u) in runs.items():
        diff = np.abs(u.astype(np.int32) - ref_u)
        result["against_default_2_threads"][name] = {
            "max_float_difference_dn": float(np.abs(rec - ref_f).max()), "max_dn_difference": int(diff.max()),
            "values_differing": int((diff > 0).sum()), "share_differing": float((diff > 0).mean())}
    return report.save(result, args.out)


if __name__ == "__main__":
    main()
