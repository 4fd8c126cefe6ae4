"""int8 kernels for decoding: a model's decoder quantised after training (onnxruntime's static QDQ,
per-channel int8 weights, uint8 activations calibrated on validation latents) against fp32.

    python -m benchmarks.int8 --model corsa3.1 --out benchmarks/results/int8_corsa3.1.json

Speed: one 512 px block (128 x 128 latent cells) through each decoder, 1 thread, best of 3; quality:
PSNR of validation scenes (>= 128 px) decoded by each, and the largest DN difference between the
two. ``--only`` quantises just the nodes whose names start with the given prefixes (the rest fp32).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import corsa_udf
import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static, shape_inference

from corsa.codec.models import VariableRateCodec, model_dir
from corsa.core.machine import cpu_name
from corsa.core.metrics import psnr
from corsa.formats.datasets import load_split
from corsa.openeo.windows import OVERLAP, UDF_TILE

from training.train_int8 import block_seconds, test_figures

from . import report

SPLIT = Path("training/split.json")


class _Latents(CalibrationDataReader):
    def __init__(self, latents: list[np.ndarray]):
        self.items = iter([{"latent": z[None, :, :64, :64].astype(np.float32)} for z in latents])

    def get_next(self):
        return next(self.items, None)


def _session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run(model: str, only: list[str] | None, scenes: int) -> dict:
    codec = VariableRateCodec(model)
    picked = [s for s in load_split(SPLIT, "val") if min(s.data.shape[1:]) >= 128][:scenes]
    q = codec.default_quality
    latents = [codec.dequantise(codec.encode(s.data, q), q) for s in picked]
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = str(codec.path / "decoder.onnx"), f"{tmp}/pre.onnx", f"{tmp}/int8.onnx"
        shape_inference.quant_pre_process(src, pre, skip_symbolic_shape=True)
        names = [n.name for n in onnx.load(pre).graph.node]
        exclude = [n for n in names if only and not any(n.startswith(o) for o in only)]
        quantize_static(pre, out, _Latents(latents), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
        fp32, int8 = _session(src), _session(out)
        rows = []
        for s, z in zip(picked, latents):
            dn = [np.clip(np.rint(corsa_udf.synthesise(d, z, UDF_TILE, OVERLAP["decompress"])
                                  [:, :s.data.shape[1], :s.data.shape[2]]), 0, 65535) for d in (fp32, int8)]
            rows.append({"group": s.group, "shape": list(s.data.shape[1:]), "psnr_fp32": round(psnr(s.data, dn[0]), 3),
                         "psnr_int8": round(psnr(s.data, dn[1]), 3), "max_dn_difference": int(np.abs(dn[0] - dn[1]).max())})
        speed = {"fp32_block_s": block_seconds(fp32, codec.channels),
                 "int8_block_s": block_seconds(int8, codec.channels)}
    return {"model": model, "quality": q, "quantised": only or "every node", "cpu": cpu_name(),
            "onnxruntime": ort.__version__, **speed, "speedup": round(speed["fp32_block_s"] / speed["int8_block_s"], 2),
            "psnr_change_db": round(float(np.mean([r["psnr_int8"] - r["psnr_fp32"] for r in rows])), 3), "scenes": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa3.1")
    p.add_argument("--only", help="comma-separated node name prefixes to quantise (default: every node)")
    p.add_argument("--scenes", type=int, default=6)
    p.add_argument("--shipped", action="store_true",
                   help="measure the model's shipped int8 decoder (training.train_int8) on the test split instead")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/int8.json"))
    args = p.parse_args(argv)
    if args.shipped:
        return report.save({"model": args.model, **test_figures(model_dir(args.model))}, args.out)
    return report.save(run(args.model, args.only.split(",") if args.only else None, args.scenes), args.out)


if __name__ == "__main__":
    main()
