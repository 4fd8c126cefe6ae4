"""Train the per-pixel SCL classifier on codec features and, as the reference, on raw bands; export ONNX.

    python -m training.classify --codec corsa512 --name corsa512-scl

Both classifiers have the same architecture (a 3 x 3 convolution and two 1 x 1 layers on the 20 m
grid) and the same training (seeded, class-weighted cross entropy, model selection by validation
macro F1); they differ only in their input: the codebook vectors [f0, f1 upsampled to 20 m] (128
values) or the 10 bands averaged over each 2 x 2 cell. Labels: training/scl_labels.py. Split:
training/split.json (WorldStrat locations). Features and labels are cached in runs/scl_cache/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from torch import nn
from torch.nn import functional as F

from corsa.codec import OnnxCodec, sha256_file
from corsa.datasets import default_data_root, load_worldstrat

from .scl_labels import CLASSES, mean_grid20, merge_scl, to_grid20

ROOT = Path(__file__).resolve().parents[1]
SPLIT_FILE = ROOT / "training" / "split.json"
OPSET = 17
KINDS = ("features", "bands")


def cache_scenes(codec_name: str, cache: Path) -> list[dict]:
    """Every WorldStrat scene with an SCL file: codec features, 20 m band means and labels (cached)."""
    cache.mkdir(parents=True, exist_ok=True)
    index_path = cache / "index.json"
    codec = OnnxCodec(codec_name, threads=1)
    features_sha = codec.card["files"]["features"]["sha256"]
    if index_path.is_file():
        cached = json.loads(index_path.read_text())
        if isinstance(cached, dict) and cached.get("features_sha256") == features_sha:  # else rebuilt
            return cached["scenes"]
    index = []
    for scene in load_worldstrat(default_data_root()):
        scl_path = scene.extra.get("scl")
        if not scl_path:
            continue
        with rasterio.open(scl_path) as src:
            scl = src.read(1)
        with rasterio.open(scl_path.replace("-SCL.tif", "-CLM.tif")) as src:
            clm = src.read(1)
        f0, f1 = codec.features(*codec.encode(scene.data))
        label = to_grid20(merge_scl(scl))
        # A 20 m cell is cloudy in the CLM when at least 2 of its 4 pixels are.
        clm20 = to_grid20(np.where(clm > 0, 5, 1).astype(np.uint8), min_votes=0) == 5
        np.savez_compressed(cache / f"{scene.name}.npz", f0=f0.astype(np.float16), f1=f1.astype(np.float16),
                            bands=mean_grid20(scene.data), label=label, clm=clm20)
        index.append({"name": scene.name, "location": scene.location})
    index_path.write_text(json.dumps({"features_sha256": features_sha, "scenes": index}, indent=1))
    return index


def load_split(cache: Path, index: list[dict], split: str) -> list[dict]:
    wanted = set(json.loads(SPLIT_FILE.read_text())[split])
    out = []
    for entry in index:
        if entry["location"] in wanted:
            with np.load(cache / f"{entry['name']}.npz") as z:
                out.append({**entry, **{k: z[k] for k in z.files}})
    return out


class Classifier(nn.Module):
    """Standardise the input, then conv 3x3 -> ReLU -> conv 1x1 -> ReLU -> conv 1x1 (class logits)."""

    def __init__(self, channels: int, classes: int, width: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
                                 nn.Conv2d(width, width, 1), nn.ReLU(), nn.Conv2d(width, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class FeatureClassifier(nn.Module):
    """f0 (64, 20 m), f1 (64, 40 m) -> logits on the 20 m grid."""

    def __init__(self, dim0: int, dim1: int, classes: int, width: int = 32):
        super().__init__()
        self.head = Classifier(dim0 + dim1, classes, width)

    def forward(self, f0: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([f0, F.interpolate(f1, scale_factor=2.0, mode="nearest")], 1))


class BandClassifier(nn.Module):
    """10 bands (DN, 2 x 2 means on the 20 m grid) -> logits on the 20 m grid."""

    def __init__(self, bands: int, classes: int, width: int = 32):
        super().__init__()
        self.head = Classifier(bands, classes, width)

    def forward(self, bands: torch.Tensor) -> torch.Tensor:
        return self.head(bands)


def inputs_of(scene: dict, kind: str) -> tuple[torch.Tensor, ...]:
    if kind == "features":
        return (torch.from_numpy(scene["f0"].astype(np.float32))[None],
                torch.from_numpy(scene["f1"].astype(np.float32))[None])
    return (torch.from_numpy(scene["bands"])[None],)


def build(kind: str, scenes: list[dict], width: int) -> nn.Module:
    n = len(CLASSES)
    if kind == "features":
        model = FeatureClassifier(scenes[0]["f0"].shape[0], scenes[0]["f1"].shape[0], n, width)
        stack = np.concatenate([np.concatenate([s["f0"].reshape(s["f0"].shape[0], -1),
                                                np.repeat(np.repeat(s["f1"], 2, 1), 2, 2).reshape(s["f1"].shape[0], -1)])
                                for s in scenes], 1).astype(np.float32)
    else:
        model = BandClassifier(scenes[0]["bands"].shape[0], n, width)
        stack = np.concatenate([s["bands"].reshape(s["bands"].shape[0], -1) for s in scenes], 1)
    model.head.mean[:] = torch.from_numpy(stack.mean(1))[None, :, None, None]
    model.head.std[:] = torch.from_numpy(stack.std(1) + 1e-6)[None, :, None, None]
    return model


def confusion(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Rows: SCL class, columns: predicted class; labelled cells only (values 1..n)."""
    n = len(CLASSES)
    keep = label > 0
    return np.bincount((label[keep].astype(int) - 1) * n + pred[keep].astype(int) - 1,
                       minlength=n * n).reshape(n, n)


