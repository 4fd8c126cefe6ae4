"""corsa2: a variable-rate codec with scalar-quantised latents, trained for rate and distortion.

encoder: DN (10 bands, 10 m) -> Yeo-Johnson + standardise -> space-to-depth to the 40 m grid (all
  compute there: a 10 m pixel costs 1/16 of a 40 m cell) -> residual conv net -> latent y (L channels).
quantiser, per quality level q: ``round(y * gain[q])`` (integers, what the product stores);
  the decoder sees ``ints * inv_gain[q]``. Gains are learned per level and channel (the "gained"
  variable-rate scheme of Cui et al. 2021, CompressAI's VBR models), so one network serves every rate.
decoder: latent -> residual conv net at 40 m -> pixel shuffle to 20 m -> light conv -> 10 m.
rate during training: each (level, channel) has a Laplace prior; the loss is
  lambda[q] * MSE / var(DN) + bits per pixel, with a random level per crop. At run time a counted,
  integer context model codes the ints (``corsa.codec.latent_coder``), never this float prior.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from corsa.codec.latent_coder import ANCHOR_BUCKETS, CHANNEL_BUCKETS, CONTEXTS, SPATIAL_BUCKETS, M

from .model import InputTransform, ResBlock


@dataclass
class RateConfig:
    bands: int = 10
    stride: int = 4            # latent grid: 40 m
    latent: int = 64           # latent channels
    width: int = 96            # channels at 40 m
    width20: int = 48          # channels at 20 m in the decoder
    blocks_enc: int = 2
    blocks_dec: int = 3
    # v4: capacity where the high levels need it (0: the corsa2/3 decoder). Residual blocks at
    # 20 m after the upsampling, and a refinement at 10 m of this many channels; both start as
    # the identity (last conv zero), so a trained corsa3 decoder warm-starts them unchanged.
    blocks20: int = 0
    width10: int = 0
    # v4: the kernel of the decoder's first convolution (latent -> 40 m features; 1: a 1x1, a tenth
    # of a 3x3's multiply-adds, the float layer that cost the int8 decoder most; the 40 m blocks after
    # it still see the neighbours).
    first_kernel: int = 3
    # v4: the rate term of the loss counts bits as the run-time coder will: a Laplace per level,
    # channel and context of ``corsa.codec.latent_coder`` (channel activity, anchor neighbours), so
    # training shapes the latents for the contexts that code them. False: one Laplace per channel.
    context_prior: bool = False
    # Rate-distortion trade-off of each quality level, lowest quality first.
    lambdas: list[float] = field(default_factory=lambda: [25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0])

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def levels(self) -> int:
        return len(self.lambdas)


class RateCodec(nn.Module):
    def __init__(self, cfg: RateConfig, transform: InputTransform, out_mean: list[float], out_std: list[float]):
        super().__init__()
        if cfg.stride != 4:
            raise ValueError("this architecture has its latent grid at stride 4 (40 m)")
        self.cfg = cfg
        self.transform = transform
        c, lat, q = cfg.width, cfg.latent, cfg.levels
        self.enc = nn.Sequential(nn.PixelUnshuffle(4), nn.Conv2d(16 * cfg.bands, c, 1),
                                 *[ResBlock(c) for _ in range(cfg.blocks_enc)], nn.Conv2d(c, lat, 1))
        self.dec = nn.Sequential(nn.Conv2d(lat, c, cfg.first_kernel, padding=cfg.first_kernel // 2), *[ResBlock(c) for _ in range(cfg.blocks_dec)],
                                 nn.Conv2d(c, 4 * cfg.width20, 1), nn.PixelShuffle(2), nn.GELU(),
                                 nn.Conv2d(cfg.width20, cfg.width20, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(cfg.width20, 4 * cfg.bands, 1), nn.PixelShuffle(2),
                                 nn.Conv2d(cfg.bands, cfg.bands, 3, padding=1))
        self.refine20 = nn.Sequential(*[ResBlock(cfg.width20) for _ in range(cfg.blocks20)])
        self.refine10 = nn.Sequential(nn.Conv2d(2 * cfg.bands, cfg.width10, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(cfg.width10, cfg.width10, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(cfg.width10, cfg.bands, 3, padding=1)) if cfg.width10 else None
        for block in self.refine20:
            nn.init.zeros_(block.conv2.weight), nn.init.zeros_(block.conv2.bias)
        if self.refine10 is not None:
            nn.init.zeros_(self.refine10[-1].weight), nn.init.zeros_(self.refine10[-1].bias)
        # Gains spaced like the lambdas at start (step ~ lambda^-1/2 for MSE), learned from there.
        init = torch.tensor([0.5 * math.log(lam / cfg.lambdas[-1]) for lam in cfg.lambdas]) + math.log(4.0)
        self.log_gain = nn.Parameter(init[:, None].repeat(1, lat))
        self.log_inv_gain = nn.Parameter(-init[:, None].repeat(1, lat))
        self.prior_mean = nn.Parameter(torch.zeros(q, lat))
        self.prior_log_scale = nn.Parameter(torch.zeros(q, lat))
        if cfg.context_prior:
            self.ctx_mean = nn.Parameter(torch.zeros(q, lat, CONTEXTS))
            self.ctx_log_scale = nn.Parameter(torch.zeros(q, lat, CONTEXTS))
        self.register_buffer("lambdas", torch.tensor(cfg.lambdas))
        self.register_buffer("out_mean", torch.tensor(out_mean).view(1, -1, 1, 1))
        self.register_buffer("out_std", torch.tensor(out_std).view(1, -1, 1, 1))

    # -- the pieces the ONNX files are made of (quantisation itself runs in numpy) --------
    def analysis(self, dn: torch.Tensor) -> torch.Tensor:
        """DN (N, 10, H, W), H and W multiples of 4 -> latent y (N, L, H/4, W/4), before gains."""
        # The latent is quantised with unit bins: under bf16 autocast its last conv stays fp32,
        # or bf16 rounding (1/128 relative) would be training noise the exported fp32 model never has.
        return _full_precision(self.enc[-1], self.enc[:-1](self.transform(dn)))

    def synthesis(self, y_hat: torch.Tensor) -> torch.Tensor:
        """Dequantised latent (ints * inv_gain) -> DN (N, 10, H, W) float."""
        # DN only to within bf16's 1/128 would cap the PSNR the loss sees
        h20 = self.refine20(self.dec[:7](y_hat))          # 20 m features, after the pixel shuffle and GELU
        h10 = self.dec[7:-1](h20)                         # the 10 bands at 10 m, before the last conv
        out = _full_precision(self.dec[-1], h10)
        if self.refine10 is not None:
            out = out + _full_precision(self.refine10, torch.cat([out, h10.float()], 1))
        return out * self.out_std + self.out_mean

    def gains(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_gain.exp(), self.log_inv_gain.exp()

    # -- training pass ---------------------------------------------------------------------
    def forward(self, dn: torch.Tensor, level: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.analysis(dn)
        g, ig = self.gains()
        s = y * g[level][:, :, None, None]
        noisy = s + torch.empty_like(s).uniform_(-0.5, 0.5)
        hard = s + (torch.round(s) - s).detach()          # straight-through rounding for the decoder
        recon = self.synthesis(hard * ig[level][:, :, None, None])
        ints = torch.round(s).detach()
        return {"recon": recon, "bits": self.bits(noisy, level, ints), "ints": ints}

    def bits(self, values: torch.Tensor, level: torch.Tensor, ints: torch.Tensor) -> torch.Tensor:
        """Bits of each item's (N, L, h, w) ``values`` (noisy in training, the integers in
        evaluation) at its level, under the prior; ``ints`` give the contexts."""
        if self.cfg.context_prior:
            ctx = context_ids(ints).flatten(2)                                  # (N, L, h*w)
            mu = self.ctx_mean[level].gather(2, ctx).view_as(values)
            scale = self.ctx_log_scale[level].gather(2, ctx).view_as(values).exp()
        else:
            mu = self.prior_mean[level][:, :, None, None]
            scale = self.prior_log_scale[level][:, :, None, None].exp()
        return -torch.log2(laplace_mass(values - mu, scale).clamp(min=1e-9)).flatten(1).sum(1)


def _bit_length(a: torch.Tensor, buckets: int) -> torch.Tensor:
    """``int.bit_length`` of non-negative integers (as floats), capped at ``buckets - 1``: the
    run-time coder's bucket of an activity."""
    return torch.where(a > 0, torch.floor(torch.log2(a.clamp(min=1))) + 1, torch.zeros_like(a)).clamp(max=buckets - 1).long()


