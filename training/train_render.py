"""Train and export the space head of a variable-rate model (``render.onnx``, ``corsa.blocks.render``): a
decoded date queried at any point and pixel size, LIIF-style.

    python -m training.train_render --model corsa3 --steps 3000     # seeded; writes models_onnx/corsa3/render.onnx

The head reads a decoded image (10 bands on its own grid) and, for each query, the point (y, x) in
that grid's pixel units and the query's cell size there: a small convolutional encoder gives a
feature grid; at the query the feature (bilinear), the image (bicubic), the query's offset inside its
pixel and its cell size go through an MLP, whose output is added to the bicubic value. So at the
start of training it is bicubic interpolation, and what it learns is the rest.

Samples (as LIIF): crops of the train split's scenes (10 m) averaged to coarser pixels by a factor
in ``SCALES`` (1.25-4), compressed and decoded with the model at a quality of ``QUALITIES`` (what a
product of that coarse scene gives, refined where the model refines: a head trained on unrefined
decodes sharpened the refined ones too), and the crop's own pixels as targets, ``QUERIES`` random
ones per crop. Loss: MSE over the bands, standardised. Validation: the validation split's crops at x2
and x4, PSNR against the 10 m truth, beside bicubic of the same decode.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from corsa.codec.models import VariableRateCodec, model_dir
from corsa.core.scene import to_uint16
from corsa.formats import stream_format
from corsa.formats.datasets import load_split
from corsa.core.metrics import psnr

from .data import CropSampler
from . import heads
from .export import OPSET
from .model import ResBlock
from .train import SPLIT_FILE

FILE_NAME = "render.onnx"
SCALES = (1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
QUALITIES = (2, 4, 6)
CROP = 144                  # px of a 10 m crop
PATCH = 32                  # coarse pixels per side of a training window (the encoder's cost)
QUERIES = 1024              # target pixels per window and step


class RenderNet(nn.Module):
    """(image (1, 10, h, w) DN, coord (1, N, 2) y, x in image pixels, pixel centres at i + 0.5,
    cell (1, N, 2) the query's pixel size in image pixels) -> (1, N, 10) DN."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, width: int = 64, blocks: int = 4, hidden: int = 128):
        super().__init__()
        bands = len(mean)
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).clone())
        self.features = nn.Sequential(nn.Conv2d(bands, width, 3, padding=1), *[ResBlock(width) for _ in range(blocks)])
        self.mlp = nn.Sequential(nn.Linear(width + bands + 4, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bands))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, image: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        x = (image - self.mean) / self.std
        h, w = image.shape[-2], image.shape[-1]
        grid = torch.stack([coord[..., 1] / w * 2 - 1, coord[..., 0] / h * 2 - 1], -1)[:, None]
        feat = F.grid_sample(self.features(x), grid, mode="bilinear", padding_mode="border", align_corners=False)
        base = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
        feat, base = feat[:, :, 0].transpose(1, 2), base[:, :, 0].transpose(1, 2)
        offset = coord - torch.floor(coord) - 0.5
        out = base + self.mlp(torch.cat([feat, base, offset, cell], -1))
        return out * self.std[:, :, 0, 0][:, None] + self.mean[:, :, 0, 0][:, None]


def reach_px(blocks: int) -> int:
    """The encoder's receptive radius in image pixels (a 3 x 3 conv and two per block), plus bicubic's 2."""
    return 1 + 2 * blocks + 2


def coarse(hr: np.ndarray, scale: float) -> np.ndarray:
    """A (bands, H, W) crop averaged to pixels ``scale`` times larger (adaptive average pooling)."""
    size = (max(1, round(hr.shape[1] / scale)), max(1, round(hr.shape[2] / scale)))
    return F.adaptive_avg_pool2d(torch.from_numpy(hr)[None], size)[0].numpy()


