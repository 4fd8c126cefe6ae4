"""Quantisation-aware fine-tuning of a variable-rate model's encoder for int8 kernels, and its export
(``encoder_int8.onnx`` beside ``encoder.onnx``, entry ``files.encoder_int8`` and section ``int8_encoder``
of the card).

    python -m training.train_int8_encoder --model corsa3.1 --steps 2000   # seeded; 1 thread

What is quantised: the 3x3 convolutions of the encoder's 40 m residual branches (70% of its time on a
block), as in the int8 decoders (``training.train_int8``: 7-bit weights per output channel, uint8
activations per tensor); the input transform, the convolutions into and out of the 40 m grid and the
sums stay float. Distilled from the float encoder: the loss is the squared difference to its latent in
units of the quantisation step of a random level per crop, so that the integers stay the float
encoder's wherever they can. The decoder and the integer tables are untouched: whichever encoder made a
product, every decoder decodes it alike. Unlike a decoder's, an encoder's kernels decide the stored
integers: the card states what they cost (PSNR and bytes by level against the float encoder's).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from pathlib import Path

import corsa_udf
import numpy as np
import torch
from torch import nn

from corsa.codec.models import VariableRateCodec, checked_session, model_dir
from corsa.core.machine import cpu_name
from corsa.core.metrics import psnr
from corsa.formats.datasets import load_split

from .data import CropSampler
from .export_rate import card_markdown, load_model
from .rate_model import RateCodec
from .train import SPLIT_FILE, lr_at
from .train_int8 import QResBlock, Simulated, quantised_export

FILE_NAME = "encoder_int8.onnx"
# A level encodes with int8 kernels by default where they cost at most this ... and this share more
# bytes on the validation split: stricter than the decoders' 0.05 dB, as what an encoder costs is
# stored for good (a product decoded with the float decoder later keeps it).
MAX_LOSS_DB = 0.01
MAX_MORE_BYTES = 0.001


class Int8Encoder(Simulated):
    """``RateCodec.analysis`` with its residual branches' convolutions int8."""

    def __init__(self, codec: RateCodec):
        super().__init__()
        codec = copy.deepcopy(codec)       # trained here: the fp32 model stays as it is
        self.transform, self.into, self.out = codec.transform, codec.enc[:2], codec.enc[-1]
        self.blocks = nn.Sequential(*[QResBlock(b, "gelu") for b in codec.enc[2:-1]])

    def forward(self, dn: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.into(self.transform(dn))))


