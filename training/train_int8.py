"""Quantisation-aware fine-tuning of a variable-rate model's decoder for int8 kernels, and its export
(``decoder_int8.onnx`` beside ``decoder.onnx``, entry ``files.decoder_int8`` and section ``int8`` of the card).

    python -m training.train_int8 --model corsa4b --steps 2000 --lr 0.0001   # seeded; ~15 min on 1 thread (AMD EPYC)

The decoder is trained from its fp32 weights with the quantisation onnxruntime applies simulated in the
forward pass: 7-bit weights per output channel (symmetric), uint8 activations per tensor at the inputs
and outputs of the quantised convolutions, their ranges a moving average of each batch's minimum and
maximum (onnxruntime's MinMax calibration with moving average, which the export then runs on batches
drawn the same way).

What is quantised: the 3x3 convolutions of the residual branches (the 40 m and 20 m blocks, the 10 m
refinement: about three quarters of the decoder's multiply-adds; a v3 decoder such as corsa3.1's has only
the 40 m blocks, 71% of its multiply-adds). What stays float: the main path
(the residual sums, the convolutions that change the grid, the two that give the bands), which
carries all the latent's information, and the activations. Measured on corsa4b (BENCHMARKS.md):
everything in 8 bits (sums and main path too, ReLU for GELU) stalled 1.8 dB below the float decoder;
the residual branches alone with ReLU for GELU (``--act relu``: onnxruntime folds a ReLU into the
convolution before it, a GELU runs in float) 0.7 dB below, the swap itself being the loss (fine-tuned
in float it recovers no better); with the model's own GELU, 0.02 dB below before any fine-tuning.
``--main20`` quantises the main path's 20 m convolution too, ``--first`` its first convolution (latent ->
40 m features: its input, the dequantised latent, in 8 bits per tensor); ``--hidden N`` prunes the 40 m residual
branches to N inner channels first (a cheaper decoder distilled from the model's own); the two
upsamplings (1x1 convolution and pixel shuffle) are exported as transposed convolutions, the same sums
(``SubPixelUp``). What each gave: BENCHMARKS.md, issue 28.

The encoder, the gains and the integers are untouched: products stay as they are; only decoded pixels
differ (the card states by how much). Loss: the mean over crops of log MSE (each crop at a random
level): every level gains in dB alike.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from corsa.codec.models import VariableRateCodec, model_dir
from corsa.core.machine import cpu_name
from corsa.core.metrics import is_small, psnr
from corsa.core.scene import to_uint16
from corsa.formats import stream_format
from corsa.formats.datasets import load_split

from .data import CropSampler
from .export import OPSET
from .export_rate import card_markdown, load_model
from .rate_model import RateCodec
from .train import SPLIT_FILE, lr_at, pad_to
from .train_rate import distortion

FILE_NAME = "decoder_int8.onnx"
MOMENTUM = 0.01          # of the ranges' moving average (onnxruntime's CalibMovingAverageConstant)
WEIGHT_MAX = 64          # onnxruntime's int8 range with reduce_range
MAX_LOSS_DB = 0.05       # a level decodes with int8 kernels by default where they cost at most this


class FakeQuant(nn.Module):
    """uint8 per tensor (asymmetric, zero in range), as onnxruntime quantises an activation."""

    def __init__(self):
        super().__init__()
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.training:
            with torch.no_grad():
                lo, hi = x.min(), x.max()
                if not self.seen:
                    self.lo.copy_(lo), self.hi.copy_(hi), self.seen.fill_(True)
                else:
                    self.lo.lerp_(lo, MOMENTUM), self.hi.lerp_(hi, MOMENTUM)
        lo, hi = self.lo.clamp(max=0), self.hi.clamp(min=0)
        scale = ((hi - lo) / 255).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(0, 255).to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zero.reshape(1), 0, 255)


class QConv(nn.Module):
    """A convolution with 7-bit weights per output channel (symmetric, -64..64: onnxruntime's
    reduce_range) and uint8 input and output. 7 bits, so that no sum of two products overflows 16
    bits on CPUs without VNNI (AVX2's vpmaddubsw saturates there): the integers every x86 CPU
    computes are then the same."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv, self.fin, self.fout = conv, FakeQuant(), FakeQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        if self.fin.enabled:
            scale = (w.detach().abs().amax((1, 2, 3)) / WEIGHT_MAX).clamp(min=1e-8)
            w = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0,
                                                       -WEIGHT_MAX, WEIGHT_MAX)
        return self.fout(F.conv2d(self.fin(x), w, self.conv.bias, padding=self.conv.padding))


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class QResBlock(nn.Module):
    """A residual block whose two convolutions are int8; the sum stays float."""

    def __init__(self, block: nn.Module, act: str):
        super().__init__()
        self.conv1, self.conv2, self.act = QConv(block.conv1), QConv(block.conv2), ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class SubPixelUp(nn.Module):
    """A 1x1 convolution to 4C channels followed by a pixel shuffle, computed as one transposed
    convolution of stride 2 and a bias per channel and sub-pixel: the same sums, without
    onnxruntime's DepthToSpace pass over the features (with it, the two upsamplings took 17% of
    the int8 decoder's time on a block, AMD EPYC)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        c = conv.out_channels // 4
        self.up = nn.ConvTranspose2d(conv.in_channels, c, 2, stride=2, bias=False)
        # pixel_shuffle: output (c, 2y + i, 2x + j) is input channel 4c + 2i + j
        self.up.weight.data.copy_(conv.weight.detach()[:, :, 0, 0].view(c, 2, 2, -1).permute(3, 0, 1, 2))
        self.bias = nn.Parameter(conv.bias.detach().view(1, c, 1, 2, 1, 2).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias enters the sums as the weight of one more input channel, all ones: onnxruntime
        # adds a bias broadcast over sub-pixels in a slow generic loop (a quarter of the decoder's time).
        ones = torch.ones_like(x[:, :1])
        weight = torch.cat([self.up.weight, self.bias.view(1, -1, 2, 2)], 0)
        return F.conv_transpose2d(torch.cat([x, ones], 1), weight, stride=2)


def important(block: nn.Module, x: torch.Tensor, hidden: int) -> torch.Tensor:
    """The ``hidden`` inner channels of residual ``block``'s branch that its second convolution
    passes on most, as seen on the features ``x`` (mean activation size times the norm of their
    weights in it), in order."""
    with torch.no_grad():
        inner = F.gelu(block.conv1(F.gelu(x)))
        score = inner.abs().mean((0, 2, 3)) * block.conv2.weight.flatten(2).norm(dim=(0, 2))
    return score.argsort(descending=True)[:hidden].sort().values


def pruned(block: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of residual ``block`` whose branch keeps only the inner channels ``keep``."""
    out = copy.deepcopy(block)
    c1, c2 = out.conv1, out.conv2
    out.conv1 = nn.Conv2d(c1.in_channels, len(keep), 3, padding=1)
    out.conv2 = nn.Conv2d(len(keep), c2.out_channels, 3, padding=1)
    with torch.no_grad():
        out.conv1.weight.copy_(c1.weight[keep]), out.conv1.bias.copy_(c1.bias[keep])
        out.conv2.weight.copy_(c2.weight[:, keep]), out.conv2.bias.copy_(c2.bias)
    return out


