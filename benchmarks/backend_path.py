"""The services as a back end runs them against the CLI: compress and decompress of a full-resolution
scene (the Major-TOM L2A scene, 1068 x 1068 px) through the published process graphs on the
embedded engine, which calls the UDF the way openeo-geopyspark-driver does (``run_udf_code`` on
512 px chunks plus overlap, NaN-padded at the scene's border), beside the CLI's block-by-block path
(variable-rate models) or the codec run on the whole scene in one piece (corsa512, whose CLI is the
engine itself). PSNR (peak 10000) over the scene and in its outer 8 px, and how many decoded values
agree.

    python -m benchmarks.backend_path --out benchmarks/results/backend_path.json

Targets (issue 24): the back-end path within 0.05 dB of the CLI over the scene, within 0.5 dB in
the outer 8 px, for every shipped model.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

from corsa.app import cli
from corsa.codec.codebook import CodebookCodec
from corsa.codec.models import MODELS_DIR, read_card
from corsa.formats.datasets import LOADERS, default_data_root
from corsa.app.sample import write_input
from corsa.core.metrics import psnr

EDGE = 8


def shipped_codecs() -> list[str]:
    """The models a compress service can run: every card with an encoder."""
    return sorted(p.parent.name for p in MODELS_DIR.glob("*/model_card.json") if "encoder" in read_card(p.parent)[1]["files"])


def edge_mask(shape: tuple[int, int], width: int = EDGE) -> np.ndarray:
    """True within ``width`` px of the scene's sides."""
    inner = np.zeros(shape, bool)
    inner[width:-width, width:-width] = True
    return ~inner


def _decoded(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _round_trip(src: Path, work: Path, model: str, engine: bool) -> np.ndarray:
    extra = ["--engine"] if engine else []
    assert cli.main(["compress", str(src), "-o", str(work / "product"), "--model", model, "-q", *extra]) == 0
    assert cli.main(["decompress", str(work / "product"), "-o", str(work / "out.tif"), "-q", *extra]) == 0
    return _decoded(work / "out.tif")


def figures(reference: np.ndarray, decoded: np.ndarray) -> dict:
    edge = edge_mask(reference.shape[1:])
    return {"psnr": psnr(reference, decoded),
            "psnr_outer_8px": psnr(reference[:, edge][:, None], decoded[:, edge][:, None])}


def run(models: list[str]) -> dict:
    scene = next(LOADERS["majortom"](default_data_root()))
    out = {"scene": f"{scene.name} ({scene.data.shape[1]} x {scene.data.shape[2]} px)", "cpu": platform.processor()
           or platform.machine(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        src = write_input(scene, Path(tmp) / "scene.tif")
        for model in models:
            row = {}
            t = time.perf_counter()
            (Path(tmp) / model / "backend").mkdir(parents=True)
            backend = _round_trip(src, Path(tmp) / model / "backend", model, engine=True)
            row["backend_s"] = time.perf_counter() - t
            t = time.perf_counter()
            if read_card(model)[1].get("kind") == "variable-rate":
                (Path(tmp) / model / "cli").mkdir()
                reference = _round_trip(src, Path(tmp) / model / "cli", model, engine=False)
                row["reference"] = "CLI, block by block"
            else:
                codec = CodebookCodec(model)
                idx0, idx1 = codec.encode(scene.data)
                reference = np.where((scene.data == 0).all(0), 0, codec.decode(idx0, idx1, scene.data.shape[1:]))
                row["reference"] = "the codec on the whole scene in one piece"
            row["reference_s"] = time.perf_counter() - t
            row["backend"], row["cli"] = figures(scene.data, backend), figures(scene.data, reference)
            row["delta_db"] = row["backend"]["psnr"] - row["cli"]["psnr"]
            row["delta_outer_8px_db"] = row["backend"]["psnr_outer_8px"] - row["cli"]["psnr_outer_8px"]
            diff = np.abs(backend.astype(np.int32) - reference.astype(np.int32))
            row["identical_values"] = float((diff == 0).mean())
            row["max_diff_dn"] = int(diff.max())
            out["models"][model] = row
            print(f"{model}: back end {row['backend']['psnr']:.3f} dB (outer 8 px {row['backend']['psnr_outer_8px']:.2f}), "
                  f"CLI {row['cli']['psnr']:.3f} ({row['cli']['psnr_outer_8px']:.2f}): "
                  f"{row['delta_db']:+.3f} / {row['delta_outer_8px_db']:+.2f} dB; "
                  f"{100 * row['identical_values']:.2f}% identical", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=None, help="model ids (default: every shipped codec)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = run(args.models or shipped_codecs())
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