def queries_of(hr_shape: tuple[int, int], lr_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel centre of the fine grid in coarse-pixel units (H*W, 2) and its cell size there."""
    fy, fx = lr_shape[0] / hr_shape[0], lr_shape[1] / hr_shape[1]
    yy, xx = np.meshgrid((np.arange(hr_shape[0]) + 0.5) * fy, (np.arange(hr_shape[1]) + 0.5) * fx, indexing="ij")
    coord = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32)
    return coord, np.broadcast_to(np.float32([fy, fx]), coord.shape).copy()


class Pairs:
    """Crops, and their coarse versions as the codec decodes them, per scale (computed once)."""

    def __init__(self, scenes, codec: VariableRateCodec, crops: int, seed: int):
        self.rng = np.random.default_rng(seed)
        hr = CropSampler(scenes, CROP, seed, max_weight_px=200_000).batch(crops)
        self.hr = hr
        self.lr = {s: [] for s in SCALES}
        for i, crop in enumerate(hr):
            q = QUALITIES[i % len(QUALITIES)]
            for s in SCALES:
                # as a product of the coarse crop decodes (refined where the model refines q)
                low = to_uint16(coarse(crop, s))
                nodata = (low == 0).all(0)
                self.lr[s].append(stream_format.decoded_date(codec, low, codec.encode(low, q), q, nodata)[1].astype(np.float32))

    def batch(self, n: int) -> tuple[torch.Tensor, ...]:
        """``n`` windows of PATCH x PATCH coarse pixels at one scale, QUERIES fine pixels in each."""
        s = SCALES[self.rng.integers(len(SCALES))]
        lrs, coords, cells, targets = [], [], [], []
        for i in self.rng.choice(len(self.hr), n, replace=False):
            lr, hr = self.lr[s][i], self.hr[i]
            coord, cell = queries_of(hr.shape[1:], lr.shape[1:])
            oy, ox = (int(self.rng.integers(0, lr.shape[k] - PATCH + 1)) for k in (1, 2))
            inside = np.flatnonzero((coord[:, 0] >= oy) & (coord[:, 0] < oy + PATCH) &
                                    (coord[:, 1] >= ox) & (coord[:, 1] < ox + PATCH))
            pick = self.rng.choice(inside, QUERIES, replace=len(inside) < QUERIES)
            lrs.append(lr[:, oy:oy + PATCH, ox:ox + PATCH])
            coords.append(coord[pick] - np.float32([oy, ox]))
            cells.append(cell[pick])
            targets.append(hr.reshape(hr.shape[0], -1)[:, pick].T)
        return tuple(torch.from_numpy(np.stack(v)) for v in (lrs, coords, cells, targets))


def bicubic(lr: np.ndarray, hr_shape: tuple[int, int]) -> np.ndarray:
    return F.interpolate(torch.from_numpy(lr)[None], size=hr_shape, mode="bicubic", align_corners=False)[0].numpy()


@torch.no_grad()
def evaluate(net: RenderNet, pairs: Pairs) -> dict:
    """Mean PSNR over the validation crops at x2 and x4: the head and bicubic of the same decode."""
    net.eval()
    out = {}
    for s in (2.0, 4.0):
        ours, cubic = [], []
        for hr, lr in zip(pairs.hr, pairs.lr[s]):
            coord, cell = queries_of(hr.shape[1:], lr.shape[1:])
            rec = net(torch.from_numpy(lr)[None], torch.from_numpy(coord)[None], torch.from_numpy(cell)[None])[0]
            rec = rec.numpy().T.reshape(hr.shape)
            ours.append(psnr(hr, np.clip(np.rint(rec), 0, 65535)))
            cubic.append(psnr(hr, np.clip(np.rint(bicubic(lr, hr.shape[1:])), 0, 65535)))
        out[f"x{s:g}"] = {"psnr_db": float(np.mean(ours)), "bicubic_psnr_db": float(np.mean(cubic))}
    net.train()
    return out


def export(net: RenderNet, path: Path) -> None:
    net.eval()
    args = (torch.rand(1, 10, 20, 24) * 3000, torch.rand(1, 50, 2) * 20, torch.full((1, 50, 2), 0.5))
    torch.onnx.export(net, args, str(path), input_names=["image", "coord", "cell"], output_names=["value"],
                      dynamic_axes={"image": {2: "h", 3: "w"}, "coord": {1: "n"}, "cell": {1: "n"}, "value": {1: "n"}},
                      opset_version=OPSET, dynamo=False)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crops", type=int, default=600, help="train crops (each at every scale)")
    p.add_argument("--val-crops", type=int, default=48)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    args = heads.parse(p, argv, "corsa3.1", 3000, 8, 64)
    start = time.time()
    folder = model_dir(args.model)
    codec = VariableRateCodec(folder, threads=args.threads)
    train = Pairs(load_split(SPLIT_FILE, "train"), codec, args.crops, args.seed)
    val = Pairs(load_split(SPLIT_FILE, "val"), codec, args.val_crops, args.seed + 1)
    prepared = time.time() - start
    flat = train.hr.transpose(1, 0, 2, 3).reshape(train.hr.shape[1], -1)
    valid = (flat != 0).any(0)
    net = RenderNet(torch.from_numpy(flat[:, valid].mean(1)).float(), torch.from_numpy(flat[:, valid].std(1)).float(),
                    args.width, args.blocks, args.hidden)

    def loss_of(net: RenderNet, lr_img, coord, cell, target) -> torch.Tensor:
        valid = (target != 0).any(-1, keepdim=True).float()
        std = net.std[:, :, 0, 0][:, None]
        return (((net(lr_img, coord, cell) - target) / std) ** 2 * valid).sum() / (valid.sum() * 10).clamp(min=1)

    return heads.train_and_record(net, lambda: train.batch(args.batch), loss_of, args, start,
                                  lambda n: evaluate(n, val), export, folder, "render", FILE_NAME,
                                  "train_render", prepared, {
        "what": "a decoded date queried at any point and pixel size (LIIF-style: bicubic of the decode plus an MLP on "
                "a feature grid, the query's offset in its pixel and its cell size); corsa decompress --scale / --like",
        "reach_px": reach_px(args.blocks), "scales_trained": list(SCALES), "qualities_trained": list(QUALITIES)})


if __name__ == "__main__":
    main()
