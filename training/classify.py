"""Train the per-pixel classifiers on codec features and, as references, on raw (and decoded)
bands; export ONNX.

    python -m training.classify --codec corsa512 --name corsa512-scl     # a codebook model: its own folder
    python -m training.classify --codec corsa3.1                         # a variable-rate model: scl.onnx in it
    python -m training.classify --codec corsa3.1 --classes landcover     # its land-cover head, landcover.onnx

The classifiers of one codec have the same architecture and training (seeded, class-weighted cross
entropy, model selection by validation macro F1); they differ only in their input. Codebook models:
a 3 x 3 convolution and two 1 x 1 layers on the 20 m grid over the codebook vectors [f0, f1 upsampled]
or the 10 bands averaged over each 2 x 2 cell. Variable-rate models: two 3 x 3 convolutions and a
1 x 1 on the 40 m latent grid, the latent dequantised at a level drawn per crop (any level the
product has), its classes on the 20 m grid by a pixel shuffle; the references see the 10 bands
(raw, or decoded at the default level) through the same layers on 4 x 4 means. Labels and split:
scene classes, training/scl_labels.py and training/split.json (WorldStrat locations); land cover,
training/landcover_labels.py (its places carry their split). Inputs and labels are cached in
runs/<classes>_cache/<codec>/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import rasterio
import torch
from torch import nn
from torch.nn import functional as F

from corsa.core.machine import cpu_name
from corsa.codec.codebook import CodebookCodec
from corsa.codec.models import VariableRateCodec, read_card, sha256_file
from corsa.formats.datasets import default_data_root, load_worldstrat

from . import landcover_labels
from .scl_labels import CLASSES, mean_grid20, merge_scl, to_grid20

ROOT = Path(__file__).resolve().parents[1]
SPLIT_FILE = ROOT / "training" / "split.json"
OPSET = 17
KINDS = {"codebook": ("features", "bands"), "variable-rate": ("latent", "bands", "decoded")}
# The class sets a variable-rate model's heads are trained for: classes, labels, description
LABELS = {
    "scl": (CLASSES, "training/scl_labels.py (mode of merged SCL over each 2x2 cell), WorldStrat",
            "training/split.json (WorldStrat locations)",
            "Sen2Cor-like scene classes"),
    "landcover": (landcover_labels.CLASSES,
                  "training/landcover_labels.py (mode over each 2x2 cell): TerraMesh LULC maps, the BigEarthNet "
                  "CORINE reference map, BigEarthNet patches of one CORINE class",
                  "training/landcover_labels.py (TerraMesh quadrants and BigEarthNet patches, turning per source)",
                  "land-cover classes (Impact Observatory's 9)"),
}


def open_any(codec_name: str):
    """The codec of a model id: its kind decides the classifier's input."""
    _, card = read_card(codec_name)
    if card.get("kind") == "variable-rate":
        return VariableRateCodec(codec_name, threads=1)
    return CodebookCodec(codec_name, threads=1)


def _inputs(codec, scene) -> dict:
    """What the classifiers of ``codec`` read of one scene (float16 where large)."""
    if isinstance(codec, VariableRateCodec):
        latent = codec.latent(scene.data)
        decoded = codec.decode(codec.quantise(latent, codec.default_quality), codec.default_quality, scene.data.shape[1:])
        decoded = np.where((scene.data == 0).all(0), 0, decoded)
        return {"latent": latent.astype(np.float16), "decoded": mean_grid20(decoded)}
    f0, f1 = codec.features(*codec.encode(scene.data))
    return {"f0": f0.astype(np.float16), "f1": f1.astype(np.float16)}


def _cached(codec_name: str, cache: Path, build) -> list[dict]:
    """The index of the cache folder ``cache``/<codec>: its scenes' .npz files, made by
    ``build(codec, folder)`` (which returns the index) and made again when the codec's encoder changes."""
    folder = cache / codec_name
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / "index.json"
    codec = open_any(codec_name)
    encoder_sha = codec.card["files"]["encoder"]["sha256"]
    if index_path.is_file():
        cached = json.loads(index_path.read_text())
        if isinstance(cached, dict) and cached.get("encoder_sha256") == encoder_sha:
            return cached["scenes"]
    index = build(codec, folder)
    index_path.write_text(json.dumps({"encoder_sha256": encoder_sha, "scenes": index}, indent=1))
    return index


