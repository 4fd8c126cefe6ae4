"""Export a trained variable-rate run (corsa2) to models_onnx/NAME: encoder, decoder, latent tables, card.

    python -m training.export_rate --run runs/corsa2 --name corsa2

The latent tables (``corsa.codec.latent_coder``: integer frequencies per quality level, context and
channel) are counted on the train split's latents as the exported encoder computes them. The card
records bands, scaling, latent grid, quality levels with their gains' lambdas, receptive field,
training command and time, and per-level test figures measured on the exported files: CF from the
bytes of the stream-format product files, PSNR, per source and as the mean over sources.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections import defaultdict
from pathlib import Path

import corsa_udf
import numpy as np
import torch
from torch import nn

from corsa.core.machine import cpu_name
from corsa.formats import stream_format
from corsa.codec.models import VariableRateCodec
from corsa.formats.datasets import load_split
from corsa.codec.latent_coder import FILE_NAME as TABLES_FILE, LatentCoder, context_counts
from corsa.core.metrics import compression_factor, is_small, psnr
from corsa.core.scene import BANDS, Scene

from . import export as base_export, weights
from .export import NODATA_LAYER, OPSET, _record_files, input_spec, stored_layer, training_record
from .model import parameter_count
from .rate_model import RateCodec, RateConfig
from .train import SPLIT_FILE
from .train_rate import build_model


class _Encoder(nn.Module):
    def __init__(self, codec: RateCodec):
        super().__init__()
        self.codec = codec

    def forward(self, dn: torch.Tensor) -> torch.Tensor:
        return self.codec.analysis(dn)


class _Decoder(_Encoder):
    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.codec.synthesis(latent)


def load_run(run: Path, which: str = "best.pt") -> tuple[RateCodec, dict]:
    return base_export.load_run(run, which, RateConfig, build_model)


def load_state(path: Path) -> RateCodec:
    """The torch model an export saved in its run folder (torch_state.pt), for fine-tuning."""
    return base_export.load_state(path, RateConfig, build_model)


def load_model(folder: Path) -> RateCodec:
    """A shipped variable-rate model as torch, rebuilt from its ONNX files and its gains
    (``training.weights``): what the parity test compares the ONNX files with."""
    return weights.load_model(folder, RateConfig, build_model, weights.rate_gains(folder))


def _reach(grad: torch.Tensor, centre: int, scale: int) -> int:
    ys, xs = np.nonzero((grad.abs().sum(0) > 0).numpy())
    return scale * int(max(centre - ys.min(), ys.max() - centre, centre - xs.min(), xs.max() - centre) + 1)


def receptive_radius(model: RateCodec, size: int = 256) -> dict:
    """Reach, in 10 m pixels, of the encoder (input -> latent cell) and decoder (latent -> pixel)."""
    x = (torch.rand(1, len(BANDS), size, size) * 3000).requires_grad_(True)
    model.analysis(x)[0, :, size // 8, size // 8].sum().backward()
    enc = _reach(x.grad[0], size // 2, 1)
    lat = torch.randn(1, model.cfg.latent, size // 4, size // 4, requires_grad=True)
    model.synthesis(lat)[0, :, size // 2, size // 2].sum().backward()
    return {"encoder": enc, "decoder": _reach(lat.grad[0], size // 8, 4)}


def _latents(session, scenes: list[Scene], overlap: int) -> list[np.ndarray]:
    return [corsa_udf.analyse(session, s.data, 512, overlap) for s in scenes]


def fit_tables(model: RateCodec, encoder_path: Path, overlap: int) -> tuple[LatentCoder, np.ndarray, np.ndarray]:
    """Integer tables counted on the train split's latents (through onnxruntime), every level."""
    gain, inv_gain = (t.detach().numpy().astype(np.float32) for t in model.gains())
    session = corsa_udf.session(str(encoder_path), 0)
    latents = _latents(session, load_split(SPLIT_FILE, "train"), overlap)
    counts = np.stack([sum(context_counts(np.clip(np.rint(y * g[:, None, None]), -32768, 32767).astype(np.int16))
                           for y in latents) for g in gain])
    return LatentCoder.from_counts(counts), gain, inv_gain


