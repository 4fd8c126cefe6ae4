"""Train the codec on the train split; resumes from the run folder's checkpoint.

    python -m training.train --name corsa512 --k0 512 --k1 128   # ~100 min on 2 cores

Seeded (data order, crops and initial weights); checkpoints every --ckpt-every steps and keeps the
best model on the validation split. The log (runs/NAME/log.jsonl) records wall time per step.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from corsa.formats.datasets import load_split
from corsa.core.metrics import psnr
from corsa.core.scene import Scene

from .data import BandStats, CropSampler, fit_band_stats
from .model import Codec, CodecConfig, InputTransform, parameter_count

SPLIT_FILE = Path(__file__).with_name("split.json")


def build_model(cfg: CodecConfig, st: BandStats) -> Codec:
    return Codec(cfg, InputTransform(st.lmbda, st.yj_mean, st.yj_std), st.dn_mean, st.dn_std)


def pad_to(data: np.ndarray, multiple: int) -> np.ndarray:
    """Edge-pad (band, y, x) so y and x are multiples of ``multiple``."""
    ph, pw = (-data.shape[1]) % multiple, (-data.shape[2]) % multiple
    return np.pad(data, ((0, 0), (0, ph), (0, pw)), mode="edge")


@torch.no_grad()
def evaluate(model: Codec, scenes: list[Scene]) -> dict:
    """Mean PSNR over scenes and codebook usage, through encode/decode as exported."""
    model.eval()
    scores, used0, used1 = [], set(), set()
    for s in scenes:
        x = torch.from_numpy(pad_to(s.data, 4).astype(np.float32))[None]
        idx0, idx1 = model.encode(x)
        rec = model.decode(idx0, idx1)[0, :, : s.data.shape[1], : s.data.shape[2]].numpy()
        rec = np.clip(np.rint(rec), 0, 65535)
        rec[:, s.nodata_mask] = 0
        scores.append(psnr(s.data, rec))
        used0.update(idx0.unique().tolist())
        used1.update(idx1.unique().tolist())
    model.train()
    return {"psnr": float(np.mean(scores)), "used0": len(used0), "used1": len(used1)}


def lr_at(step: int, total: int, base: float, warmup: int = 500) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


class Run:
    """A training run's folder (runs/NAME) and what its checkpoints carry, resumed from its ckpt.pt
    where there is one: the model, optimiser and crop sampler states, the torch RNG, the step, the
    best validation score and the wall time so far. Both codec families train through it."""

    def __init__(self, args: argparse.Namespace, config_class):
        self.args, self.dir = args, Path(args.runs) / args.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "ckpt.pt"
        self.ckpt = torch.load(self.path, weights_only=False) if self.path.exists() else None
        if self.ckpt:
            print(f"resuming {self.dir} at step {self.ckpt['step']}")
        self.config = config_class(**self.ckpt["config"]) if self.ckpt else None
        self.stats = BandStats(**self.ckpt["stats"]) if self.ckpt else None

    def bind(self, model: torch.nn.Module, opt: torch.optim.Optimizer, sampler: CropSampler, cfg, st: BandStats,
             best: float, **extra) -> int:
        """The run's model and what trains it, restored from the checkpoint; returns the step to start at."""
        self.model, self.opt, self.sampler, self.cfg, self.st, self.extra = model, opt, sampler, cfg, st, extra
        self.step, self.best, self.elapsed = 0, best, 0.0
        if self.ckpt:
            model.load_state_dict(self.ckpt["model"])
            opt.load_state_dict(self.ckpt["opt"])
            sampler.restore(self.ckpt["sampler"])
            torch.set_rng_state(self.ckpt["torch_rng"])
            self.step, self.best, self.elapsed = self.ckpt["step"], self.ckpt["best"], self.ckpt["elapsed"]
        print(f"{self.args.name}: {parameter_count(model) / 1e6:.2f} M parameters, config {cfg.to_dict()}", flush=True)
        self.log = (self.dir / "log.jsonl").open("a")
        self.t0 = time.time() - self.elapsed
        return self.step

    def save(self, path: Path) -> None:
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "config": self.cfg.to_dict(),
                    "stats": asdict(self.st), "step": self.step, "best": self.best, "elapsed": self.elapsed,
                    "sampler": self.sampler.state(), "torch_rng": torch.get_rng_state(), "args": vars(self.args),
                    **self.extra}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    def after(self, step: int, validate: Callable[[], tuple[dict, float]], better: Callable[[float, float], bool]) -> None:
        """After a training step: every --val-every steps ``validate()`` gives the log record and the
        score (best.pt kept when ``better(score, best)``); every --ckpt-every steps ckpt.pt."""
        self.step, a = step, self.args
        if step % a.val_every == 0 or step == a.steps:
            self.elapsed = time.time() - self.t0
            record, score = validate()
            record = {"step": step, "elapsed_s": round(self.elapsed, 1), **record}
            print(json.dumps(record), flush=True)
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
            if better(score, self.best):
                self.best = score
                self.save(self.dir / "best.pt")
        if step % a.ckpt_every == 0 or step == a.steps:
            self.elapsed = time.time() - self.t0
            self.save(self.path)

    def close(self) -> Path:
        self.log.close()
        return self.dir