def cache_scenes(codec_name: str, cache: Path) -> list[dict]:
    """Every WorldStrat scene with an SCL file: codec inputs, 20 m band means and labels (cached
    under ``cache``/<codec>)."""
    def build(codec, folder: Path) -> list[dict]:
        index = []
        for scene in load_worldstrat(default_data_root()):
            scl_path = scene.extra.get("scl")
            if not scl_path:
                continue
            with rasterio.open(scl_path) as src:
                scl = src.read(1)
            with rasterio.open(scl_path.replace("-SCL.tif", "-CLM.tif")) as src:
                clm = src.read(1)
            label = to_grid20(merge_scl(scl))
            # A 20 m cell is cloudy in the CLM when at least 2 of its 4 pixels are.
            clm20 = to_grid20(np.where(clm > 0, 5, 1).astype(np.uint8), min_votes=0) == 5
            np.savez_compressed(folder / f"{scene.name}.npz", **_inputs(codec, scene), bands=mean_grid20(scene.data),
                                label=label, clm=clm20)
            index.append({"name": scene.name, "location": scene.location})
        return index

    return _cached(codec_name, cache, build)


def cache_landcover(codec_name: str, cache: Path) -> list[dict]:
    """Every land-cover place (training/landcover_labels.py): codec inputs computed on the whole
    scene it lies in, then cut to the place (cached as ``cache_scenes``)."""
    def build(codec, folder: Path) -> list[dict]:
        index, done = [], {}
        values = tuple(v for v, *_ in landcover_labels.CLASSES)
        for place in landcover_labels.places():
            key = id(place["context"])
            if key not in done:
                done = {key: (_inputs(codec, SimpleNamespace(data=place["context"])), mean_grid20(place["context"]))}
            inputs, bands = done[key]
            rows, cols = place["window"]
            cut = {k: v[:, _scaled(rows, 2 if k == "decoded" else 4), _scaled(cols, 2 if k == "decoded" else 4)]
                   for k, v in inputs.items()}
            np.savez_compressed(folder / f"{place['name']}.npz", **cut,
                                bands=bands[:, _scaled(rows, 2), _scaled(cols, 2)],
                                label=to_grid20(place["label"], values=values))
            index.append({k: place[k] for k in ("name", "location", "split", "source")})
        return index

    return _cached(codec_name, cache, build)