def test_figures(codec: VariableRateCodec) -> list[dict]:
    """Per quality level: CF from the product file bytes and PSNR on the test split, per source
    (L1C sources apart) and as the mean over L2A sources, each source weighing the same, sources of
    small patches left out (as benchmarks.rd_rate's means)."""
    scenes = load_split(SPLIT_FILE, "test")
    latents = [codec.latent(s.data) for s in scenes]
    out = []
    for q in codec.qualities:
        rows = defaultdict(list)
        for s, y in zip(scenes, latents):
            ints = codec.quantise(y, codec.base(q))
            data, rec = stream_format.decoded_date(codec, s.data, ints, q, s.nodata_mask, s.crs, s.date or "undated")
            source = s.group + ("-L1C" if s.extra.get("level") == "L1C" else "")
            rows[source].append((psnr(s.data, rec), s.pixels, len(data), is_small(s.data)))
        per_source = {src: {"scenes": len(r), "psnr_db": round(float(np.mean([p for p, _, _, _ in r])), 3),
                            "cf": round(compression_factor(sum(n for _, n, _, _ in r), sum(b for _, _, b, _ in r)), 2),
                            "small_patches": all(small for *_, small in r)}
                      for src, r in sorted(rows.items())}
        l2a = [v for k, v in per_source.items() if not k.endswith("-L1C") and not v["small_patches"]]
        out.append({"quality": q, "per_source": per_source,
                    "mean_over_sources": {"psnr_db": round(float(np.mean([v["psnr_db"] for v in l2a])), 3),
                                          "cf": round(float(np.mean([v["cf"] for v in l2a])), 2)}})
    return out


def derived_folder(src: Path, name: str, out: str | Path, ignore: tuple[str, ...] = (),
                   dropped: tuple[str, ...] = ("gain_over_classical_db",)) -> tuple[Path, dict]:
    """``out``/``name`` made afresh as a copy of a shipped model's files (but ``ignore`` and its Markdown
    card), and the source's card for it: renamed, not the default (one at a time, made so by hand
    with the docs), without ``dropped`` (figures that were the source's)."""
    folder = Path(out) / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns(*ignore, "*.md"))
    card = json.loads((src / "model_card.json").read_text())
    for key in dropped:
        card.pop(key, None)
    card["id"], card["default"] = name, False
    return folder, card


def output_options(p: argparse.ArgumentParser) -> None:
    """--out (where a derived model's folder goes) and --no-figures, as every command that derives a model takes them."""
    p.add_argument("--out", default="models_onnx")
    p.add_argument("--no-figures", action="store_true", help="skip the test-split figures (smoke runs)")


def write_card(card: dict, out: Path, figures: bool = True) -> Path:
    """A derived model's card in ``out`` with its test figures measured afresh on the folder's files
    (the old figures dropped: they are another model's); without ``figures`` no figures nor MODEL_CARD.md."""
    for entry in card["qualities"]:
        entry.pop("test", None)
    (out / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")   # the codec below reads it
    if not figures:
        return out
    for entry, fig in zip(card["qualities"], test_figures(VariableRateCodec(out, kernels="fp32"))):
        entry["test"] = fig
    (out / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(card_markdown(card))
    return out


def export_decoder(model: RateCodec, path: Path) -> None:
    """The float decoder as ONNX: latent (n, c, h, w) -> DN (n, bands, y, x), any batch and size."""
    with torch.no_grad():
        torch.onnx.export(_Decoder(model), (torch.zeros(1, model.cfg.latent, 16, 16),), str(path),
                          input_names=["latent"], output_names=["dn"],
                          dynamic_axes={"latent": {0: "n", 2: "h", 3: "w"}, "dn": {0: "n", 2: "y", 3: "x"}},
                          opset_version=OPSET, dynamo=False)


def export(run: Path, name: str, out_root: Path, description: str, notes: str = "", figures: bool = True,
           default_quality: int | None = None) -> Path:
    model, ckpt = load_run(run)
    cfg: RateConfig = model.cfg
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "stats": ckpt["stats"], "model": model.state_dict()}, run / "torch_state.pt")
    spatial = {2: "y", 3: "x"}
    dn = torch.rand(1, len(BANDS), 64, 64) * 3000
    with torch.no_grad():
        torch.onnx.export(_Encoder(model), (dn,), str(out / "encoder.onnx"), input_names=["dn"], output_names=["y"],
                          dynamic_axes={"dn": {0: "n", **spatial}, "y": {0: "n", 2: "h", 3: "w"}},
                          opset_version=OPSET, dynamo=False)
    export_decoder(model, out / "decoder.onnx")
    reach = receptive_radius(model)
    overlap = int(math.ceil(max(reach.values()) / cfg.stride) * cfg.stride)
    coder, gain, inv_gain = fit_tables(model, out / "encoder.onnx", overlap)
    coder.save(out, gain=gain, inv_gain=inv_gain, lambdas=np.array(cfg.lambdas))
    card = {
        "id": name,
        "kind": "variable-rate",
        "format_version": 3,
        "description": description,
        "bands": list(BANDS),
        "input": input_spec(ckpt["stats"]),
        "output": {"dtype": "float32", "units": "DN (round and clip to uint16)"},
        "latent": {"stride": cfg.stride, "resolution_m": 10 * cfg.stride, "channels": cfg.latent,
                   "quantiser": "ints = round(y * gain[level]), clipped to int16; decoder input ints * inv_gain[level]",
                   "coder": "corsa.codec.latent_coder: checkerboard contexts, integer tables (sum 2**16), range coder"},
        "layers": [stored_layer("latent", [f"z{i:02d}" for i in range(cfg.latent)], cfg.stride), NODATA_LAYER],
        "qualities": [{"quality": i + 1, "lambda": lam} for i, lam in enumerate(cfg.lambdas)],
        "default_quality": default_quality or cfg.levels // 2 + 1,
        "receptive_radius_px": reach,
        "tile": {"size": 512, "overlap": overlap},
        "architecture": {**cfg.to_dict(), "parameters": parameter_count(model)},
        "training": training_record(
            ckpt, "training.train_rate",
            f"{ckpt['args'].get('threads', 2)} thread(s) of 2 CPU cores ({cpu_name()}), "
            f"{'bf16 autocast' if ckpt['args'].get('bf16') else 'fp32'}, no GPU",
            "shared/data/s2: every group with 10 bands (L2A and L1C)",
            "training/split.json (by location; every source in test)", {"best_val_loss": round(ckpt["best"], 4)}, notes),
        "files": {},
    }
    _record_files(card, out, {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "latent_model": TABLES_FILE})
    (out / "model_card.json").write_text(json.dumps(card, indent=1))
    if not figures:
        return out
    t0 = time.time()
    for entry, fig in zip(card["qualities"], test_figures(VariableRateCodec(out))):
        entry["test"] = fig
    card["test_seconds"] = round(time.time() - t0, 1)
    (out / "model_card.json").write_text(json.dumps(card, indent=1))
    (out / "MODEL_CARD.md").write_text(card_markdown(card))
    return out


