"""A shipped variable-rate model's decoder trained on, everything that makes its products frozen
(encoder, gains, integer tables): a new model whose products are byte for byte the old one's, decoded
better. Exported as a new model id (a product names its decoder by sha256, so the old model stays).

    python -m training.train_decoder --model corsa3.1 --name corsa3.2 --steps 6000 --threads 1   # then --export

The loss is the mean over crops of log MSE at a random quality level: each crop counts by its dB, so
the bright scenes the old decoder saturated on (snow: a bias of 400-700 DN that no level removes)
weigh as much as the rest without the dark ones being given up. ``--bright P`` scales a share P of
the crops by a random factor of 1-2.5 (brighter surfaces than the training data holds); ``--snow S``
and ``--water W`` draw those shares of the crops from the few training scenes of snow and of open water
(the surfaces furthest below the classical codecs). ``--tilt T`` draws level q of L with a probability
proportional to exp(T q / (L - 1)): the high levels, furthest below their target gain, trained more often.
The run keeps the decoder with the best validation PSNR (mean over levels); ``--export`` writes
models_onnx/NAME: the old folder's files, the new decoder, a card that says so with its test figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from corsa.codec.models import model_dir
from corsa.core.machine import cpu_name
from corsa.core.metrics import psnr
from corsa.core.scene import BANDS
from corsa_udf import BRIGHT_DN
from corsa.formats.datasets import load_split

from .data import CropSampler
from .export import _record_files
from .export_rate import derived_folder, export_decoder, load_model, output_options, write_card
from .train import SPLIT_FILE, Run, lr_at, pad_to, training_parser, validation_scenes
from .train_rate import as_stored, distortion
from .rate_model import RateCodec, RateConfig

# What the old card says about decoding that a new decoder makes untrue: its int8 decoder (trained
# from the float one: `training.train_int8 --model NAME` makes the new one) and the gains measured.
DROPPED = ("int8", "gain_over_classical_db")


def decoder_parameters(model: RateCodec) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.split(".")[0] in ("dec", "refine20", "refine10")]


def reshaped(model: RateCodec, blocks20: int = 0, width10: int = 0, first_kernel: int | None = None) -> RateCodec:
    """``model`` with residual blocks at 20 m and a 10 m refinement added (``RateConfig``), each
    starting as the identity: the same decoder at step 0, with room where the high levels need it;
    ``first_kernel``: its first convolution cut to that kernel, from the centre of the trained one."""
    k = first_kernel or model.cfg.first_kernel
    if not (blocks20 or width10) and k == model.cfg.first_kernel:
        return model
    if k > model.cfg.first_kernel or k % 2 == 0:
        raise ValueError(f"the first convolution can be cut to an odd kernel up to {model.cfg.first_kernel}, not {k}")
    cfg = dataclasses.replace(model.cfg, blocks20=model.cfg.blocks20 + blocks20, width10=width10 or model.cfg.width10,
                              first_kernel=k)
    new = RateCodec(cfg, model.transform, model.out_mean.flatten().tolist(), model.out_std.flatten().tolist())
    state = model.state_dict()
    cut = (model.cfg.first_kernel - k) // 2
    state["dec.0.weight"] = state["dec.0.weight"][:, :, cut:cut + k, cut:cut + k]
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("refine20.", "refine10.")) for k in missing):
        raise ValueError(f"cannot reshape this decoder: {unexpected or missing}")
    new.band_stats = getattr(model, "band_stats", None)
    return new


def snowy(a: np.ndarray) -> bool:
    """More than a tenth of the valid pixels above BRIGHT_DN in some band (snow, ice, bright cloud)."""
    valid = (a != 0).any(0)
    return bool(((a > BRIGHT_DN).any(0) & valid).sum() > 0.1 * valid.sum())


def watery(a: np.ndarray) -> bool:
    """More than half of the valid pixels dark in B08 (open water: < 600 DN)."""
    valid = (a != 0).any(0)
    return bool(((a[BANDS.index("B08")] < 600) & valid).sum() > 0.5 * valid.sum())


def brighter(x: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """A share of the crops scaled by 1-2.5, within uint16."""
    pick = rng.random(len(x)) < share
    x[pick] = np.minimum(x[pick] * rng.uniform(1.0, 2.5, (int(pick.sum()), 1, 1, 1)), 65535).astype(np.float32)
    return x


def level_weights(levels: int, tilt: float) -> torch.Tensor:
    """How often each level is drawn: proportional to exp(tilt * q / (levels - 1))."""
    return torch.exp(tilt * torch.arange(levels) / max(levels - 1, 1))


@torch.no_grad()
def validate(model: RateCodec, latents: list[tuple], levels: int) -> dict:
    """Per level, mean PSNR over the validation scenes (rounded latents, as a product holds them)."""
    g, ig = model.gains()
    out = []
    for q in range(levels):
        scores = []
        for s, y in latents:
            ints = torch.round(y * g[q][None, :, None, None])
            rec = model.synthesis(ints * ig[q][None, :, None, None])[0, :, : s.data.shape[1], : s.data.shape[2]]
            scores.append(psnr(s.data, as_stored(rec, s)))
        out.append(round(float(np.mean(scores)), 3))
    return {"psnr": out, "mean": round(float(np.mean(out)), 3)}


def train(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = Run(args, RateConfig)
    model = reshaped(load_model(model_dir(args.model)), args.blocks20, args.width10, args.first_kernel)
    for p in model.parameters():
        p.requires_grad_(False)
    params = decoder_parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=args.lr)
    sampler = CropSampler(load_split(SPLIT_FILE, "train"), args.crop, args.seed, max_weight_px=250_000,
                          boost=[(snowy, args.snow), (watery, args.water)])
    print(json.dumps({"boosted_scenes": dict(zip(("snow", "water"), sampler.boosted))}), flush=True)
    with torch.no_grad():
        val = [(s, model.analysis(torch.from_numpy(pad_to(s.data, 4).astype(np.float32))[None]))
               for s in validation_scenes(args.val_scenes)]
    model.eval()                                      # no dropout or norm layers: eval only fixes the mode
    step = run.bind(model, opt, sampler, model.cfg, model.band_stats, best=-math.inf, kind="decoder",
                    source=args.model)
    levels = model.cfg.levels
    if step == 0:
        start = validate(model, val, levels)
        print(json.dumps({"step": 0, **start}), flush=True)
        run.extra["start"] = start
    else:
        run.extra["start"] = run.ckpt["start"]
    rng = np.random.default_rng([args.seed, step])    # a resumed run draws its own brightening, seeded by its step
    acc = 0.0

    def check() -> tuple[dict, float]:
        nonlocal acc
        ev = validate(model, val, levels)
        record = {"train_log_mse": round(acc / args.val_every, 4), **ev}
        acc = 0.0
        return record, ev["mean"]

    g, ig = (t.detach() for t in model.gains())
    draw = level_weights(levels, args.tilt)
    while step < args.steps:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.steps, args.lr, warmup=200)
        x = torch.from_numpy(brighter(sampler.batch(args.batch), args.bright, rng))
        level = (torch.multinomial(draw, args.batch, replacement=True) if args.tilt   # untilted: the older runs' draws
                 else torch.randint(0, levels, (args.batch,)))
        with torch.no_grad():
            ints = torch.round(model.analysis(x) * g[level][:, :, None, None])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            rec = model.synthesis(ints * ig[level][:, :, None, None])
        loss = torch.log(distortion(rec.float(), x, 1.0) + 1.0).mean()     # MSE per crop in DN^2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        acc += float(loss.detach())
        run.after(step, check, lambda score, best: score > best)
    return run.close()


def export(args: argparse.Namespace, figures: bool = True) -> Path:
    """models_onnx/NAME: the source model's files with the run's best decoder; the card names the
    new id, the decoder's training and its test figures (measured on the written files)."""
    src = model_dir(args.model)
    ckpt = torch.load(Path(args.runs) / args.name / "best.pt", weights_only=False)
    a = ckpt["args"]                                  # the run's own settings, not the export call's
    model = reshaped(load_model(src), a.get("blocks20", 0), a.get("width10", 0), a.get("first_kernel"))
    model.load_state_dict(ckpt["model"])
    out, card = derived_folder(src, args.name, args.out, ("decoder.onnx", "decoder_int8.onnx"), DROPPED)
    export_decoder(model, out / "decoder.onnx")
    card["files"].pop("decoder_int8", None)
    card["architecture"].update({k: getattr(model.cfg, k) for k in ("blocks20", "width10", "first_kernel")},
                                parameters=sum(p.numel() for p in model.parameters()))
    grown = [what for what, n in ((f"{model.cfg.blocks20} residual block(s) at 20 m", model.cfg.blocks20),
                                  (f"a {model.cfg.width10}-channel refinement at 10 m", model.cfg.width10),
                                  (f"a {model.cfg.first_kernel}x{model.cfg.first_kernel} first convolution",
                                   model.cfg.first_kernel != 3)) if n]
    card["description"] = (f"{card['description']} {args.name}: {args.model}'s encoder, gains and tables (the same "
                           f"products, byte for byte) with its decoder trained on"
                           + (f", grown by {' and '.join(grown)}" if grown else "") + " (training.train_decoder).")
    for head in ("between", "render"):                # copied heads: their figures were decoded by the old decoder
        if head in card:
            card[head]["figures_decoded_by"] = card[head].get("figures_decoded_by", args.model)
    first = card.get("training", {}).get("decoder_trained_from")
    card["training"]["decoder_trained_from"] = first or args.model
    card["decoder_training"] = {
        "command": (f"python -m training.train_decoder --model {a['model']} --name {a['name']} --steps {a['steps']} "
                    f"--batch {a['batch']} --crop {a['crop']} --lr {a['lr']} --bright {a['bright']} "
                    f"--snow {a.get('snow', 0.0)} --water {a.get('water', 0.0)} "
                    + (f"--tilt {a['tilt']} " if a.get("tilt") else "")
                    + "".join(f"--{k.replace('_', '-')} {a[k]} " for k in ("blocks20", "width10", "first_kernel")
                              if a.get(k))
                    + f"--threads {a['threads']} --seed {a['seed']}" + (" --bf16" if a["bf16"] else "")),
        "steps": ckpt["step"], "wall_time_s": round(ckpt["elapsed"], 1), "cpu": cpu_name(),
        "threads": a["threads"], "split": "training/split.json version 3 (configilm patches in it)",
        "validation_psnr_db": {"before": ckpt["start"], "after": validate_record(ckpt)}}
    _record_files(card, out, {"decoder": "decoder.onnx"})
    return write_card(card, out, figures)