def _scaled(s: slice, factor: int) -> slice:
    """A 10 m window's slice on a grid ``factor`` times coarser (the window starts on a whole cell)."""
    return slice(None if s.start is None else s.start // factor, None if s.stop is None else -(-s.stop // factor))


def load_split(cache: Path, index: list[dict], split: str) -> list[dict]:
    wanted = None if all("split" in e for e in index) else set(json.loads(SPLIT_FILE.read_text())[split])
    out = []
    for entry in index:
        if (entry["split"] == split) if wanted is None else (entry["location"] in wanted):
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


class GridHead(nn.Module):
    """Standardise; conv 3x3 -> ReLU -> conv 3x3 -> ReLU -> conv 1x1 on the 40 m grid; a pixel
    shuffle gives the logits on the 20 m grid. ``unshuffle``: the input lies on the 20 m grid (band
    means), its 2 x 2 cells stacked into channels first."""

    def __init__(self, channels: int, classes: int, width: int = 64, unshuffle: bool = False):
        super().__init__()
        self.unshuffle = unshuffle
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))
        inner = channels * 4 if unshuffle else channels
        self.net = nn.Sequential(nn.Conv2d(inner, width, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
                                 nn.Conv2d(width, 4 * classes, 1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.net(F.pixel_unshuffle(x, 2) if self.unshuffle else x)


def dequantised(latent: np.ndarray, gain: np.ndarray, inv_gain: np.ndarray) -> np.ndarray:
    """A float latent as a product at one level gives it to the decoder (and to the head)."""
    return (np.rint(latent.astype(np.float32) * gain[:, None, None]) * inv_gain[:, None, None]).astype(np.float32)


def inputs_of(scene: dict, kind: str, levels=None) -> tuple[torch.Tensor, ...]:
    """The classifier's inputs of a cached scene; ``levels``: (gain, inv_gain) of the latent's level."""
    if kind == "features":
        return (torch.from_numpy(scene["f0"].astype(np.float32))[None],
                torch.from_numpy(scene["f1"].astype(np.float32))[None])
    if kind == "latent":
        return (torch.from_numpy(dequantised(scene["latent"], *levels))[None],)
    return (torch.from_numpy(scene[kind].astype(np.float32))[None],)


def build(kind: str, scenes: list[dict], width: int, levels=None, n: int = len(CLASSES), all_levels=None) -> nn.Module:
    """``levels``: (gain, inv_gain) of the default level; ``all_levels``: (gains, inv_gains) of every level."""
    if kind == "features":
        model = FeatureClassifier(scenes[0]["f0"].shape[0], scenes[0]["f1"].shape[0], n, width)
        stack = np.concatenate([np.concatenate([s["f0"].reshape(s["f0"].shape[0], -1),
                                                np.repeat(np.repeat(s["f1"], 2, 1), 2, 2).reshape(s["f1"].shape[0], -1)])
                                for s in scenes], 1).astype(np.float32)
        head = model.head
    elif levels is None:
        model = BandClassifier(scenes[0]["bands"].shape[0], n, width)
        stack = np.concatenate([s["bands"].reshape(s["bands"].shape[0], -1) for s in scenes], 1)
        head = model.head
    else:
        # A latent's statistics over every level: channels that the low levels round to zero must
        # not be blown up at the high ones.
        every = [levels] if kind != "latent" or all_levels is None else list(zip(*all_levels))
        data = [inputs_of(s, kind, lv)[0][0].numpy() for s in scenes for lv in every]
        model = head = GridHead(data[0].shape[0], n, width, unshuffle=kind != "latent")
        stack = np.concatenate([d.reshape(d.shape[0], -1) for d in data], 1)
    head.mean[:] = torch.from_numpy(stack.mean(1))[None, :, None, None]
    head.std[:] = torch.from_numpy(stack.std(1) + 1e-6)[None, :, None, None]
    return model


def confusion(pred: np.ndarray, label: np.ndarray, n: int = len(CLASSES)) -> np.ndarray:
    """Rows: labelled class, columns: predicted class; labelled cells only (values 1..n)."""
    keep = label > 0
    return np.bincount((label[keep].astype(int) - 1) * n + pred[keep].astype(int) - 1,
                       minlength=n * n).reshape(n, n)


def scores(cm: np.ndarray, classes: tuple = CLASSES) -> dict:
    """Overall accuracy, macro F1 over the classes present in the labels, per-class F1."""
    tp = np.diag(cm).astype(float)
    f1 = 2 * tp / np.maximum(cm.sum(0) + cm.sum(1), 1)
    present = cm.sum(1) > 0
    return {"overall_accuracy": float(tp.sum() / max(cm.sum(), 1)), "macro_f1": float(f1[present].mean()),
            "f1": {classes[i][1]: round(float(f1[i]), 4) for i in range(len(classes)) if present[i]}}


def predict_torch(model: nn.Module, scene: dict, kind: str, levels=None) -> np.ndarray:
    with torch.no_grad():
        logits = model(*inputs_of(scene, kind, levels))[0]
    h, w = scene["label"].shape
    return logits[:, :h, :w].argmax(0).numpy().astype(np.uint8) + 1


def evaluate(model: nn.Module, scenes: list[dict], kind: str, levels=None, classes: tuple = CLASSES) -> dict:
    cm = sum(confusion(predict_torch(model, s, kind, levels), s["label"], len(classes)) for s in scenes)
    return {**scores(cm, classes), "confusion": cm.tolist()}


def _crop(s: dict, kind: str, y0: int, x0: int, crop: int, levels) -> tuple[np.ndarray, ...]:
    """One training crop's inputs: ``crop`` 20 m cells from (y0, x0), even."""
    if kind == "features":
        return (s["f0"][:, y0:y0 + crop, x0:x0 + crop], s["f1"][:, y0 // 2:(y0 + crop) // 2, x0 // 2:(x0 + crop) // 2])
    if kind == "latent":
        return (dequantised(s["latent"][:, y0 // 2:(y0 + crop) // 2, x0 // 2:(x0 + crop) // 2], *levels),)
    return (s[kind][:, y0:y0 + crop, x0:x0 + crop],)


def train(kind: str, train_set: list[dict], val_set: list[dict], steps: int, batch: int, crop: int,
          width: int, seed: int, tables=None, classes: tuple = CLASSES) -> tuple[nn.Module, dict]:
    """``tables``: (gain, inv_gain, default level) of a variable-rate codec: its heads are GridHeads,
    the latent dequantised at a level drawn per crop and validated at the default level."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    default = (tables[0][tables[2]], tables[1][tables[2]]) if tables else None
    model = build(kind, train_set, width, default, len(classes), tables[:2] if tables else None)
    counts = np.bincount(np.concatenate([s["label"].ravel() for s in train_set]), minlength=len(classes) + 1)[1:]
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
            level = int(rng.integers(len(tables[0]))) if tables else None
            xs.append(_crop(s, kind, y0, x0, crop, (tables[0][level], tables[1][level]) if tables else None))
        args = [torch.from_numpy(np.stack([x[j] for x in xs]).astype(np.float32)) for j in range(len(xs[0]))]
        loss = F.cross_entropy(model(*args), torch.stack(ys), weight=weight, ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            model.eval()
            val = evaluate(model, val_set, kind, default, classes)
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
        head = model if isinstance(model, GridHead) else model.head
        name = "latent" if kind == "latent" else "bands"
        args = (torch.zeros(1, head.mean.shape[1], 40, 40),)
        names, axes = [name], {name: {2: "h", 3: "w"}, "logits": {2: "h0", 3: "w0"}}
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


def train_head(codec: VariableRateCodec, sets: dict, args: argparse.Namespace, t0: float) -> None:
    """A variable-rate model's head for one class set (``args.classes``: <classes>.onnx in its
    folder, listed in its card's "heads"), with the raw- and decoded-band references' test figures
    beside it, over the test split and per source."""
    classes, labels, split, what = LABELS[args.classes]
    gain, inv_gain, _ = codec._tables
    level = codec.level(codec.default_quality)
    width = args.width or 64
    models, logs, test = {}, {}, {}
    for kind in KINDS["variable-rate"]:
        models[kind], logs[kind] = train(kind, sets["train"], sets["val"], args.steps, args.batch, args.crop,
                                         width, args.seed, (gain, inv_gain, level), classes)
        per_level = {}
        for q in codec.qualities if kind == "latent" else [codec.default_quality]:
            k = codec.level(q)
            res = evaluate(models[kind], sets["test"], kind, (gain[k], inv_gain[k]), classes)
            per_level[q] = {k2: res[k2] for k2 in ("overall_accuracy", "macro_f1", "f1")} | {
                "cells": int(np.sum(res["confusion"])), "confusion": res["confusion"]}
        k = codec.level(codec.default_quality)
        by_source = {}
        for source in sorted({s.get("source") or s["location"] for s in sets["test"]}):
            part = [s for s in sets["test"] if (s.get("source") or s["location"]) == source]
            res = evaluate(models[kind], part, kind, (gain[k], inv_gain[k]), classes)
            by_source[source] = {k2: res[k2] for k2 in ("overall_accuracy", "macro_f1", "f1")}
        test[kind] = {"default_quality": per_level[codec.default_quality], "by_source": by_source,
                      **({"by_quality": {q: {k2: v[k2] for k2 in ("overall_accuracy", "macro_f1")}
                                         for q, v in per_level.items()}} if kind == "latent" else {})}
        print(kind, json.dumps(test[kind]["default_quality"]["f1"]), test[kind]["default_quality"]["macro_f1"], flush=True)
    file = f"{args.classes}.onnx"
    path = codec.path / file
    export_onnx(models["latent"], "latent", path)
    card = json.loads((codec.path / "model_card.json").read_text())
    card.setdefault("heads", {})[args.classes] = {
        "path": file, "sha256": sha256_file(path), "bytes": path.stat().st_size,
        "description": f"{what} on the 20 m grid from the dequantised latent (any quality level), no decoding: "
                       "input latent (1, channels, h, w) on the 40 m grid, output logits (1, classes, 2h, 2w); "
                       "class value = argmax + 1, 0 = nodata.",
        "classes": [{"value": v, "name": n, "codes" if args.classes != "scl" else "scl": list(c), "color": list(rgb)}
                    for v, n, c, rgb in classes],
        "architecture": f"standardise - conv 3x3 ({width}) - ReLU - conv 3x3 ({width}) - ReLU - conv 1x1 - pixel shuffle x2",
        "receptive_radius_px": 12,
        "training": {"command": f"python -m training.classify --codec {codec.model_id} --classes {args.classes} "
                                f"--steps {args.steps} --batch {args.batch} --crop {args.crop} --width {width} "
                                f"--seed {args.seed}",
                     "wall_time_s": round(time.time() - t0, 1), "machine": f"{cpu_name()}, torch 1 thread",
                     "labels": labels, "split": split,
                     "scenes": {k: len(v) for k, v in sets.items()}, "log": logs["latent"]},
        "test": {k: {"overall_accuracy": v["default_quality"]["overall_accuracy"],
                     "macro_f1": v["default_quality"]["macro_f1"], "f1": v["default_quality"]["f1"],
                     "cells": v["default_quality"]["cells"], "by_source": v["by_source"],
                     **({"by_quality": v["by_quality"]} if "by_quality" in v else {})} for k, v in test.items()},
    }
    (codec.path / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps(card["heads"][args.classes]["test"], indent=1), f"\n{time.time() - t0:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", default="corsa512")
    p.add_argument("--name", default="corsa512-scl")
    p.add_argument("--classes", choices=sorted(LABELS), default="scl",
                   help="the class set of a variable-rate model's head (codebook models: scl only)")
    p.add_argument("--cache", type=Path, default=None, help="default: runs/<classes>_cache")
    p.add_argument("--out", type=Path, default=ROOT / "models_onnx")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=48)
    p.add_argument("--width", type=int, default=None, help="hidden channels (default: 32 codebook, 64 variable-rate)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    cache = args.cache or ROOT / "runs" / f"{args.classes}_cache"
    index = (cache_landcover if args.classes == "landcover" else cache_scenes)(args.codec, cache)
    sets = {s: load_split(cache / args.codec, index, s) for s in ("train", "val", "test")}
    codec = open_any(args.codec)
    if args.classes != "scl" and not isinstance(codec, VariableRateCodec):
        raise SystemExit(f"--classes {args.classes}: only variable-rate models get such a head")
    if isinstance(codec, VariableRateCodec):
        train_head(codec, sets, args, t0)
        return
    args.width = args.width or 32
    out = args.out / args.name
    out.mkdir(parents=True, exist_ok=True)
    models, logs, test = {}, {}, {}
    for kind in KINDS["codebook"]:
        models[kind], logs[kind] = train(kind, sets["train"], sets["val"], args.steps, args.batch, args.crop,
                                         args.width, args.seed)
        res = evaluate(models[kind], sets["test"], kind)
        test[kind] = {k: res[k] for k in ("overall_accuracy", "macro_f1", "f1")} | {"cells": int(np.sum(res["confusion"]))}
    files = {"classifier": "classifier.onnx", "reference_bands": "reference_bands.onnx"}
    export_onnx(models["features"], "features", out / files["classifier"])
    export_onnx(models["bands"], "bands", out / files["reference_bands"])
    torch.save({k: m.state_dict() for k, m in models.items()}, out / "torch_state.pt")
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
