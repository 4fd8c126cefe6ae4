"""Scene classes from the compressed features against the same classifier on raw bands (issue 5).

    python -m benchmarks.classify            # writes benchmarks/results/classify.json and classify.md

On the test locations of training/split.json: overall accuracy, macro F1 and confusion matrix of
classifier.onnx (codebook vectors) and reference_bands.onnx (10 bands, 2 x 2 means), both run with
onnxruntime; the cloud / cloud-shadow mask (classes cloud + shadow/dark) against the SCL and the
Sentinel Hub cloud mask (CLM); throughput of index grids -> classes on one thread.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from corsa.blocks.classmap import DEFAULT_CLASSIFIER, Classifier
from corsa.codec.codebook import CodebookCodec
from training.classify import ROOT, cache_scenes, confusion, load_split, scores
from training.scl_labels import CLASSES, CLOUD_CLASSES

RESULTS = ROOT / "benchmarks" / "results"


def predict(session, scene: dict, kind: str) -> np.ndarray:
    feeds = ({"f0": scene["f0"][None].astype(np.float32), "f1": scene["f1"][None].astype(np.float32)}
             if kind == "features" else {"bands": scene["bands"][None]})
    (logits,) = session.run(None, feeds)
    return (logits[0].argmax(0) + 1).astype(np.uint8)


def mask_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "f1": 2 * tp / max(2 * tp + fp + fn, 1),
            "accuracy": float((pred == truth).mean()), "positives": int(truth.sum()), "cells": int(truth.size)}


def throughput(codec: CodebookCodec, clf: Classifier, size: int = 1024, repeats: int = 3) -> float:
    """Megapixels (10 m) per second, index grids -> class values, on a real index map tiled to size."""
    from corsa.formats.datasets import LOADERS, default_data_root

    scene = next(LOADERS["majortom"](default_data_root()))
    idx0, idx1 = codec.encode(scene.data[:, :512, :512])
    reps = size // 512
    idx0, idx1 = np.tile(idx0, (reps, reps)), np.tile(idx1, (reps, reps))
    best = min(_timed(lambda: clf.predict(codec, idx0, idx1)) for _ in range(repeats))
    return size * size / 1e6 / best


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def run(classifier: str) -> dict:
    clf = Classifier(classifier, threads=1)
    codec = CodebookCodec(clf.card["codec"]["id"], threads=1)
    clf.check_codec(codec)
    cache = ROOT / "runs" / "scl_cache"
    test = load_split(cache / codec.model_id, cache_scenes(codec.model_id, cache), "test")
    sessions = {"features": clf.session,
                "bands": _session(clf.path / clf.card["files"]["reference_bands"]["path"])}
    out: dict = {"scenes": len(test), "locations": sorted({s["location"] for s in test}), "classes": clf.names}
    for kind, sess in sessions.items():
        preds = [predict(sess, s, kind) for s in test]
        cm = sum(confusion(p, s["label"]) for p, s in zip(preds, test))
        labelled = [s["label"] > 0 for s in test]
        cloud_pred = np.concatenate([np.isin(p, CLOUD_CLASSES)[m] for p, m in zip(preds, labelled)])
        out[kind] = {**scores(cm), "confusion": cm.tolist(),
                     "cloud_mask_vs_scl": mask_scores(cloud_pred, np.concatenate(
                         [np.isin(s["label"], CLOUD_CLASSES)[m] for s, m in zip(test, labelled)])),
                     "cloud_vs_clm": mask_scores(np.concatenate([(p == CLOUD_CLASSES[0]).ravel() for p in preds]),
                                                 np.concatenate([s["clm"].ravel() for s in test]))}
    out["throughput_mp_per_s_1thread"] = round(throughput(codec, clf), 2)
    return out


def _session(path: Path):
    import corsa_udf

    return corsa_udf.session(str(path), 1)


def markdown(res: dict) -> str:
    names = [name for _, name, *_ in CLASSES]
    lines = ["| input | overall accuracy | macro F1 | " + " | ".join(f"F1 {n}" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for kind in ("features", "bands"):
        r = res[kind]
        lines.append(f"| {kind} | {r['overall_accuracy']:.3f} | {r['macro_f1']:.3f} | "
                     + " | ".join(f"{r['f1'][n]:.3f}" if n in r["f1"] else "no test cell" for n in names) + " |")
    for kind in ("features", "bands"):
        lines += ["", f"Confusion matrix, {kind} (rows: SCL class, columns: predicted; 20 m cells):", "",
                  "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {n} | " + " | ".join(str(v) for v in row) + " |" for n, row in zip(names, res[kind]["confusion"])]
    lines += ["", "| input | mask | precision | recall | F1 | accuracy |", "|---|---|---|---|---|---|"]
    for kind in ("features", "bands"):
        for key, what in (("cloud_mask_vs_scl", "cloud + shadow vs SCL"), ("cloud_vs_clm", "cloud vs CLM")):
            m = res[kind][key]
            lines.append(f"| {kind} | {what} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['accuracy']:.3f} |")
    lines += ["", f"Throughput, index grids -> classes (features.onnx + classifier.onnx, 1 thread): "
                  f"{res['throughput_mp_per_s_1thread']} MP/s (10 m pixels)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER)
    res = run(p.parse_args().classifier)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "classify.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "classify.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