def validate_record(ckpt: dict) -> dict:
    """The best checkpoint's validation figures, from the run's log."""
    log = Path(ckpt["args"]["runs"]) / ckpt["args"]["name"] / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return max(records, key=lambda r: r["mean"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = training_parser(__doc__, "corsa3.2", steps=6000, batch=16, lr=1e-4)
    p.add_argument("--model", default="corsa3.1", help="the shipped model whose decoder is trained on")
    p.add_argument("--val-scenes", type=int, default=0, help="validate on about this many val scenes (0: all)")
    p.add_argument("--bright", type=float, default=0.0, help="share of crops scaled brighter (see above)")
    p.add_argument("--snow", type=float, default=0.0, help="share of crops from snowy training scenes (``snowy``)")
    p.add_argument("--water", type=float, default=0.0, help="share of crops from open-water training scenes (``watery``)")
    p.add_argument("--tilt", type=float, default=0.0, help="levels drawn in proportion to exp(tilt q / (L - 1))")
    p.add_argument("--blocks20", type=int, default=0, help="residual blocks added at 20 m")
    p.add_argument("--width10", type=int, default=0, help="channels of a 10 m refinement added")
    p.add_argument("--first-kernel", type=int, help="the first convolution cut to this kernel (1: a 1x1)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast (pays on CPUs with AMX or AVX512-BF16: see lscpu)")
    p.add_argument("--export", action="store_true", help="write models_onnx/NAME from the run's best decoder")
    output_options(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(export(args, figures=not args.no_figures) if args.export else train(args))


if __name__ == "__main__":
    main()