def step_error(y: torch.Tensor, target: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two latents in quantisation steps (``gain``: per crop and channel)."""
    return ((y - target) * gain[:, :, None, None]).square().mean()


def figures(folder: Path, split: str) -> dict:
    """The int8 encoder against the float one on a split's L2A scenes, through onnxruntime as products
    are made and decoded (the default decoder): per level, PSNR and coded bytes of the integers of
    each, means over sources; the share of integers that differ; a 512 px block's time on 1 thread."""
    codec = VariableRateCodec(folder, 1)
    int8 = checked_session(codec.path, codec.card["files"]["encoder_int8"], 1)
    encoders = (codec.encoder, int8)
    scenes = [s for s in load_split(SPLIT_FILE, split) if s.extra.get("level") != "L1C"]
    latents = [[corsa_udf.analyse(e, s.data, codec.tile, codec.overlap) for e in encoders] for s in scenes]
    levels = {}
    for q in codec.qualities:
        per, differ, total = {}, 0, 0
        for s, ys in zip(scenes, latents):
            ints = [codec.quantise(y, q) for y in ys]
            row = [len(codec.coder.encode(ints[1], codec.level(q))) / len(codec.coder.encode(ints[0], codec.level(q)))]
            for i in ints:
                rec = codec.decode(i, q, s.data.shape[1:])
                rec[:, s.nodata_mask] = 0
                row.append(psnr(s.data, rec))
            differ, total = differ + int((ints[0] != ints[1]).sum()), total + ints[0].size
            per.setdefault(s.group, []).append(row)
        means = np.mean([np.mean(v, 0) for v in per.values()], 0)
        levels[str(q)] = {"psnr_db_fp32": round(float(means[1]), 3), "psnr_db_int8": round(float(means[2]), 3),
                          "bytes_int8_over_fp32": round(float(means[0]), 4),
                          "integers_changed": round(differ / total, 4)}
    block = np.random.default_rng(0).uniform(0, 4000, (1, 10, 512, 512)).astype(np.float32)
    times = {}
    for name, session in (("fp32", codec.encoder), ("int8", int8)):
        session.run(None, {"dn": block})
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            session.run(None, {"dn": block})
            runs.append(time.perf_counter() - t)
        times[f"block_s_{name}"] = round(min(runs), 4)
    return {"levels": levels, **times, "cpu": cpu_name()}


def default_levels(val: dict) -> list[int]:
    return [int(q) for q, v in val["levels"].items() if v["psnr_db_fp32"] - v["psnr_db_int8"] <= MAX_LOSS_DB
            and v["bytes_int8_over_fp32"] <= 1 + MAX_MORE_BYTES]


def train(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder = model_dir(args.model)
    model = load_model(folder)
    net = Int8Encoder(model).train()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sampler = CropSampler(load_split(SPLIT_FILE, "train"), args.crop, args.seed, max_weight_px=250_000)
    held = CropSampler(load_split(SPLIT_FILE, "val"), args.crop, args.seed, max_weight_px=250_000)
    val = [torch.from_numpy(held.batch(args.batch)) for _ in range(8)]
    gains = model.gains()[0]
    run = Path(args.runs) / f"int8_encoder_{Path(args.model).name}"
    run.mkdir(parents=True, exist_ok=True)
    log = (run / "log.jsonl").open("a")
    t0 = time.time()

    @torch.no_grad()
    def validate() -> float:
        net.eval()
        # every level: the error in steps of the finest one, the level that moves most integers
        err = float(np.mean([step_error(net(x), model.analysis(x), gains[-1].expand(len(x), -1)) for x in val]))
        net.train()
        return round(err, 5)

    record = {"step": 0, "val_error_finest_steps": validate()}
    print(json.dumps(record), flush=True)
    for step in range(1, args.steps + 1):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step - 1, args.steps, args.lr, warmup=100)
        x = torch.from_numpy(sampler.batch(args.batch))
        with torch.no_grad():
            target = model.analysis(x)
        level = torch.randint(0, model.cfg.levels, (args.batch,))
        loss = step_error(net(x), target, gains[level])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.val_every == 0 or step == args.steps:
            record = {"step": step, "loss": round(float(loss.detach()), 5), "elapsed_s": round(time.time() - t0, 1),
                      "val_error_finest_steps": validate()}
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n"), log.flush()
    torch.save({"model": net.state_dict(), "record": record, "wall_time_s": round(time.time() - t0, 1)},
               run / "int8_encoder.pt")
    return finish(args)


def finish(args: argparse.Namespace) -> Path:
    """Export the run's fine-tuned encoder into the model folder and describe it in the card (figures
    measured on the exported file)."""
    folder = model_dir(args.model)
    model = load_model(folder)
    saved = torch.load(Path(args.runs) / f"int8_encoder_{Path(args.model).name}" / "int8_encoder.pt",
                       weights_only=False)
    net = Int8Encoder(model)
    net.load_state_dict(saved["model"])
    sampler = CropSampler(load_split(SPLIT_FILE, "train"), args.crop, args.seed + 1, max_weight_px=250_000)
    path = folder / FILE_NAME
    quantised_export(net, torch.zeros(1, 10, 64, 64), ("dn", "y"),
                     (sampler.batch(args.batch) for _ in range(200)), path)
    card_path = folder / "model_card.json"
    card = json.loads(card_path.read_text())
    card["files"]["encoder_int8"] = {"path": FILE_NAME, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                     "bytes": path.stat().st_size}
    card_path.write_text(json.dumps(card, indent=1) + "\n")          # the figures below encode with it
    val = figures(folder, "val")
    card["int8_encoder"] = {
        "what": "the encoder, its 40 m residual branches' 3x3 convolutions int8 (onnxruntime QDQ: 7-bit weights "
                "per channel, uint8 activations), the rest float; distilled from the float encoder "
                "(training.train_int8_encoder)",
        "steps": args.steps, "validation_error_finest_steps": saved["record"]["val_error_finest_steps"],
        "levels": default_levels(val),
        "levels_rule": f"validation split: at most {MAX_LOSS_DB} dB below the float encoder and at most "
                       f"{MAX_MORE_BYTES:.1%} more bytes (what an encoder costs is stored for good)",
        "validation": val, "test": figures(folder, "test"),
        "wall_time_s": saved["wall_time_s"], "cpu": cpu_name(), "threads": args.threads,
        "command": f"python -m training.train_int8_encoder --model {Path(args.model).name} --steps {args.steps} "
                   f"--batch {args.batch} --crop {args.crop} --lr {args.lr} --threads {args.threads} --seed {args.seed}"}
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    (folder / "MODEL_CARD.md").write_text(card_markdown(card))
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa3.1")
    p.add_argument("--runs", default="runs")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--export-only", action="store_true", help="export a finished run again (``finish``)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    finish(args) if args.export_only else train(args)