def context_ids(ints: torch.Tensor) -> torch.Tensor:
    """(N, L, h, w) integers -> the context id ``corsa.codec.latent_coder`` codes each with: anchor
    cells ((y + x) even) by the activity of the channels before at the cell; the others by the
    magnitudes of their four anchor neighbours in the channel and that activity."""
    mag = ints.abs().clamp(max=M + 1)
    act = (torch.cumsum(mag, 1) - mag).clamp(max=4095)
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=ints.device)
    lat = ints.shape[1]
    spatial = F.conv2d(mag, cross.expand(lat, 1, 3, 3), padding=1, groups=lat).clamp(max=4095)
    h, w = ints.shape[2:]
    yy, xx = torch.meshgrid(torch.arange(h, device=ints.device), torch.arange(w, device=ints.device), indexing="ij")
    anchor = ((yy + xx) % 2 == 0)
    other = ANCHOR_BUCKETS + _bit_length(spatial, SPATIAL_BUCKETS) * CHANNEL_BUCKETS + _bit_length(act, CHANNEL_BUCKETS)
    return torch.where(anchor, _bit_length(act, ANCHOR_BUCKETS), other)


def _full_precision(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if not torch.is_autocast_enabled(h.device.type):
        return layer(h)
    with torch.autocast(h.device.type, enabled=False):
        return layer(h.float())


def laplace_mass(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Probability of the unit bin centred on x under Laplace(0, scale), stable in both tails."""
    def cdf(v: torch.Tensor) -> torch.Tensor:
        # clamped so the branch torch.where discards never overflows (inf * 0 = NaN in the gradient)
        return torch.where(v < 0, 0.5 * torch.exp(v.clamp(max=0) / scale), 1 - 0.5 * torch.exp(-v.clamp(min=0) / scale))
    lo, hi = x - 0.5, x + 0.5
    # Upper tail: 1 - cdf loses precision; use the mirrored lower-tail form there.
    upper = 0.5 * (torch.exp(-lo.clamp(min=0) / scale) - torch.exp(-hi.clamp(min=0) / scale))
    return torch.where(lo >= 0, upper, cdf(hi) - cdf(lo))


def widen_state(old: dict[str, torch.Tensor], model: RateCodec) -> dict[str, torch.Tensor]:
    """A trained model's weights placed in a model with more latent channels, more quality levels
    and / or the v4 decoder's refinements, so that it starts as the trained one (function-preserving,
    up to small new weights).

    New latent channels: encoder rows at their fresh init, decoder columns at 1/10 of theirs (the
    decoder barely sees them at first), gains and prior as the mean of the trained channels. Levels
    are matched by lambda (a state without lambdas: its levels are the lowest ones); a new level's
    gains are interpolated linearly in log lambda between the trained levels (extrapolated from the
    nearest two beyond them), its prior copied from the nearest trained level. New modules (the v4
    refinements) keep their init, which is the identity."""
    new = {k: v.clone() for k, v in model.state_dict().items()}
    lat0, q0 = old["log_gain"].shape[1], old["log_gain"].shape[0]
    lat, lambdas = model.cfg.latent, [float(v) for v in model.cfg.lambdas]
    trained = [float(v) for v in old["lambdas"]] if "lambdas" in old else lambdas[:q0]
    if lat < lat0 or not set(trained) <= set(lambdas):
        raise ValueError(f"cannot narrow a model ({lat0} channels, lambdas {trained}) to {lat} channels, "
                         f"lambdas {lambdas}")
    for k, v in old.items():
        if k not in new:
            raise ValueError(f"the trained state has {k}, the new model does not")
        if k in ("lambdas", "log_gain", "log_inv_gain", "prior_mean", "prior_log_scale"):
            continue
        if new[k].shape == v.shape:
            new[k] = v.clone()
            continue
        if new[k].dim() != v.dim():
            raise ValueError(f"{k}: shape {tuple(v.shape)} cannot be widened to {tuple(new[k].shape)}")
        if k.startswith("dec.0."):                       # the decoder's first conv reads the latent
            new[k][:, lat0:] *= 0.1
        new[k][tuple(slice(0, n) for n in v.shape)] = v
    x = torch.tensor(trained).log()
    for k in ("log_gain", "log_inv_gain", "prior_mean", "prior_log_scale"):
        t = torch.cat([old[k], old[k].mean(1, keepdim=True).expand(q0, lat - lat0)], 1)
        for level, lam in enumerate(lambdas):
            if lam in trained:
                new[k][level] = t[trained.index(lam)]
                continue
            order = torch.argsort((x - math.log(lam)).abs())
            if k in ("log_gain", "log_inv_gain") and q0 >= 2:
                a, b = sorted(order[:2].tolist())      # the bracketing pair, or the last two beyond the ends
                w = (math.log(lam) - x[a]) / (x[b] - x[a])
                new[k][level] = t[a] + w * (t[b] - t[a])
            else:
                new[k][level] = t[order[0]]
    return new