def card_markdown(card: dict) -> str:
    tr, a, lat = card["training"], card["architecture"], card["latent"]
    sources = sorted(card["qualities"][0]["test"]["per_source"])
    head = "| quality | lambda | mean over L2A sources (small patches left out): CF / PSNR | " + " | ".join(sources) + " |"
    rows = [head, "|" + "---|" * (3 + len(sources))]
    for q in card["qualities"]:
        t = q["test"]
        cells = [f"{t['per_source'][s]['cf']:.1f} / {t['per_source'][s]['psnr_db']:.2f}" for s in sources]
        rows.append(f"| {q['quality']} | {q['lambda']:g} | {t['mean_over_sources']['cf']:.1f} / "
                    f"{t['mean_over_sources']['psnr_db']:.2f} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    temporal = card.get("temporal")
    series = (f"- Time series: `temporal_model.npz` ({temporal['coder']}; a key date every {temporal['key_every']}; "
              f"fitted on the {temporal['fitted_on']}, `python -m training.fit_temporal`).\n" if temporal else "")
    for key, option in (("between", "--date between stored dates"), ("render", "--scale / --like")):
        head = card.get(key)
        if head:
            v = head["validation"]
            figures = (f"validation: {v['psnr_db']:.2f} dB against linear in time {v['linear_psnr_db']:.2f}" if key == "between"
                       else "validation: " + ", ".join(f"{k} {f['psnr_db']:.2f} dB against bicubic {f['bicubic_psnr_db']:.2f}"
                                                       for k, f in v.items()))
            series += (f"- {option}: `{key}.onnx` ({head['what']}; {head['parameters']:,} parameters; {figures}; "
                       f"`{head['command']}`, {head['wall_time_s'] / 60:.0f} min on {head['cpu']}).\n")
    if card.get("int8"):
        i8, t = card["int8"], card["int8"]["test"]
        at = ", ".join(f"{q}: {v['psnr_db_int8'] - v['psnr_db_fp32']:+.2f}" for q, v in t["levels"].items())
        where = (f"the default at quality levels {', '.join(map(str, i8['levels']))} ({i8['levels_rule']})"
                 if "levels" in i8 else "the default")
        series += (f"- Decoding with int8 kernels ({where}; `--kernels int8` at every level, `--kernels fp32` for the float "
                   f"decoder): `decoder_int8.onnx` "
                   f"({i8['what']}; `{i8['command']}`, {i8['wall_time_s'] / 60:.0f} min on {i8['cpu']}). Test split, "
                   f"mean over L2A sources, PSNR against the float decoder by quality level (dB): {at}; at most {t['psnr_loss_db_max']:.2f} dB below the float decoder on a "
                   f"scene, pixels at most {t['max_dn_difference']} DN apart; a 512 px block in {t['block_s_int8']} s "
                   f"against {t['block_s_fp32']} s (1 thread, {t['cpu']})." + (
                       f" By default its bright tiles (snow, ice) decode in float: at most "
                       f"{t['default_psnr_loss_db_max']:.2f} dB below the float decoder on a scene."
                       if "default_psnr_loss_db_max" in t else "") + "\n")
    if card.get("int8_encoder"):
        e, t = card["int8_encoder"], card["int8_encoder"]["test"]
        at = ", ".join(f"{q}: {v['psnr_db_int8'] - v['psnr_db_fp32']:+.2f} dB, bytes x{v['bytes_int8_over_fp32']:.3f}"
                       for q, v in t["levels"].items())
        where = (f"the default at quality levels {', '.join(map(str, e['levels']))}" if e["levels"]
                 else "the default at no quality level")
        series += (f"- Encoding with int8 kernels ({where}: {e['levels_rule']}; `corsa compress --kernels int8` at "
                   f"every level): `encoder_int8.onnx` ({e['what']}; `{e['command']}`, {e['wall_time_s'] / 60:.0f} min on "
                   f"{e['cpu']}). Test split, mean over L2A sources, against the float encoder by quality level: {at}; "
                   f"a 512 px block in {t['block_s_int8']} s against {t['block_s_fp32']} s (1 thread, {t['cpu']}).\n")
    if card.get("layer"):
        la = card["layer"]
        series += (f"- Levels {', '.join(la['levels'])}: level {la['base']}'s integers and refinement and a residual layer a "
                   f"block (formats 12 and 13; {la['coder']}; each band's target {la['target']}; the level's lambda: "
                   + ", ".join(f"{q}: {v:g}" for q, v in la["levels"].items()) + f" DN² a bit; `{la['command']}`).\n")
    return f"""# Model card: {card['id']}

{card['description']}

- Bands (in this order): {', '.join(card['bands'])}; input {card['input']['units']}.
- Scaling: {card['input']['scaling']}; parameters in `model_card.json`.
- Latent: {lat['channels']} channels on the {lat['resolution_m']} m grid (stride {lat['stride']}).
  Quantiser: {lat['quantiser']}. Coder: {lat['coder']}.
- Quality levels 1-{len(card['qualities'])} (higher is better), default {card['default_quality']}: one network,
  a learned gain vector per level (trained for lambda x MSE + bits).
- Files: `encoder.onnx` (DN -> latent y), `decoder.onnx` (dequantised latent -> DN), `latent_model.npz`
  (gains, inverse gains, integer context tables); sha256 in `model_card.json`. The torch model is rebuilt
  from these files (`training.weights`); training state stays in the run folder.
{series}- Receptive radius: encoder {card['receptive_radius_px']['encoder']} px, decoder
  {card['receptive_radius_px']['decoder']} px; tiles of {card['tile']['size']} px overlap by {card['tile']['overlap']} px.
- Parameters: {a['parameters']:,}.
- Training: `{tr['command']}`; {tr['steps']} steps, {tr['wall_time_s'] / 60:.0f} min on {tr['machine']};
  data {tr['data']}; split {tr['split']}. {tr['notes']}

Test split (locations never seen in training), CF from the bytes of the stream-format product files,
PSNR (peak 10000) as CF / dB per source; L1C sources are not in the mean. The comparison with
JPEG 2000 / JPEG XL at the same size is in BENCHMARKS.md.

{table}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, default=Path("models_onnx"))
    p.add_argument("--notes", default="", help="what a re-run of the training command should know")
    p.add_argument("--no-figures", action="store_true", help="skip the test-split figures (smoke runs)")
    p.add_argument("--default-quality", type=int, help="the level `corsa compress` uses by default (default: the middle one)")
    p.add_argument("--description", default="Variable-rate codec: scalar-quantised latent on the 40 m grid, "
                   "one network for every quality level, entropy-coded with integer context tables.")
    args = p.parse_args()
    out = export(args.run, args.name, args.out, args.description, notes=args.notes, figures=not args.no_figures,
                 default_quality=args.default_quality)
    if not args.no_figures:
        print((out / "MODEL_CARD.md").read_text())


if __name__ == "__main__":
    main()