def validation_scenes(every: int = 0) -> list:
    """The validation split, or about ``every`` of its scenes spread over it (``--val-scenes``; 0: all)."""
    scenes = load_split(SPLIT_FILE, "val")
    return scenes[:: max(1, len(scenes) // every)] if every else scenes


def train(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = Run(args, CodecConfig)
    train_scenes = load_split(SPLIT_FILE, "train")
    val_scenes = validation_scenes(args.val_scenes)
    cfg = run.config or CodecConfig(k0=args.k0, k1=args.k1, dim0=args.dim, dim1=args.dim, width10=args.width10,
                                    width20=args.width20, width40=args.width40, blocks_dec=args.blocks_dec)
    st = run.stats or fit_band_stats(train_scenes, seed=args.seed)
    model = build_model(cfg, st)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
    step = run.bind(model, opt, CropSampler(train_scenes, args.crop, args.seed), cfg, st, best=-1.0)
    norm = float(np.mean(np.square(st.dn_std)))
    loss_acc = 0.0

    def validate() -> tuple[dict, float]:
        nonlocal loss_acc
        ev = evaluate(model, val_scenes)
        record = {"train_psnr_est": round(10 * math.log10(1e8 / (loss_acc / args.val_every * norm)), 2), **ev}
        loss_acc = 0.0
        return record, ev["psnr"]

    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        x = torch.from_numpy(run.sampler.batch(args.batch))
        # bf16 autocast: about 3.5x faster on this CPU (AMX); quantisation stays float32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(x)
        valid = (x != 0).any(1, keepdim=True).float()
        rec = ((out["recon"] - x) ** 2 * valid).sum() / (valid.sum() * x.shape[1]) / norm
        loss = rec + args.beta * out["commit"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_acc += rec.item()
        run.after(step, validate, lambda score, best: score > best)
    return run.close()


def training_parser(doc: str, name: str, steps: int, batch: int, lr: float, **sizes: int) -> argparse.ArgumentParser:
    """The options every training command shares (run folder, schedule, seed, logging), and the
    model's whole-number sizes given as ``sizes`` (``blocks_dec=3`` is ``--blocks-dec 3``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=name)
    p.add_argument("--runs", default="runs")
    p.add_argument("--lr", type=float, default=lr)
    shared = dict(steps=steps, batch=batch, crop=64, threads=2, seed=0, val_every=1000, ckpt_every=1000)
    for key, default in {**shared, **sizes}.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=default)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = training_parser(__doc__, "corsa512", steps=9000, batch=8, lr=5e-4, k0=512, k1=128, dim=64, width10=32,
                        width20=96, width40=128, blocks_dec=3)
    p.add_argument("--beta", type=float, default=0.25, help="commitment loss weight")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--val-scenes", type=int, default=0, help="validate on about this many val scenes (0: all)")
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