def scores(cm: np.ndarray) -> dict:
    """Overall accuracy, macro F1 over the classes present in the labels, per-class F1."""
    tp = np.diag(cm).astype(float)
    f1 = 2 * tp / np.maximum(cm.sum(0) + cm.sum(1), 1)
    present = cm.sum(1) > 0
    return {"overall_accuracy": float(tp.sum() / max(cm.sum(), 1)), "macro_f1": float(f1[present].mean()),
            "f1": {CLASSES[i][1]: round(float(f1[i]), 4) for i in range(len(CLASSES)) if present[i]}}


def predict_torch(model: nn.Module, scene: dict, kind: str) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs_of(scene, kind))[0].argmax(0).numpy().astype(np.uint8) + 1


def evaluate(model: nn.Module, scenes: list[dict], kind: str) -> dict:
    cm = sum(confusion(predict_torch(model, s, kind), s["label"]) for s in scenes)
    return {**scores(cm), "confusion": cm.tolist()}


def train(kind: str, train_set: list[dict], val_set: list[dict], steps: int, batch: int, crop: int,
          width: int, seed: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build(kind, train_set, width)
    counts = np.bincount(np.concatenate([s["label"].ravel() for s in train_set]), minlength=len(CLASSES) + 1)[1:]
    weight = 1 / np.sqrt(np.maximum(counts, 1))
    weight = torch.tensor(weight / weight.mean(), dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best, best_state, log = -1.0, None, []
    for step in range(1, steps + 1):
        xs, ys = [], []
        for i in rng.integers(len(train_set), size=batch):
            s = train_set[i]
            h, w = s["label"].shape
            y0 = 2 * rng.integers((h - crop) // 2 + 1)
            x0 = 2 * rng.integers((w - crop) // 2 + 1)
            ys.append(torch.from_numpy(s["label"][y0:y0 + crop, x0:x0 + crop].astype(np.int64) - 1))
            if kind == "features":
                xs.append((s["f0"][:, y0:y0 + crop, x0:x0 + crop],
                           s["f1"][:, y0 // 2:(y0 + crop) // 2, x0 // 2:(x0 + crop) // 2]))
            else:
                xs.append((s["bands"][:, y0:y0 + crop, x0:x0 + crop],))
        args = [torch.from_numpy(np.stack([x[j] for x in xs]).astype(np.float32)) for j in range(len(xs[0]))]
        loss = F.cross_entropy(model(*args), torch.stack(ys), weight=weight, ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            model.eval()
            val = evaluate(model, val_set, kind)
            model.train()
            log.append({"step": step, "loss": round(loss.item(), 4), "val_macro_f1": round(val["macro_f1"], 4)})
            print(kind, log[-1], flush=True)
            if val["macro_f1"] > best:
                best, best_state = val["macro_f1"], {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return model, {"log": log, "best_val_macro_f1": round(best, 4)}


def export_onnx(model: nn.Module, kind: str, path: Path) -> None:
    if kind == "features":
        args = (torch.zeros(1, model.head.mean.shape[1] // 2, 40, 40), torch.zeros(1, model.head.mean.shape[1] // 2, 20, 20))
        names, axes = ["f0", "f1"], {"f0": {2: "h0", 3: "w0"}, "f1": {2: "h1", 3: "w1"}, "logits": {2: "h0", 3: "w0"}}
    else:
        args = (torch.zeros(1, model.head.mean.shape[1], 40, 40),)
        names, axes = ["bands"], {"bands": {2: "h0", 3: "w0"}, "logits": {2: "h0", 3: "w0"}}
    # The TorchScript exporter writes one self-contained file with dynamic H, W.
    torch.onnx.export(model, args, str(path), input_names=names, output_names=["logits"],
                      dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def card_markdown(card: dict) -> str:
    rows = "\n".join(f"| {c['value']} | {c['name']} | {', '.join(map(str, c['scl']))} | {c['color']} |"
                     for c in card["classes"])
    t = card["test"]
    lines = [f"| {k} | {v['overall_accuracy']:.3f} | {v['macro_f1']:.3f} | "
             + ", ".join(f"{n} {f:.2f}" for n, f in v["f1"].items()) + " |" for k, v in t.items()]
    return f"""# Model card: {card['id']}

{card['description']}

| value | class | SCL codes merged | colour (RGB) |
|---|---|---|---|
{rows}

0 = no data / no class. SCL 7 (unclassified) and 0/1 carry no label.

- Input of `classifier.onnx`: `f0` (1, {card['input']['dim0']}, h0, w0) and `f1` (1, {card['input']['dim1']}, h0/2, w0/2),
  the codebook vectors of `{card['codec']['id']}` (`features.onnx` of that model, sha256
  {card['codec']['features_sha256'][:12]}...); output `logits` (1, {len(card['classes'])}, h0, w0): the class
  value is argmax + 1. Standardisation is inside the model.
- `reference_bands.onnx`: the same architecture on the 10 bands (DN, mean of each 2 x 2 cell): the reference
  of the benchmark only, not used by the service.
- Architecture: {card['architecture']}.
- Training: `{card['training']['command']}`, {card['training']['wall_time_s']:.0f} s on {card['training']['machine']};
  labels {card['training']['labels']}; split {card['training']['split']}.
- Test locations ({t['features']['cells']:,} labelled 20 m cells):

| input | overall accuracy | macro F1 | F1 per class |
|---|---|---|---|
{chr(10).join(lines)}

Confusion matrices and throughput: BENCHMARKS.md (`python -m benchmarks.classify`).
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", default="corsa512")
    p.add_argument("--name", default="corsa512-scl")
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "scl_cache")
    p.add_argument("--out", type=Path, default=ROOT / "models_onnx")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=48)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    index = cache_scenes(args.codec, args.cache)
    sets = {s: load_split(args.cache, index, s) for s in ("train", "val", "test")}
    out = args.out / args.name
    out.mkdir(parents=True, exist_ok=True)
    models, logs, test = {}, {}, {}
    for kind in KINDS:
        models[kind], logs[kind] = train(kind, sets["train"], sets["val"], args.steps, args.batch, args.crop,
                                         args.width, args.seed)
        res = evaluate(models[kind], sets["test"], kind)
        test[kind] = {k: res[k] for k in ("overall_accuracy", "macro_f1", "f1")} | {"cells": int(np.sum(res["confusion"]))}
    files = {"classifier": "classifier.onnx", "reference_bands": "reference_bands.onnx"}
    export_onnx(models["features"], "features", out / files["classifier"])
    export_onnx(models["bands"], "bands", out / files["reference_bands"])
    torch.save({k: m.state_dict() for k, m in models.items()}, out / "torch_state.pt")
    codec = OnnxCodec(args.codec)
    wall = time.time() - t0
    card = {
        "id": args.name, "format_version": 1,
        "description": f"Per-pixel Sen2Cor scene classes on the 20 m grid from the {args.codec} codebook vectors "
                       "(no decoding), trained on WorldStrat SCL maps.",
        "classes": [{"value": v, "name": n, "scl": list(c), "color": list(rgb)} for v, n, c, rgb in CLASSES],
        "nodata_value": 0,
        "codec": {"id": codec.model_id, "features_sha256": codec.card["files"]["features"]["sha256"],
                  "decoder_sha256": codec.card["files"]["decoder"]["sha256"]},
        "input": {"dim0": int(sets["train"][0]["f0"].shape[0]), "dim1": int(sets["train"][0]["f1"].shape[0]),
                  "grid": "level-0 grid of the codec (20 m); f1 on the level-1 grid (40 m)"},
        "architecture": f"conv 3x3 ({args.width}) - ReLU - conv 1x1 ({args.width}) - ReLU - conv 1x1, "
                        "input standardised with training means/stds",
        "receptive_radius_px": {"grid20": 1, "grid10": 2},
        "training": {"command": "python -m training.classify " + " ".join(
                         f"--{k} {v}" for k, v in (("codec", args.codec), ("name", args.name), ("steps", args.steps),
                                                   ("batch", args.batch), ("crop", args.crop), ("width", args.width),
                                                   ("seed", args.seed))),
                     "wall_time_s": round(wall, 1), "machine": "2-core Xeon, torch 1 thread",
                     "labels": "training/scl_labels.py (mode of merged SCL over each 2x2 cell)",
                     "split": "training/split.json (WorldStrat locations)",
                     "scenes": {k: len(v) for k, v in sets.items()}, **{f"{k}_log": v for k, v in logs.items()}},
        "test": test,
        "files": {},
    }
    for key, name in files.items():
        card["files"][key] = {"path": name, "sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
    (out / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(card_markdown(card))
    print(json.dumps(test, indent=1), f"\n{wall:.0f} s")


if __name__ == "__main__":
    main()
