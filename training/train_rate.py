"""Train corsa2 (the variable-rate codec) on the train split; resumes from the run folder's checkpoint.

    python -m training.train_rate --name corsa2      # seeded; 12000 steps, about 80 min on 2 cores (AMD EPYC, fp32)

Every crop of a batch gets a random quality level; loss = lambda[level] * MSE / var(DN) + bits per
pixel under the Laplace prior. Checkpoints every --ckpt-every steps (runs/NAME/ckpt.pt); the model
with the lowest validation loss (mean over levels) is kept as best.pt. Log: runs/NAME/log.jsonl.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from corsa.formats.datasets import load_split
from corsa.core.metrics import psnr
from corsa.core.scene import Scene

from .data import BandStats, CropSampler, fit_band_stats
from .model import InputTransform
from corsa.codec.latent_coder import CONTEXTS

from .rate_model import RateCodec, RateConfig, context_ids, widen_state
from . import weights
from .train import SPLIT_FILE, Run, lr_at, pad_to, training_parser


def build_model(cfg: RateConfig, st: BandStats) -> RateCodec:
    return RateCodec(cfg, InputTransform(st.lmbda, st.yj_mean, st.yj_std), st.dn_mean, st.dn_std)


def distortion(recon: torch.Tensor, x: torch.Tensor, norm: float) -> torch.Tensor:
    """MSE per crop over valid pixels and all bands, divided by the mean DN variance."""
    valid = (x != 0).any(1, keepdim=True).float()
    return ((recon - x) ** 2 * valid).flatten(1).sum(1) / (valid.flatten(1).sum(1) * x.shape[1]).clamp(min=1) / norm


def as_stored(rec: torch.Tensor, scene: Scene) -> np.ndarray:
    """A decoded (bands, y, x) tensor as a product decodes it: whole DN in uint16's range, nodata 0."""
    out = np.clip(np.rint(rec.numpy()), 0, 65535)
    out[:, scene.nodata_mask] = 0
    return out


@torch.no_grad()
def evaluate(model: RateCodec, scenes: list[Scene], norm: float) -> dict:
    """Per level: mean PSNR (rounded latents, as exported) and prior bits per pixel over the scenes."""
    model.eval()
    g, ig = model.gains()
    out = {"psnr": [], "bpp": [], "loss": []}
    ys = [(s, model.analysis(torch.from_numpy(pad_to(s.data, 4).astype(np.float32))[None])) for s in scenes]
    for q in range(model.cfg.levels):
        scores, bits, pixels, losses = [], 0.0, 0, []
        for s, y in ys:
            ints = torch.round(y * g[q][None, :, None, None])
            rec = model.synthesis(ints * ig[q][None, :, None, None])[0, :, : s.data.shape[1], : s.data.shape[2]]
            b = float(model.bits(ints, torch.tensor([q]), ints).sum())
            scores.append(psnr(s.data, as_stored(rec, s)))
            bits += b
            pixels += s.pixels
            x = torch.from_numpy(s.data.astype(np.float32))[None]
            losses.append(float(model.cfg.lambdas[q] * distortion(rec[None], x, norm)) + b / s.pixels)
        out["psnr"].append(round(float(np.mean(scores)), 2))
        out["bpp"].append(round(bits / pixels, 3))
        out["loss"].append(float(np.mean(losses)))
    model.train()
    out["val_loss"] = float(np.mean(out.pop("loss")))
    return out


def _init_state(path: Path) -> dict:
    """A warm start's torch state and band statistics: a checkpoint, a run's torch_state.pt, or a
    shipped model folder (rebuilt from its ONNX files; its priors are then fitted afresh, ``fit_priors``)."""
    if path.is_dir():
        model = weights.load_model(path, RateConfig, build_model, weights.rate_gains(path))
        return {"stats": asdict(model.band_stats), "model": model.state_dict(), "fit_priors": True}
    return torch.load(path, weights_only=False)


