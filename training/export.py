"""Export a trained run to models_onnx/NAME: encoder, decoder, features (single-file ONNX) + card.

    python -m training.export --run runs/corsa512 --name corsa512

The card records what a user of the files needs (bands, scaling, codebooks, grids, receptive field
and the tile overlap it implies, training data and split) and the test-split figures measured on the
exported files with onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from corsa.codec.codebook import CodebookCodec
from corsa.codec.models import sha256_file
from corsa.codec.index_coder import FILE_NAME as ENTROPY_FILE, EntropyModel
from corsa.formats.datasets import load_split
from corsa.core.metrics import compression_factor, psnr
from corsa.core.scene import BANDS, RAW_BITS_PER_PIXEL

from .model import Codec, CodecConfig, parameter_count
from .train import SPLIT_FILE, build_model
from . import weights
from .data import BandStats

OPSET = 17


class _Encoder(nn.Module):
    def __init__(self, codec: Codec):
        super().__init__()
        self.codec = codec

    def forward(self, dn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codec.encode(dn)


class _Decoder(_Encoder):
    def forward(self, idx0: torch.Tensor, idx1: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(idx0, idx1)


class _Features(_Encoder):
    def forward(self, idx0: torch.Tensor, idx1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codec.features(idx0, idx1)



# What a compress job stores, layer by layer, each on its own grid (stride in 10 m pixels): the
# process graphs save one GeoTIFF per layer and date, and `corsa pack` reads them (DESIGN.md).
def stored_layer(name: str, bands: list[str], stride: int) -> dict:
    return {"name": name, "bands": bands, "stride": stride, "resolution_m": 10 * stride}


NODATA_LAYER = stored_layer("nodata", ["nodata"], 1)

def restore(ckpt: dict, config=CodecConfig, build=build_model) -> nn.Module:
    """A model of the family ``config`` / ``build`` from a checkpoint or torch_state.pt, in eval mode."""
    model = build(config(**ckpt["config"]), BandStats(**ckpt["stats"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def load_run(run: Path, which: str = "best.pt", config=CodecConfig, build=build_model) -> tuple[nn.Module, dict]:
    ckpt = torch.load(run / which, weights_only=False)
    return restore(ckpt, config, build), ckpt


def load_state(path: Path, config=CodecConfig, build=build_model) -> nn.Module:
    """The torch model an export saved in its run folder (torch_state.pt), for fine-tuning."""
    return restore(torch.load(path, weights_only=True), config, build)


def load_model(folder: Path) -> Codec:
    """A shipped codebook model as torch, rebuilt from its ONNX files (``training.weights``)."""
    return weights.load_model(folder, CodecConfig, build_model)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict) -> None:
    # The TorchScript exporter handles the argmin/gather graph and dynamic H, W in one file.
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def receptive_radius(model: Codec, size: int = 128) -> dict:
    """Reach, in 10 m pixels, of the encoder (input -> fine-grid latent) and the decoder."""
    x = (torch.rand(1, len(BANDS), size, size) * 3000).requires_grad_(True)
    h20 = model.enc20(model.enc10(model.transform(x)))
    z1 = model.enc40(h20)
    # Straight-through, so the reach of the level-1 path (through the argmin) is counted too.
    q1 = z1 + (model.vq1.lookup(model.vq1.indices(z1)) - z1).detach()
    z0 = model.enc20_q(torch.cat([h20, model.dec40(q1)], 1))
    z0[0, :, size // 4, size // 4].sum().backward()
    g = x.grad[0].abs().sum(0) > 0
    ys, xs = np.nonzero(g.numpy())
    enc = int(max(size // 2 - ys.min(), ys.max() - size // 2, size // 2 - xs.min(), xs.max() - size // 2))
    q0 = torch.randn(1, model.cfg.dim0, size // 2, size // 2, requires_grad=True)
    q1 = torch.randn(1, model.cfg.dim1, size // 4, size // 4, requires_grad=True)
    model._synthesis(q0, q1)[0, :, size // 2, size // 2].sum().backward()
    g0 = (q0.grad[0].abs().sum(0) > 0).numpy()
    g1 = (q1.grad[0].abs().sum(0) > 0).numpy()
    reach = []
    for g, scale in ((g0, 2), (g1, 4)):
        ys, xs = np.nonzero(g)
        centre = size // (2 * scale)
        reach.append(scale * int(max(centre - ys.min(), ys.max() - centre, centre - xs.min(), xs.max() - centre) + 1))
    return {"encoder": enc, "decoder": max(reach)}


def input_spec(stats: dict) -> dict:
    """The card's "input" entry: what the encoder takes and how it scales it (fitted band statistics)."""
    return {"dtype": "float32", "units": "L2A DN = surface reflectance x 10000 (baseline offset removed)",
            "layout": "(n, band, y, x), y and x multiples of 4",
            "scaling": "inside the encoder: DN clipped at 0, Yeo-Johnson per band, then standardised",
            "yeo_johnson_lambda": stats["lmbda"], "mean": stats["yj_mean"], "std": stats["yj_std"]}


