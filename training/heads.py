"""What the render heads' training scripts share (``train_render``, ``train_between``): the loop
and the model card entry of the head they export."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from .export import _record_files
from corsa.core.machine import cpu_name

from .export_rate import card_markdown
from .model import parameter_count
from .train import lr_at


def parse(p: argparse.ArgumentParser, argv: list[str] | None, model: str, steps: int, batch: int,
          width: int) -> argparse.Namespace:
    """The arguments both scripts take (besides their own, already in ``p``), parsed; seeds set."""
    p.add_argument("--model", default=model, help="model folder or name under models_onnx/")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    return args


def fit(net: torch.nn.Module, batch: Callable[[], tuple], loss_of: Callable[..., torch.Tensor],
        args: argparse.Namespace, start: float) -> list[dict]:
    """``args.steps`` Adam steps on ``loss_of(net, *batch())`` with the project's learning-rate
    schedule; a log line every ``args.log_every`` steps."""
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    log = []
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=min(200, args.steps // 10 + 1))
        loss = loss_of(net, *batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            log.append({"step": step, "loss": float(loss.detach()), "s": round(time.time() - start, 1)})
            print(json.dumps(log[-1]), flush=True)
    return log


def record(folder: Path, key: str, file_name: str, net: torch.nn.Module, log: list[dict], args: argparse.Namespace,
           script: str, start: float, prepared: float, entry: dict) -> dict:
    """The head's file and its entry (``entry`` plus training facts) in the model card, JSON and Markdown."""
    card_path = folder / "model_card.json"
    card = json.loads(card_path.read_text())
    _record_files(card, folder, {key: file_name})
    card[key] = {**entry, "steps": args.steps, "parameters": parameter_count(net), "final_loss": log[-1]["loss"],
                 "prepare_seconds": round(prepared, 1), "wall_time_s": round(time.time() - start, 1), "cpu": cpu_name(),
                 "threads": args.threads,
                 "command": f"python -m training.{script} " + " ".join(
                     f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "log_every")}
    card_path.write_text(json.dumps(card, indent=1))
    (folder / "MODEL_CARD.md").write_text(card_markdown(card))
    return card[key]


def train_and_record(net: torch.nn.Module, batch: Callable[[], tuple], loss_of: Callable[..., torch.Tensor],
                     args: argparse.Namespace, start: float, validate: Callable[[torch.nn.Module], dict],
                     export: Callable[[torch.nn.Module, Path], None], folder: Path, key: str, file_name: str,
                     script: str, prepared: float, entry: dict) -> dict:
    """``fit``, then the validation figures, the ONNX file and the card entry (``record``) of a head."""
    log = fit(net, batch, loss_of, args, start)
    figures = validate(net)
    print(json.dumps(figures), flush=True)
    export(net, folder / file_name)
    return record(folder, key, file_name, net, log, args, script, start, prepared, {**entry, "validation": figures})
