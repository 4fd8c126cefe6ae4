"""Train and export the gap-filling network of a variable-rate model (``corsa.fill``): a date's gap
pixels as the interpolation in time of its previous and next decoded dates plus a correction the
network predicts from the latents (the date's own around the gap, and its neighbours'), as a
product stores them.

    python -m training.train_fill --model corsa3 --steps 1500      # seeded; writes models_onnx/corsa3/fill.onnx

Samples: a date of a train-split revisit series with a date before and after it, a crop of 24 x 24
latent cells (96 px), a real cloud mask of the shared data (WorldStrat scene classes 3, 8, 9, 10 of
train-split areas, turned and flipped) as its gap: those pixels are set to 0 (nodata) before the
date is encoded, exactly as a product with that gap stores it. Every latent is quantised at a random
quality level and dequantised; the neighbours are decoded at that level. Loss: MSE over the gap
pixels of interpolation + correction. The correction starts at 0: the network starts as the
interpolation in time and learns what the date's surroundings say about its gap.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from corsa.codec import model_dir, sha256_file
from corsa.datasets import cloud_fraction, cloud_masks, default_data_root, load_split, revisit_series
from corsa.fill import FILE_NAME, REACH_CELLS, day_planes, interpolate

from .export import OPSET, _record_files
from .export_rate import card_markdown, load_state
from .model import ResBlock, parameter_count
from .train import SPLIT_FILE, lr_at

CROP = 24                       # latent cells per crop side
MARGIN = 5                      # cells of encoder context around a crop (20 px, the encoder's reach)
LEVELS = (0, 2, 4, 6, 8)        # quality levels (indices) the samples are drawn at


class FillNet(nn.Module):
    """(z_t with gaps zeroed, m_t, z_prev, m_prev, z_next, m_next, day planes, interpolation in time
    (10 bands, 10 m, standardised)) -> a correction of the interpolation, DN (10 bands, 10 m)."""

    def __init__(self, latent: int, bands: int, out_std: torch.Tensor, width: int = 128, blocks: int = 4):
        super().__init__()
        self.latent = latent
        self.bands = bands
        self.net = nn.Sequential(nn.Conv2d(3 * latent + 3 + 2 + 16 * bands, width, 3, padding=1),
                                 *[ResBlock(width) for _ in range(blocks)], nn.Conv2d(width, 16 * bands, 1),
                                 nn.PixelShuffle(4))
        nn.init.zeros_(self.net[-2].weight)
        nn.init.zeros_(self.net[-2].bias)
        self.register_buffer("out_std", out_std.reshape(1, -1, 1, 1).clone())
        self.unshuffle = nn.PixelUnshuffle(4)

    def forward(self, z: torch.Tensor, m: torch.Tensor, zp: torch.Tensor, mp: torch.Tensor, zn: torch.Tensor,
                mn: torch.Tensor, days: torch.Tensor, interp: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z * (1 - m), m, zp, mp, zn, mn, days, self.unshuffle(interp / self.out_std)], 1)
        return self.net(x) * self.out_std


def _cells(mask: np.ndarray) -> np.ndarray:
    """A pixel mask (..., 4h, 4w) -> True for the latent cells holding any masked pixel."""
    h, w = mask.shape[-2] // 4, mask.shape[-1] // 4
    return mask[..., : 4 * h, : 4 * w].reshape(*mask.shape[:-2], h, 4, w, 4).any((-3, -1))


class Samples:
    def __init__(self, series, masks, model, seed: int):
        self.series = [[np.pad(s.data.astype(np.float32), ((0, 0), (0, -s.data.shape[1] % 4), (0, -s.data.shape[2] % 4)))
                        for s in run] for run in series]
        self.days = [[np.datetime64(s.date) if s.date else None for s in run] for run in series]
        self.masks, self.rng = masks, np.random.default_rng(seed)
        # gaps go on clear dates only: a cloud under the gap is not what the neighbours should predict
        self.clear = [[cloud_fraction(s) < 0.01 for s in run] for run in series]
        self.model, self.levels = model, LEVELS
        g, ig = (t.detach() for t in model.gains())
        with torch.no_grad():
            self.latents = [[model.analysis(torch.from_numpy(x)[None])[0] for x in run] for run in self.series]
            # what a decoder gives of each date at each trained level: the interpolation's inputs
            self.decoded = {q: [[model.synthesis((torch.round(y * g[q][:, None, None]) * ig[q][:, None, None])[None])[0]
                                 for y in run] for run in self.latents] for q in self.levels}

    def _mask(self, side: int) -> np.ndarray:
        while True:
            m = self.masks[self.rng.integers(len(self.masks))]
            if min(m.shape) < side:
                continue
            y, x = self.rng.integers(0, m.shape[0] - side + 1), self.rng.integers(0, m.shape[1] - side + 1)
            m = np.rot90(m[y:y + side, x:x + side], self.rng.integers(4))
            m = m[:, ::-1] if self.rng.integers(2) else m
            if 0.05 < m.mean() < 0.7:
                return np.ascontiguousarray(m)

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        g, ig = (t.detach() for t in self.model.gains())
        out = {k: [] for k in ("z", "m", "zp", "mp", "zn", "mn", "days", "interp", "target", "gap")}
        while len(out["z"]) < n:
            i = self.rng.integers(len(self.series))
            run = self.series[i]
            if len(run) < 3:
                continue
            t = int(self.rng.integers(1, len(run) - 1))
            if not self.clear[i][t]:
                continue
            hc, wc = run[t].shape[1] // 4, run[t].shape[2] // 4
            if min(hc, wc) < CROP:
                continue
            cy, cx = self.rng.integers(0, hc - CROP + 1), self.rng.integers(0, wc - CROP + 1)
            gap = self._mask(4 * CROP)
            y0, x0 = max(0, cy - MARGIN), max(0, cx - MARGIN)
            y1, x1 = min(hc, cy + CROP + MARGIN), min(wc, cx + CROP + MARGIN)
            window = run[t][:, 4 * y0:4 * y1, 4 * x0:4 * x1].copy()
            window[:, 4 * (cy - y0):4 * (cy - y0 + CROP), 4 * (cx - x0):4 * (cx - x0 + CROP)][:, gap] = 0
            q = int(self.levels[self.rng.integers(len(self.levels))])
            with torch.no_grad():
                y = self.model.analysis(torch.from_numpy(window)[None])[0][:, cy - y0:cy - y0 + CROP, cx - x0:cx - x0 + CROP]
            sl = (slice(None), slice(cy, cy + CROP), slice(cx, cx + CROP))
            dq = lambda v: torch.round(v * g[q][:, None, None]) * ig[q][:, None, None]  # noqa: E731
            target = run[t][:, 4 * cy:4 * (cy + CROP), 4 * cx:4 * (cx + CROP)]
            nodata = [(r[:, 4 * cy:4 * (cy + CROP), 4 * cx:4 * (cx + CROP)] == 0).all(0) for r in (run[t - 1], run[t + 1])]
            out["z"].append(dq(y))
            out["m"].append(torch.from_numpy(_cells(gap))[None].float())
            out["zp"].append(dq(self.latents[i][t - 1][sl]))
            out["mp"].append(torch.from_numpy(_cells(nodata[0]))[None].float())
            out["zn"].append(dq(self.latents[i][t + 1][sl]))
            out["mn"].append(torch.from_numpy(_cells(nodata[1]))[None].float())
            d = self.days[i]
            gaps = ((d[t] - d[t - 1]).astype(int), (d[t + 1] - d[t]).astype(int)) if d[t] is not None else (91, 91)
            out["days"].append(torch.from_numpy(day_planes(*gaps, (CROP, CROP))))
            px = (slice(None), slice(4 * cy, 4 * (cy + CROP)), slice(4 * cx, 4 * (cx + CROP)))
            out["interp"].append(torch.from_numpy(interpolate(
                self.decoded[q][i][t - 1][px].numpy(), self.decoded[q][i][t + 1][px].numpy(), nodata[0], nodata[1], *gaps)))
            out["target"].append(torch.from_numpy(target))
            out["gap"].append(torch.from_numpy(gap & ~(target == 0).all(0))[None].float())
        return {k: torch.stack(v) for k, v in out.items()}


def train(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    folder = model_dir(args.model)
    codec = load_state(folder / "torch_state.pt")
    for p in codec.parameters():
        p.requires_grad_(False)
    split = json.loads(Path(SPLIT_FILE).read_text())
    root = default_data_root()
    samples = Samples(revisit_series(load_split(SPLIT_FILE, "train")), cloud_masks(root, set(split["train"]), 0.03, 0.7),
                      codec, args.seed)
    net = FillNet(codec.cfg.latent, codec.cfg.bands, codec.out_std.flatten(), args.width, args.blocks)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    norm = float(torch.mean(codec.out_std ** 2))
    t0, log = time.time(), []
    for step in range(args.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.steps, args.lr, warmup=100)
        b = samples.batch(args.batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            corr = net(b["z"], b["m"], b["zp"], b["mp"], b["zn"], b["mn"], b["days"], b["interp"])
        rec = b["interp"] + corr.float()
        err = ((rec - b["target"]) ** 2 * b["gap"]).sum() / (b["gap"].sum() * rec.shape[1]).clamp(min=1) / norm
        opt.zero_grad(set_to_none=True)
        err.backward()
        opt.step()
        log.append(float(err.detach()))
        if (step + 1) % args.log_every == 0:
            print(json.dumps({"step": step + 1, "loss": round(float(np.mean(log[-100:])), 5),
                              "elapsed_s": round(time.time() - t0, 1)}), flush=True)
    export(net.eval(), folder, {"steps": args.steps, "wall_time_s": round(time.time() - t0, 1),
                                "parameters": parameter_count(net), "final_loss": round(float(np.mean(log[-100:])), 5),
                                "command": "python -m training.train_fill " + " ".join(
                                    f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("bf16", "log_every"))
                                + (" --bf16" if args.bf16 else "")})
    return folder


def export(net: FillNet, folder: Path, about: dict) -> None:
    names = ["z", "m", "zp", "mp", "zn", "mn", "days", "interp"]
    L, s = net.latent, 16
    example = (torch.zeros(1, L, s, s), torch.zeros(1, 1, s, s), torch.zeros(1, L, s, s), torch.zeros(1, 1, s, s),
               torch.zeros(1, L, s, s), torch.zeros(1, 1, s, s), torch.zeros(1, 2, s, s),
               torch.zeros(1, net.bands, 4 * s, 4 * s))
    with torch.no_grad():
        torch.onnx.export(net, example, str(folder / FILE_NAME), input_names=names, output_names=["correction"],
                          dynamic_axes={n: {0: "n", 2: "h", 3: "w"} for n in names + ["correction"]},
                          opset_version=OPSET, dynamo=False)
    card_path = folder / "model_card.json"
    card = json.loads(card_path.read_text())
    _record_files(card, folder, {"fill": FILE_NAME})
    card["fill"] = {"what": "a date's gap pixels: interpolation in time of its previous and next decoded dates plus "
                            "a correction from the latents of the date around the gap and of its neighbours "
                            "(corsa.fill); trained on cloud-shaped gaps of the train split's revisit series",
                    "reach_cells": REACH_CELLS, **about}
    card_path.write_text(json.dumps(card, indent=1))
    if all("test" in q for q in card["qualities"]):
        (folder / "MODEL_CARD.md").write_text(card_markdown(card))
    print(f"{folder / FILE_NAME} ({sha256_file(folder / FILE_NAME)[:12]}), {about}")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa3")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--log-every", type=int, default=100)
    return train(p.parse_args(argv))


if __name__ == "__main__":
    main()
