"""Train and export the time head of a variable-rate model (``between.onnx``, ``corsa.blocks.render``): a
date between a series' stored dates rendered from the decodes of the dates around it.

    python -m training.train_between --model corsa3.1 --steps 3000   # seeded; writes models_onnx/corsa3.1/between.onnx

The head weighs, pixel by pixel, the ``corsa_udf.BETWEEN_DATES`` stored dates nearest the query date (two before
and two after where there are): a small network reads each candidate's decode with its signed
distance in days and the candidates' mean, and gives a softmax weight per candidate and pixel on top
of linear interpolation's weights (the network's output starts at 0: it starts as linear
interpolation of the nearest dates before and after, and learns where to leave it). The result is a per-pixel convex blend of the
decodes: it stays within what the stored dates show, and can leave out a date where it is cloudy.

Samples: a clear date (scene classes: under 0.5% cloud; sources without classes count as clear) of
a train-split revisit series is left out; its candidates among the series' other dates, decoded
with the model at a quality of ``QUALITIES`` as a product of each decodes (refined where the model
refines), go in; its own reflectances are the target. Crops of
``CROP`` px, MSE over the standardised bands. Validation: the validation split's clear dates, whole,
PSNR beside linear interpolation in time of the two neighbouring decodes.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import corsa_udf
import numpy as np
import torch
from torch import nn

from corsa.codec.models import VariableRateCodec, model_dir
from corsa.formats.datasets import cloud_fraction, load_split, revisit_series
from corsa.formats import stream_format
from corsa.core.metrics import psnr

from . import heads
from .export import OPSET
from .train import SPLIT_FILE

FILE_NAME = "between.onnx"
QUALITIES = (2, 4, 6)
CROP = 48
CLEAR = 0.005


class BetweenNet(nn.Module):
    """(images (1, K, 10, h, w) DN, dt (1, K) signed days from the query date, valid (1, K, h, w):
    1 where the candidate shows the pixel, prior (1, K): linear interpolation's weights) -> (1, 10,
    h, w) DN: a per-pixel convex blend of the images where they are valid (anything where none is)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, width: int = 32):
        super().__init__()
        bands = len(mean)
        self.register_buffer("mean", mean.reshape(1, 1, -1, 1, 1).clone())
        self.register_buffer("std", std.reshape(1, 1, -1, 1, 1).clone())
        self.own = nn.Sequential(nn.Conv2d(bands + 2, width, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.GELU())
        self.weigh = nn.Sequential(nn.Conv2d(3 * width, width, 1), nn.GELU(), nn.Conv2d(width, 1, 1))
        nn.init.zeros_(self.weigh[-1].weight)
        nn.init.zeros_(self.weigh[-1].bias)

    def forward(self, images: torch.Tensor, dt: torch.Tensor, valid: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        b, k, c, h, w = images.shape
        x = (images - self.mean) / self.std
        months = (dt / 30.0)[:, :, None, None, None].expand(b, k, 1, h, w)
        f = self.own(torch.cat([x, months, months.abs()], 2).reshape(b * k, c + 2, h, w)).reshape(b, k, -1, h, w)
        v = valid[:, :, None]
        mean = (f * v).sum(1, keepdim=True) / v.sum(1, keepdim=True).clamp(min=1)
        g = torch.cat([f, mean.expand_as(f), f - mean], 2).reshape(b * k, -1, h, w)
        # Starts as linear interpolation in time (``prior``): the network learns where to leave it.
        logit = self.weigh(g).reshape(b, k, 1, h, w) + torch.log(prior + corsa_udf.BETWEEN_PRIOR_FLOOR)[:, :, None, None, None]
        weight = torch.softmax(logit - (1 - v) * 1e4, 1)
        return (weight * images).sum(1)


class Series:
    """The revisit series of a split, every date decoded at every quality (computed once)."""

    def __init__(self, scenes, codec: VariableRateCodec, seed: int, limit: int = 0):
        self.rng = np.random.default_rng(seed)
        self.runs = [r for r in revisit_series(scenes) if all(s.date for s in r)]
        if limit:       # a quick run: the first series that have a date between two others
            self.runs = [r for r in self.runs if len(r) >= 3][:limit]
        self.truth = [[s.data.astype(np.float32) for s in r] for r in self.runs]
        self.days = [[float(np.datetime64(s.date, "D").astype(np.int64)) for s in r] for r in self.runs]
        self.targets = [(i, t) for i, r in enumerate(self.runs) for t, s in enumerate(r)
                        if cloud_fraction(s) < CLEAR and len(r) >= 3]
        # as a product decodes each date (refined where the model refines q)
        self.decoded = {q: [[stream_format.decoded_date(codec, s.data, codec.encode(s.data, q), q, s.nodata_mask)[1]
                             .astype(np.float32) for s in r] for r in self.runs] for q in QUALITIES}

    def inputs(self, i: int, t: int, q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """(K, 10, h, w) decodes, (K,) signed days, (K, h, w) valid for date t of series i left out."""
        days = self.days[i][:t] + self.days[i][t + 1:]
        others = [j for j in range(len(self.runs[i])) if j != t]
        pick = [others[j] for j in corsa_udf.between_candidates(days, self.days[i][t])]
        images = np.zeros((corsa_udf.BETWEEN_DATES,) + self.truth[i][t].shape, np.float32)
        dt, valid = np.zeros(corsa_udf.BETWEEN_DATES, np.float32), np.zeros((corsa_udf.BETWEEN_DATES,) + images.shape[2:], np.float32)
        for n, j in enumerate(pick):
            images[n], dt[n] = self.decoded[q][i][j], self.days[i][j] - self.days[i][t]
            valid[n] = (self.truth[i][j] != 0).any(0)
        return images, dt, valid, pick

    def batch(self, n: int) -> tuple[torch.Tensor, ...]:
        out = [[], [], [], [], []]
        for _ in range(n):
            i, t = self.targets[self.rng.integers(len(self.targets))]
            q = QUALITIES[self.rng.integers(len(QUALITIES))]
            images, dt, valid, _ = self.inputs(i, t, q)
            h, w = images.shape[2:]
            y, x = self.rng.integers(0, h - CROP + 1), self.rng.integers(0, w - CROP + 1)
            k = self.rng.integers(4)
            crop = lambda a: np.ascontiguousarray(np.rot90(a[..., y:y + CROP, x:x + CROP], k, axes=(-2, -1)))  # noqa: E731
            for lst, v in zip(out, (crop(images), dt, crop(valid), corsa_udf.linear_weights(dt, valid.any((1, 2))),
                                    crop(self.truth[i][t]))):
                lst.append(v)
        return tuple(torch.from_numpy(np.stack(v)) for v in out)


def linear(images: np.ndarray, dt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Linear interpolation in time of the nearest candidates before and after (or the one side)."""
    return np.tensordot(corsa_udf.linear_weights(dt, valid.any((1, 2))), images, 1)


@torch.no_grad()
def evaluate(net: BetweenNet, series: Series, quality: int = 4) -> dict:
    net.eval()
    ours, lin = [], []
    for i, t in series.targets:
        if not 0 < t < len(series.runs[i]) - 1:
            continue
        images, dt, valid, _ = series.inputs(i, t, quality)
        prior = corsa_udf.linear_weights(dt, valid.any((1, 2)))
        rec = net(*(torch.from_numpy(v)[None] for v in (images, dt, valid, prior)))[0].numpy()
        truth = series.truth[i][t]
        ours.append(psnr(truth, np.clip(np.rint(rec), 0, 65535)))
        lin.append(psnr(truth, np.clip(np.rint(linear(images, dt, valid)), 0, 65535)))
    net.train()
    return {"quality": quality, "cases": len(ours), "psnr_db": float(np.mean(ours)), "linear_psnr_db": float(np.mean(lin))}


def export(net: BetweenNet, path: Path) -> None:
    net.eval()
    args = (torch.rand(1, corsa_udf.BETWEEN_DATES, 10, 20, 24) * 3000, torch.tensor([[-10.0, -5.0, 5.0, 10.0]]),
            torch.ones(1, corsa_udf.BETWEEN_DATES, 20, 24), torch.tensor([[0.0, 0.5, 0.5, 0.0]]))
    torch.onnx.export(net, args, str(path), input_names=["images", "dt", "valid", "prior"], output_names=["image"],
                      dynamic_axes={"images": {3: "h", 4: "w"}, "valid": {2: "h", 3: "w"}, "image": {2: "h", 3: "w"}},
                      opset_version=OPSET, dynamo=False)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", type=int, default=0, help="train and validate on this many revisit series of each "
                   "split (0: all; each series is decoded at every trained level first)")
    args = heads.parse(p, argv, "corsa3.1", 3000, 16, 32)
    start = time.time()
    folder = model_dir(args.model)
    codec = VariableRateCodec(folder, threads=args.threads)
    train = Series(load_split(SPLIT_FILE, "train"), codec, args.seed, args.series)
    val = Series(load_split(SPLIT_FILE, "val"), codec, args.seed + 1, args.series)
    prepared = time.time() - start
    flat = np.concatenate([x.reshape(10, -1) for r in train.truth for x in r], 1)
    flat = flat[:, (flat != 0).any(0)]
    net = BetweenNet(torch.from_numpy(flat.mean(1)).float(), torch.from_numpy(flat.std(1)).float(), args.width)
    std = net.std[:, 0]

    def loss_of(net: BetweenNet, images, dt, valid, prior, target) -> torch.Tensor:
        ok = (target != 0).any(1, keepdim=True).float()
        return (((net(images, dt, valid, prior) - target) / std) ** 2 * ok).sum() / (ok.sum() * 10).clamp(min=1)

    return heads.train_and_record(net, lambda: train.batch(args.batch), loss_of, args, start,
                                  lambda n: evaluate(n, val), export, folder, "between", FILE_NAME,
                                  "train_between", prepared, {
        "what": "a date between stored dates: a per-pixel softmax blend of the decodes of the candidates (the two "
                "stored dates before and after it), weighted by a small network on top of linear interpolation's weights",
        "candidates": corsa_udf.BETWEEN_DATES, "reach_px": 2, "qualities_trained": list(QUALITIES)})


if __name__ == "__main__":
    main()
