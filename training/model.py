"""The codec: a two-level codebook autoencoder (VQ-VAE-2 shaped) for 10-band Sentinel-2 L2A.

encoder: DN (10 bands, 10 m) -> Yeo-Johnson + standardise -> conv net -> level-1 indices on the
  coarse grid (stride 4, 40 m) and, conditioned on them, level-0 indices on the fine grid
  (stride 2, 20 m), each a nearest-neighbour lookup in its codebook.
decoder: indices -> codebook vectors -> conv net -> DN (10 bands, 10 m).
Level 0 sees the decoded level 1, so its codes spend their bits on what level 1 missed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CodecConfig:
    bands: int = 10
    k0: int = 512          # level-0 codebook size (fine grid)
    k1: int = 128          # level-1 codebook size (coarse grid)
    dim0: int = 64         # codebook vector length, level 0
    dim1: int = 64         # codebook vector length, level 1
    stride0: int = 2       # fine grid: 20 m
    stride1: int = 4       # coarse grid: 40 m
    width10: int = 32      # channels at 10 m
    width20: int = 96      # channels at 20 m
    width40: int = 128     # channels at 40 m
    blocks_enc: int = 2
    blocks_dec: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


def _stack(c: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(c) for _ in range(n)])


def _up(cin: int, cout: int) -> nn.Sequential:
    # Pixel shuffle rather than transposed convolution: no checkerboard artefacts.
    return nn.Sequential(nn.Conv2d(cin, cout * 4, 3, padding=1), nn.PixelShuffle(2))


class InputTransform(nn.Module):
    """Yeo-Johnson (for x >= 0) per band, then standardisation; parameters fitted on train data."""

    def __init__(self, lmbda: list[float], mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("lmbda", torch.tensor(lmbda).view(1, -1, 1, 1))
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, dn: torch.Tensor) -> torch.Tensor:
        x = dn.clamp(min=0.0)
        y = (torch.pow(x + 1.0, self.lmbda) - 1.0) / self.lmbda
        return (y - self.mean) / self.std


class VectorQuantizer(nn.Module):
    """Codebook with EMA updates and dead-code restarts (CompressAI/VQ-VAE-2 practice)."""

    def __init__(self, k: int, dim: int, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.k, self.dim, self.decay, self.eps = k, dim, decay, eps
        embed = torch.randn(k, dim) * 0.1
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("usage", torch.zeros(k))

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, dim, h, w) -> nearest code index (N, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t()
                + self.embed.pow(2).sum(1)[None, :])
        return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (N, h, w) -> code vectors (N, dim, h, w)."""
        return F.embedding(idx, self.embed).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Nearest-code search and EMA stay in float32 when training under bf16 autocast.
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.indices(z)
        q = self.lookup(idx)
        commit = F.mse_loss(z, q.detach())
        if self.training:
            self._ema_update(z, idx)
        return z + (q - z).detach(), idx, commit

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        onehot = F.one_hot(idx.reshape(-1), self.k).type(flat.dtype)
        counts = onehot.sum(0)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.k * self.eps) * n
        self.embed.copy_(self.embed_sum / size[:, None])
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        # Restart codes used at under 3% of the average rate on random encoder outputs of this
        # batch, so the whole codebook keeps carrying information.
        dead = self.usage < 0.03 * counts.sum() / self.k
        n_dead = int(dead.sum())
        if n_dead:
            pick = flat[torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)]
            self.embed[dead] = pick
            self.embed_sum[dead] = pick
            self.cluster_size[dead] = 1.0
            self.usage[dead] = counts.sum() / self.k


class Codec(nn.Module):
    def __init__(self, cfg: CodecConfig, transform: InputTransform, out_mean: list[float],
                 out_std: list[float]):
        super().__init__()
        if (cfg.stride0, cfg.stride1) != (2, 4):
            raise ValueError("this architecture has the fine grid at stride 2 and the coarse at 4")
        self.cfg = cfg
        self.transform = transform
        c10, c20, c40 = cfg.width10, cfg.width20, cfg.width40
        # Encoder
        self.enc10 = nn.Sequential(nn.Conv2d(cfg.bands, c10, 3, padding=1), _stack(c10, 1))
        self.enc20 = nn.Sequential(nn.Conv2d(c10, c20, 4, stride=2, padding=1), _stack(c20, cfg.blocks_enc))
        self.enc40 = nn.Sequential(nn.Conv2d(c20, c40, 4, stride=2, padding=1), _stack(c40, cfg.blocks_enc),
                                   nn.Conv2d(c40, cfg.dim1, 1))
        self.vq1 = VectorQuantizer(cfg.k1, cfg.dim1)
        self.vq0 = VectorQuantizer(cfg.k0, cfg.dim0)
        # Level 1 decoded to the fine grid; shared by the encoder (conditioning) and decoder.
        self.dec40 = nn.Sequential(nn.Conv2d(cfg.dim1, c40, 3, padding=1), _stack(c40, 1), _up(c40, c20))
        self.enc20_q = nn.Sequential(nn.Conv2d(2 * c20, c20, 3, padding=1), _stack(c20, 1),
                                     nn.Conv2d(c20, cfg.dim0, 1))
        # Decoder
        self.dec20 = nn.Sequential(nn.Conv2d(cfg.dim0 + c20, c20, 3, padding=1), _stack(c20, cfg.blocks_dec),
                                   _up(c20, c10))
        self.dec10 = nn.Sequential(_stack(c10, 2), nn.GELU(), nn.Conv2d(c10, cfg.bands, 3, padding=1))
        self.register_buffer("out_mean", torch.tensor(out_mean).view(1, -1, 1, 1))
        self.register_buffer("out_std", torch.tensor(out_std).view(1, -1, 1, 1))

    # -- the three pieces the ONNX files are made of --------------------------------------
    def encode(self, dn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DN (N, 10, H, W), H and W multiples of 4 -> (idx0 (N, H/2, W/2), idx1 (N, H/4, W/4))."""
        h20 = self.enc20(self.enc10(self.transform(dn)))
        idx1 = self.vq1.indices(self.enc40(h20))
        z0 = self.enc20_q(torch.cat([h20, self.dec40(self.vq1.lookup(idx1))], 1))
        return self.vq0.indices(z0), idx1

    def features(self, idx0: torch.Tensor, idx1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vq0.lookup(idx0), self.vq1.lookup(idx1)

    def decode(self, idx0: torch.Tensor, idx1: torch.Tensor) -> torch.Tensor:
        q0, q1 = self.features(idx0, idx1)
        return self._synthesis(q0, q1)

    def _synthesis(self, q0: torch.Tensor, q1: torch.Tensor) -> torch.Tensor:
        h = self.dec20(torch.cat([q0, self.dec40(q1)], 1))
        return self.dec10(h) * self.out_std + self.out_mean

    # -- training pass (straight-through quantisation) ------------------------------------
    def forward(self, dn: torch.Tensor) -> dict[str, torch.Tensor]:
        h20 = self.enc20(self.enc10(self.transform(dn)))
        q1, idx1, commit1 = self.vq1(self.enc40(h20))
        d40 = self.dec40(q1)
        q0, idx0, commit0 = self.vq0(self.enc20_q(torch.cat([h20, d40], 1)))
        h = self.dec20(torch.cat([q0, d40], 1))
        recon = self.dec10(h) * self.out_std + self.out_mean
        return {"recon": recon, "idx0": idx0, "idx1": idx1, "commit": commit0 + commit1}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