class Simulated(nn.Module):
    """A network with int8 kernels simulated (``FakeQuant``), which can be turned off."""

    def quantise(self, on: bool) -> "Simulated":
        for m in self.modules():
            if isinstance(m, FakeQuant):
                m.enabled = on
        return self


class Int8Decoder(Simulated):
    """``RateCodec.synthesis`` with its residual branches' convolutions int8, its activations
    ``act`` (the model's own GELU, or ReLU: module doc); ``main20``: the 3x3 convolution of the
    main path at 20 m int8 too; ``first``: its first convolution too; ``hidden``: the 40 m residual
    branches pruned to that many inner channels (``pruned``, on the features of ``sample``,
    dequantised latents), to be fine-tuned."""

    def __init__(self, codec: RateCodec, act: str = "gelu", main20: bool = False, hidden: int | None = None,
                 sample: torch.Tensor | None = None, first: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[act]
        codec = copy.deepcopy(codec)       # trained here: the fp32 model stays as it is
        d, cfg = codec.dec, codec.cfg
        self.first = QConv(d[0]) if first else d[0]
        blocks = list(d[1:1 + cfg.blocks_dec])
        if hidden:
            with torch.no_grad():
                h = d[0](sample)
                for i, b in enumerate(blocks):
                    blocks[i] = pruned(b, important(b, h, hidden))
                    h = b(h)
        self.blocks40 = nn.Sequential(*[QResBlock(b, act) for b in blocks])
        k = 1 + cfg.blocks_dec
        self.up20, self.blocks20 = SubPixelUp(d[k]), nn.Sequential(*[QResBlock(b, act) for b in codec.refine20])
        self.conv20, self.up10, self.last = QConv(d[k + 3]) if main20 else d[k + 3], SubPixelUp(d[k + 5]), d[k + 7]
        r = codec.refine10        # v4: a 10 m refinement; v3 (corsa3.1) has none
        self.refine_a, self.refine_b, self.refine_out = (QConv(r[0]), QConv(r[2]), r[4]) if r is not None else (None,) * 3
        self.register_buffer("out_mean", codec.out_mean.clone())
        self.register_buffer("out_std", codec.out_std.clone())

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self.blocks40(self.first(latent))
        h = self.blocks20(self.act(self.up20(h)))
        h10 = self.up10(self.act(self.conv20(h)))
        out = self.last(h10)
        if self.refine_out is None:
            return out * self.out_std + self.out_mean
        out = out + self.refine_out(self.act(self.refine_b(self.act(self.refine_a(torch.cat([out, h10], 1))))))
        return out * self.out_std + self.out_mean


def int8_nodes(graph, net: nn.Module) -> list[str]:
    """The exported graph's convolutions that ``QConv`` simulated in ``net`` (its module names are in theirs)."""
    quantised = {name.split(".")[-1] for name, m in net.named_modules() if isinstance(m, QConv)}
    return [n.name for n in graph.node if n.op_type == "Conv" and n.name.split("/")[-2] in quantised]


def _latents(model: RateCodec, sampler: CropSampler, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's crops and their dequantised latents, each crop at a random level."""
    x = torch.from_numpy(sampler.batch(batch))
    with torch.no_grad():
        g, ig = model.gains()
        level = torch.randint(0, model.cfg.levels, (batch,))
        z = torch.round(model.analysis(x) * g[level][:, :, None, None]) * ig[level][:, :, None, None]
    return x, z


@torch.no_grad()
def validate(model: RateCodec, net: Int8Decoder, scenes, levels: list[int]) -> dict:
    """Mean PSNR (peak 10000) over ``scenes`` at ``levels``: the fp32 decoder, and this one (int8 simulated)."""
    net.eval()
    g, ig = model.gains()
    this = "int8_simulated" if any(m.enabled for m in net.modules() if isinstance(m, FakeQuant)) else "float_finetuned"
    out = {"fp32": [], this: []}
    for s in scenes:
        y = model.analysis(torch.from_numpy(pad_to(s.data, 4).astype(np.float32))[None])
        x = torch.from_numpy(s.data.astype(np.float32))[None]
        for q in levels:
            z = torch.round(y * g[q][None, :, None, None]) * ig[q][None, :, None, None]
            for key, rec in (("fp32", model.synthesis(z)), (this, net(z))):
                rec = rec[..., :s.data.shape[1], :s.data.shape[2]].round().clamp(0, 65535)
                out[key].append(float(10 * torch.log10(1e8 / distortion(rec, x, 1.0).clamp(min=1e-6))))
    net.train()
    return {k: round(float(np.mean(v)), 3) for k, v in out.items()}


def fused_gelu(model):
    """``model`` (an onnx ModelProto) with each GELU that torch exports at opset 17 (``x * (1 + erf(x /
    sqrt 2)) * 0.5``: Div, Erf, Add, Mul, Mul) as one com.microsoft Gelu node. onnxruntime fuses that
    chain itself in a float graph, but not once quantisation has given each consumer of x its own
    dequantised copy: unfused, the chains took a fifth of the int8 decoder's time."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    made = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    inits = {i.name: i for i in g.initializer}

    def constant(name: str) -> float:
        return float(numpy_helper.to_array(inits[name] if name in inits else made[name].attribute[0].t))

    gone, fused = set(), {}
    for erf in (n for n in g.node if n.op_type == "Erf"):
        div = made[erf.input[0]]
        (add,) = users[erf.output[0]]
        (mul,) = users[add.output[0]]
        (half,) = users[mul.output[0]]
        x = div.input[0]
        if not (div.op_type == "Div" and add.op_type == "Add" and mul.op_type == "Mul" and half.op_type == "Mul"
                and x in mul.input and abs(constant(div.input[1]) - 2 ** 0.5) < 1e-6
                and constant(add.input[1]) == 1 and constant(half.input[1]) == 0.5):
            raise ValueError(f"{erf.name} is not part of an exported GELU")
        gone |= {id(n) for n in (div, erf, add, mul, half)} | {id(made[i]) for i in (div.input[1], add.input[1],
                                                                                      half.input[1]) if i in made}
        fused[id(half)] = onnx.helper.make_node("Gelu", [x], list(half.output), name=erf.name.replace("Erf", "Gelu"),
                                                domain="com.microsoft")
    nodes = [fused.get(id(n), n) for n in g.node if id(n) not in gone or id(n) in fused]
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def quantised_export(net: Simulated, example: torch.Tensor, names: tuple[str, str], batches: Iterator[np.ndarray],
                     path: Path) -> None:
    """``net`` as float ONNX (input and output ``names``; batch and grid dynamic), then quantised by
    onnxruntime where ``QConv`` simulated it (QDQ, per-channel int8 weights, uint8 activations), the
    ranges calibrated on ``batches`` (inputs drawn as in training)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static, shape_inference

    class Batches(CalibrationDataReader):
        def get_next(self):
            x = next(batches, None)
            return None if x is None else {names[0]: x}

    net.quantise(False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        plain, pre = f"{tmp}/float.onnx", f"{tmp}/pre.onnx"
        with torch.no_grad():
            torch.onnx.export(net, (example,), plain, input_names=[names[0]], output_names=[names[1]],
                              dynamic_axes={names[0]: {0: "n", 2: "h", 3: "w"}, names[1]: {0: "n", 2: "y", 3: "x"}},
                              opset_version=OPSET, dynamo=False)
        shape_inference.quant_pre_process(plain, pre, skip_symbolic_shape=True)
        quantize_static(pre, str(path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                        op_types_to_quantize=["Conv"], nodes_to_quantize=int8_nodes(onnx.load(pre).graph, net),
                        extra_options={"CalibMovingAverage": True, "CalibMovingAverageConstant": MOMENTUM})
    onnx.save(fused_gelu(onnx.load(str(path))), str(path))
    net.quantise(True).train()


def export(net: Int8Decoder, model: RateCodec, sampler: CropSampler, batch: int, path: Path) -> None:
    """The fine-tuned decoder, quantised (``quantised_export``) on 200 training batches' latents."""
    quantised_export(net, torch.zeros(1, model.cfg.latent, 16, 16), ("latent", "dn"),
                     (_latents(model, sampler, batch)[1].numpy() for _ in range(200)), path)


def block_seconds(session, channels: int) -> float:
    """One 512 px block (128 x 128 latent cells) through a decoder session, best of 3 after a first run."""
    z = np.random.default_rng(0).standard_normal((1, channels, 128, 128)).astype(np.float32)
    session.run(None, {"latent": z})
    times = []
    for _ in range(3):
        t = time.perf_counter()
        session.run(None, {"latent": z})
        times.append(time.perf_counter() - t)
    return round(min(times), 4)


def test_figures(folder: Path, split: str = "test") -> dict:
    """The int8 decoder against the float one on a split's L2A scenes (small patches left out, as in
    benchmarks.rd_rate's means), through onnxruntime as
    products decode: PSNR per level as the mean over sources, the worst scene's loss, the largest DN
    difference; the same for the default kernels ("auto": the int8 decoder at the card's levels, its
    bright tiles in float, ``corsa_udf.BrightGuard``); and the time of a block on 1 thread. A refined
    model's products are refined at every kernel (against the default kernels' decoding, as written)."""
    fp32, int8, auto = (VariableRateCodec(folder, 1, k) for k in ("fp32", "int8", "auto"))
    scenes = [s for s in load_split(SPLIT_FILE, split) if s.extra.get("level") != "L1C" and not is_small(s.data)]
    latents = [fp32.latent(s.data) for s in scenes]
    levels, worst, largest, worst_default = {}, 0.0, 0, 0.0
    for q in fp32.qualities:
        per = {}
        for s, y in zip(scenes, latents):
            ints = fp32.quantise(y, q)
            a, b, c = (codec.synthesis(ints, q, s.data.shape[1:]) for codec in (fp32, int8, auto))
            if auto.refines(q):     # a product's refinement is made against the default kernels' decoding
                cells = stream_format.refinement_cells(auto.refiner, auto.level(q), s.data, c, ~s.nodata_mask)
                a, b, c = (stream_format.refine(d, cells, auto.refiner, auto.level(q)) for d in (a, b, c))
            a, b, c = (to_uint16(d) for d in (a, b, c))
            for d in (a, b, c):
                d[:, s.nodata_mask] = 0
            pa, pb, pc = psnr(s.data, a), psnr(s.data, b), psnr(s.data, c)
            per.setdefault(s.group, []).append((pa, pb, pc))
            worst, largest = max(worst, pa - pb), max(largest, int(np.abs(a.astype(np.int32) - b).max()))
            worst_default = max(worst_default, pa - pc)
        means = np.mean([np.mean(v, 0) for v in per.values()], 0)
        levels[str(q)] = {"psnr_db_fp32": round(float(means[0]), 3), "psnr_db_int8": round(float(means[1]), 3),
                          "psnr_db_default": round(float(means[2]), 3)}
    return {"levels": levels, "psnr_loss_db_max": round(worst, 3), "max_dn_difference": largest,
            "default_psnr_loss_db_max": round(worst_default, 3),
            "block_s_fp32": block_seconds(fp32.decoder(), fp32.channels),
            "block_s_int8": block_seconds(int8.decoder(), int8.channels), "cpu": cpu_name()}


def int8_levels(folder: Path) -> dict:
    """The quality levels the int8 decoder decodes by default (``corsa_udf.network_file``, kernels
    "auto"): those where it costs at most MAX_LOSS_DB against the float decoder on the validation
    split (mean over sources), with those figures. The test split only reports."""
    val = test_figures(folder, "val")
    levels = [int(q) for q, v in val["levels"].items() if v["psnr_db_fp32"] - v["psnr_db_int8"] <= MAX_LOSS_DB]
    return {"levels": levels, "levels_rule": f"validation split: at most {MAX_LOSS_DB} dB below the float decoder",
            "validation": {k: val[k] for k in ("levels", "psnr_loss_db_max", "max_dn_difference")}}


def train(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder = model_dir(args.model)
    model = load_model(folder)
    sampler = CropSampler(load_split(SPLIT_FILE, "train"), args.crop, args.seed, max_weight_px=250_000)
    sample = torch.cat([_latents(model, sampler, args.batch)[1] for _ in range(8)]) if args.hidden else None
    net = Int8Decoder(model, args.act, args.main20, args.hidden, sample, args.first).train()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    val = [s for s in load_split(SPLIT_FILE, "val") if min(s.data.shape[1:]) >= 128][: args.val_scenes]
    levels = list(range(0, model.cfg.levels, 2)) + [model.cfg.levels - 1]
    run = run_folder(args)
    run.mkdir(parents=True, exist_ok=True)
    log = (run / "log.jsonl").open("a")
    t0 = time.time()
    record = {"step": 0, **validate(model, net.quantise(False), val, levels)}
    net.quantise(not args.float_only)
    for step in range(1, args.steps + 1):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step - 1, args.steps, args.lr, warmup=100)
        x, z = _latents(model, sampler, args.batch)
        loss = torch.log(distortion(net(z), x, 1.0).clamp(min=1e-3)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.val_every == 0 or step == args.steps or step == 1:
            record = {"step": step, "loss": round(float(loss.detach()), 4), "elapsed_s": round(time.time() - t0, 1),
                      **validate(model, net, val, levels)}
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n"), log.flush()
    if args.float_only:
        return run
    torch.save({"model": net.state_dict(), "record": record, "wall_time_s": round(time.time() - t0, 1), "act": args.act,
                "main20": args.main20, "hidden": args.hidden, "first": args.first}, run / "int8_decoder.pt")
    return finish(args)


def run_folder(args: argparse.Namespace) -> Path:
    """Where a run of these options logs and keeps its decoder."""
    return Path(args.runs) / (f"int8_{Path(args.model).name}" + ("_main20" if args.main20 else "")
                              + ("_first" if args.first else "")
                              + (f"_h{args.hidden}" if args.hidden else "") + ("_float" if args.float_only else ""))


def what(act: str, main20: bool, hidden: int | None, first: bool = False) -> str:
    """The card's words for an int8 decoder of these options."""
    return (("the decoder with ReLU for GELU" if act == "relu" else "the decoder")
            + (f", its 40 m residual branches pruned to {hidden} inner channels," if hidden else "")
            + " fine-tuned with int8 kernels simulated (training.train_int8) and quantised by onnxruntime (QDQ: "
              "7-bit weights per channel, uint8 activations); the 3x3 convolutions of the residual branches"
            + (" and the 20 m convolution of the main path" if main20 else "")
            + (" and the first convolution (its input the dequantised latent in 8 bits)" if first else "")
            + " int8, the rest of the main "
              "path float; the upsamplings as transposed convolutions (the same sums as the float decoder's 1x1 "
              "convolution and pixel shuffle)")


def finish(args: argparse.Namespace) -> Path:
    """Export the run's fine-tuned decoder (``run_folder``/int8_decoder.pt) into the model folder
    and describe it in the card (figures measured on the exported file)."""
    folder = model_dir(args.model)
    model = load_model(folder)
    saved = torch.load(run_folder(args) / "int8_decoder.pt", weights_only=False)
    hidden = saved.get("hidden")
    # pruning only chooses the shapes here: the weights are the run's
    sample = torch.zeros(1, model.cfg.latent, 8, 8) if hidden else None
    net = Int8Decoder(model, saved["act"], saved.get("main20", False), hidden, sample, saved.get("first", False))
    net.load_state_dict(saved["model"])
    path = folder / FILE_NAME
    export(net, model, CropSampler(load_split(SPLIT_FILE, "train"), args.crop, args.seed + 1, max_weight_px=250_000),
           args.batch, path)
    card_path = folder / "model_card.json"
    card = json.loads(card_path.read_text())
    card["files"]["decoder_int8"] = {"path": FILE_NAME, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                     "bytes": path.stat().st_size}
    card_path.write_text(json.dumps(card, indent=1) + "\n")          # the figures below decode with it
    card["int8"] = {"what": what(saved["act"], saved.get("main20", False), hidden, saved.get("first", False)),
                    "steps": args.steps, "validation_psnr_db": saved["record"], **int8_levels(folder),
                    "wall_time_s": saved["wall_time_s"], "cpu": cpu_name(), "threads": args.threads,
                    "command": f"python -m training.train_int8 --model {Path(args.model).name} --steps {args.steps} --batch "
                               f"{args.batch} --crop {args.crop} --lr {args.lr} --threads {args.threads} --seed {args.seed} "
                               f"--act {saved['act']}" + (" --main20" if saved.get("main20") else "")
                               + (f" --hidden {hidden}" if hidden else "") + (" --first" if saved.get("first") else "")}
    card_path.write_text(json.dumps(card, indent=1) + "\n")          # the test figures decode by these levels
    card["int8"]["test"] = test_figures(folder)
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    (folder / "MODEL_CARD.md").write_text(card_markdown(card))
    return path


def relevel(model: str) -> None:
    """The card's int8 section with its default levels and its test figures measured again (the
    exported file unchanged)."""
    folder = model_dir(model)
    card_path = folder / "model_card.json"
    card = json.loads(card_path.read_text())
    card["int8"] = {**card["int8"], **int8_levels(folder)}
    card_path.write_text(json.dumps(card, indent=1) + "\n")          # the test figures decode by these levels
    card["int8"]["test"] = test_figures(folder)
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    (folder / "MODEL_CARD.md").write_text(card_markdown(card))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="corsa4b")
    p.add_argument("--runs", default="runs")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--val-scenes", type=int, default=4)
    p.add_argument("--act", choices=sorted(ACTIVATIONS), default="gelu",
                   help="the decoder's activation: its own GELU, or ReLU (faster kernels; the swap costs quality)")
    p.add_argument("--main20", action="store_true",
                   help="the main path's 20 m convolution in int8 too (its input and output 8-bit ranges)")
    p.add_argument("--first", action="store_true",
                   help="the main path's first convolution in int8 too (its input, the dequantised latent, 8-bit)")
    p.add_argument("--hidden", type=int, default=None,
                   help="prune the 40 m residual branches to this many inner channels before fine-tuning (a "
                        "cheaper decoder distilled from the model's; products stay as they are)")
    p.add_argument("--float-only", action="store_true",
                   help="ablation: fine-tune without simulated quantisation (nothing exported)")
    p.add_argument("--export-only", action="store_true", help="export a finished run again (``finish``)")
    p.add_argument("--levels-only", action="store_true",
                   help="measure an exported int8 decoder's default levels and test figures again into its card")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.levels_only:
        relevel(args.model)
    else:
        finish(args) if args.export_only else train(args)