def _record_files(card: dict, folder: Path, files: dict[str, str]) -> None:
    for key, name in files.items():
        path = folder / name
        card["files"][key] = {"path": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def export(run: Path, name: str, out_root: Path, description: str, figures: bool = True,
           entropy_every: int = 1, notes: str = "") -> Path:
    model, ckpt = load_run(run)
    cfg: CodecConfig = model.cfg
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    # Fine-tuning state stays with the run; the model folder holds what run time reads (load_model
    # rebuilds the torch model from it).
    torch.save({"config": cfg.to_dict(), "stats": ckpt["stats"], "model": model.state_dict()},
               run / "torch_state.pt")
    dn = torch.rand(1, len(BANDS), 64, 64) * 3000
    idx0, idx1 = model.encode(dn)
    spatial = {2: "y", 3: "x"}
    _export(_Encoder(model), (dn,), out / "encoder.onnx", ["dn"], ["idx0", "idx1"],
            {"dn": {0: "n", **spatial}, "idx0": {0: "n", 1: "y0", 2: "x0"}, "idx1": {0: "n", 1: "y1", 2: "x1"}})
    idx_axes = {"idx0": {0: "n", 1: "y0", 2: "x0"}, "idx1": {0: "n", 1: "y1", 2: "x1"}}
    _export(_Decoder(model), (idx0, idx1), out / "decoder.onnx", ["idx0", "idx1"], ["dn"],
            {**idx_axes, "dn": {0: "n", **spatial}})
    _export(_Features(model), (idx0, idx1), out / "features.onnx", ["idx0", "idx1"], ["f0", "f1"],
            {**idx_axes, "f0": {0: "n", 2: "y0", 3: "x0"}, "f1": {0: "n", 2: "y1", 3: "x1"}})
    reach = receptive_radius(model)
    # Tiles overlap by the encoder's and decoder's reach so chunk borders leave no seam; the
    # overlap is rounded to the coarse stride so tile grids nest in the level-1 grid.
    overlap = int(math.ceil((reach["encoder"] + reach["decoder"]) / cfg.stride1) * cfg.stride1)
    st = ckpt["stats"]
    card = {
        "id": name,
        "format_version": 1,
        "description": description,
        "bands": list(BANDS),
        "input": input_spec(st),
        "output": {"dtype": "float32", "units": "DN (round and clip to uint16)"},
        "codebooks": {"k0": cfg.k0, "k1": cfg.k1, "dim0": cfg.dim0, "dim1": cfg.dim1},
        "grids": {
            "level0": {"stride": cfg.stride0, "resolution_m": 10 * cfg.stride0, "bits": math.ceil(math.log2(cfg.k0))},
            "level1": {"stride": cfg.stride1, "resolution_m": 10 * cfg.stride1, "bits": math.ceil(math.log2(cfg.k1))},
        },
        "layers": [stored_layer("L0", ["idx0"], cfg.stride0), stored_layer("L1", ["idx1"], cfg.stride1),
                   NODATA_LAYER],
        "fixed_rate_bits_per_pixel": math.log2(cfg.k0) / cfg.stride0 ** 2 + math.log2(cfg.k1) / cfg.stride1 ** 2,
        "receptive_radius_px": reach,
        "tile": {"size": 512, "overlap": overlap},
        "architecture": {**cfg.to_dict(), "parameters": parameter_count(model)},
        "training": training_record(ckpt, "training.train", "2 CPU cores (Xeon, AMX bf16), no GPU",
                                    "shared/data/s2, groups terracodec, worldstrat, majortom, bigearthnet, eurosat",
                                    "training/split.json (by location)", {"best_val_psnr_db": round(ckpt["best"], 3)},
                                    notes),
        "files": {},
    }
    files = {key: f"{key}.onnx" for key in ("encoder", "decoder", "features")}
    _record_files(card, out, files)
    (out / "model_card.json").write_text(json.dumps(card, indent=1))
    fit_entropy(out, entropy_every)
    _record_files(card, out, {"entropy_model": ENTROPY_FILE})
    (out / "model_card.json").write_text(json.dumps(card, indent=1))
    card["test"] = test_figures(out) if figures else {}
    (out / "model_card.json").write_text(json.dumps(card, indent=1))
    if figures:
        (out / "MODEL_CARD.md").write_text(card_markdown(card))
    return out


def training_record(ckpt: dict, module: str, machine: str, data: str, split: str, best: dict, notes: str) -> dict:
    """The card's training entry: the command that reproduces the run, its length and where it ran."""
    return {"command": " ".join([f"python -m {module}", *_args_cli(ckpt["args"])]),
            "steps": ckpt["step"], "wall_time_s": round(ckpt["elapsed"], 1),
            "machine": machine, "data": data, "split": split, **best, "notes": notes}


def _args_cli(args: dict) -> list[str]:
    skip = {"runs", "threads", "val_every", "val_scenes", "ckpt_every"}
    out = []
    for k, v in args.items():
        if k in skip:
            continue
        flag = "--" + k.replace("_", "-")
        out.append(flag if v is True else f"--no-{k.replace('_', '-')}" if v is False else f"{flag} {v}")
    return out


def split_indices(codec: CodebookCodec, name: str, every: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    return [codec.encode(s.data) for s in load_split(SPLIT_FILE, name)[::every]]


def fit_entropy(model_path: Path, every: int = 1) -> EntropyModel:
    """Context tables counted on the train split's indices, mixing weights on the val split's."""
    codec = CodebookCodec(model_path)
    k0, k1 = codec.card["codebooks"]["k0"], codec.card["codebooks"]["k1"]
    model = EntropyModel.fit(split_indices(codec, "train", every), split_indices(codec, "val", every), k0, k1)
    model.save(model_path)
    return model


def test_figures(model_path: Path) -> dict:
    """Test-split PSNR and CF (fixed-rate and entropy-coded streams) through onnxruntime."""
    codec = CodebookCodec(model_path)
    entropy = EntropyModel.load(model_path)
    scenes = load_split(SPLIT_FILE, "test")
    t0 = time.time()
    scores, pixels, coded = [], 0, 0
    for s in scenes:
        idx0, idx1 = codec.encode(s.data)
        rec = codec.decode(idx0, idx1, shape=s.data.shape[1:])
        rec[:, s.nodata_mask] = 0
        scores.append(psnr(s.data, rec))
        pixels += s.pixels
        coded += len(entropy.encode(idx0, idx1))
    bpp = codec.card["fixed_rate_bits_per_pixel"]
    return {"scenes": len(scenes), "mean_psnr_db": round(float(np.mean(scores)), 3),
            "min_psnr_db": round(float(np.min(scores)), 3),
            "fixed_rate_cf": round(RAW_BITS_PER_PIXEL / bpp, 2),
            "entropy_coded_cf": round(compression_factor(pixels, coded), 2),
            "seconds": round(time.time() - t0, 1)}


def card_markdown(card: dict) -> str:
    t, tr, a = card["test"], card["training"], card["architecture"]
    return f"""# Model card: {card['id']}

{card['description']}

- Bands (in this order): {', '.join(card['bands'])}; input {card['input']['units']}.
- Scaling: {card['input']['scaling']}; parameters in `model_card.json`.
- Codebooks: level 0 K={card['codebooks']['k0']} (dim {card['codebooks']['dim0']}) on the
  {card['grids']['level0']['resolution_m']} m grid, level 1 K={card['codebooks']['k1']}
  (dim {card['codebooks']['dim1']}) on the {card['grids']['level1']['resolution_m']} m grid:
  {card['fixed_rate_bits_per_pixel']:.4f} bit per 10 m pixel before entropy coding
  (CF {t['fixed_rate_cf']} against 88 bit).
- Files: `encoder.onnx` (DN -> idx0, idx1), `decoder.onnx` (idx0, idx1 -> DN),
  `features.onnx` (idx0, idx1 -> codebook vectors f0, f1); sha256 in `model_card.json`.
  The torch model is rebuilt from these files (`training.weights`, the parity test); training state stays in the run folder.
- Receptive radius: encoder {card['receptive_radius_px']['encoder']} px, decoder
  {card['receptive_radius_px']['decoder']} px; tiles of {card['tile']['size']} px need an overlap of
  {card['tile']['overlap']} px for seamless output.
- Parameters: {a['parameters']:,}.
- Training: `{tr['command']}`; {tr['steps']} steps, {tr['wall_time_s'] / 60:.0f} min on {tr['machine']};
  data {tr['data']}; split {tr['split']}; best validation PSNR {tr['best_val_psnr_db']} dB.
  {tr['notes']}
- Test split ({t['scenes']} scenes, locations never seen in training): mean PSNR
  {t['mean_psnr_db']} dB (worst scene {t['min_psnr_db']} dB); CF {t['fixed_rate_cf']} with fixed-width
  indices, CF {t['entropy_coded_cf']} with the context-model range coder (`entropy_model.npz`,
  lossless). The comparison with JPEG 2000 / JPEG XL is in BENCHMARKS.md.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, default=Path("models_onnx"))
    p.add_argument("--entropy-every", type=int, default=1, help="fit the entropy model on every n-th scene")
    p.add_argument("--notes", default="", help="what a re-run of the training command should know")
    p.add_argument("--no-figures", action="store_true", help="skip the test-split figures (smoke runs)")
    p.add_argument("--description", default="CORSA configuration: two-level codebook autoencoder, "
                   "512 codes on the 20 m grid and 128 on the 40 m grid.")
    args = p.parse_args()
    out = export(args.run, args.name, args.out, args.description, figures=not args.no_figures,
                 entropy_every=args.entropy_every, notes=args.notes)
    print(json.dumps(json.loads((out / "model_card.json").read_text())["test"]))


if __name__ == "__main__":
    main()