@torch.no_grad()
def fit_priors(model: RateCodec, sampler: CropSampler, batches: int, batch: int) -> None:
    """Each level's and channel's Laplace prior fitted to the quantised latents of training crops
    (median and mean absolute deviation, the maximum-likelihood fit): a warm start from ONNX weights
    has no trained priors, and learning them from scratch at the learning rate takes thousands of
    steps, during which the rate term pulls the latents toward a wrong prior."""
    g, _ = model.gains()
    y = torch.cat([model.analysis(torch.from_numpy(sampler.batch(batch))) for _ in range(batches)])
    for q in range(model.cfg.levels):
        ints = torch.round(y * g[q][None, :, None, None])
        s = ints.transpose(0, 1).flatten(1)
        mu = s.median(1).values
        spread = (s - mu[:, None]).abs().mean(1).clamp(min=0.05)
        model.prior_mean[q] = mu
        model.prior_log_scale[q] = spread.log()
        if model.cfg.context_prior:      # per context: the mean and spread of its values, the channel's where rare
            ctx = context_ids(ints).transpose(0, 1).flatten(1)                 # (L, n)
            n = torch.zeros(ints.shape[1], CONTEXTS).scatter_add_(1, ctx, torch.ones_like(s))
            mean = torch.zeros_like(n).scatter_add_(1, ctx, s) / n.clamp(min=1)
            dev = torch.zeros_like(n).scatter_add_(1, ctx, (s - mean.gather(1, ctx)).abs()) / n.clamp(min=1)
            rare = n < 50
            model.ctx_mean[q] = torch.where(rare, mu[:, None].expand_as(mean), mean)
            model.ctx_log_scale[q] = torch.where(rare, spread[:, None].expand_as(dev), dev.clamp(min=0.05)).log()


def train(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = Run(args, RateConfig)
    train_scenes = load_split(SPLIT_FILE, "train")
    val_scenes = load_split(SPLIT_FILE, "val")[:: args.val_stride]
    init = _init_state(Path(args.init)) if args.init and not run.ckpt else None
    cfg = run.config or RateConfig(latent=args.latent, width=args.width, width20=args.width20,
                                   blocks_enc=args.blocks_enc, blocks_dec=args.blocks_dec, blocks20=args.blocks20,
                                   width10=args.width10, context_prior=args.context_prior,
                                   **({"lambdas": args.lambdas} if args.lambdas else {}))
    # A warm start keeps the trained model's input statistics: its weights are fitted to them.
    st = run.stats or (BandStats(**init["stats"]) if init else fit_band_stats(train_scenes, seed=args.seed))
    model = build_model(cfg, st)
    if init:
        model.load_state_dict(widen_state(init["model"], model))
        print(f"initialised from {args.init}", flush=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = CropSampler(train_scenes, args.crop, args.seed, max_weight_px=args.max_weight_px)
    if init and (init.get("fit_priors") or (cfg.context_prior and "ctx_mean" not in init["model"])):
        fit_priors(model, CropSampler(train_scenes, args.crop, args.seed + 1, max_weight_px=args.max_weight_px),
                   8, args.batch)
    step = run.bind(model, opt, sampler, cfg, st, best=math.inf, kind="rate")
    norm = float(np.mean(np.square(st.dn_std)))
    acc = {"d": 0.0, "bpp": 0.0}

    def validate() -> tuple[dict, float]:
        nonlocal acc
        ev = evaluate(model, val_scenes, norm)
        record = {"train_d": round(acc["d"] / args.val_every, 5), "train_bpp": round(acc["bpp"] / args.val_every, 3), **ev}
        acc = {"d": 0.0, "bpp": 0.0}
        return record, ev["val_loss"]

    while step < args.steps:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.steps, args.lr)
        x = torch.from_numpy(sampler.batch(args.batch))
        level = torch.randint(0, cfg.levels, (args.batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(x, level)
        d = distortion(out["recon"], x, norm)
        bpp = out["bits"] / (x.shape[2] * x.shape[3])
        loss = (model.lambdas[level] * d + bpp).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        step += 1
        acc["d"] += float(d.detach().mean())
        acc["bpp"] += float(bpp.detach().mean())
        run.after(step, validate, lambda score, best: score < best)
    return run.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = training_parser(__doc__, "corsa2", steps=12000, batch=16, lr=1e-3, latent=64, width=96, width20=48,
                        blocks_enc=2, blocks_dec=3, blocks20=0, width10=0)
    p.add_argument("--max-weight-px", type=int, default=250_000,
                   help="a scene is drawn as if it had at most this many pixels (large L1C scenes would dominate)")
    p.add_argument("--val-stride", type=int, default=2, help="evaluate on every n-th val scene")
    p.add_argument("--lambdas", type=float, nargs="+", help="one per quality level, lowest first (default: RateConfig's)")
    p.add_argument("--init", help="warm start from a trained model (a model folder such as models_onnx/corsa2.1, a "
                                  "run's torch_state.pt or a checkpoint), widened to "
                                  "--latent channels and the --lambdas levels")
    p.add_argument("--context-prior", action="store_true",
                   help="v4: the rate term counts bits per context of the run-time coder (RateConfig.context_prior)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast (pays on CPUs with AMX or AVX512-BF16, slower elsewhere: see lscpu)")
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
