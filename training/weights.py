"""Torch models rebuilt from a shipped model folder: the weights in its ONNX files and the card's
architecture (model folders keep what run time reads, no torch state; the exporter kept the
parameter names, under the wrapper's "codec.")."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from corsa.codec.latent_coder import FILE_NAME as TABLES_FILE

from .data import BandStats

PREFIX = "codec."


def load_model(folder: Path, config, build, extra: dict | None = None) -> nn.Module:
    """The torch model of ``folder``: ``config`` from the card's architecture, ``build(config,
    stats)``, the ONNX weights loaded by name; ``extra``: state the ONNX files do not hold. The band
    statistics are ``model.band_stats``; what stays as built (training-only state) ``model.not_in_onnx``."""
    import onnx
    from onnx import numpy_helper

    card = json.loads((Path(folder) / "model_card.json").read_text())
    cfg = config(**{k: v for k, v in card["architecture"].items() if k in config.__dataclass_fields__})
    found = {}
    for path in sorted(Path(folder).glob("*.onnx")):
        for init in onnx.load(str(path)).graph.initializer:
            if init.name.startswith(PREFIX):
                found[init.name[len(PREFIX):]] = torch.from_numpy(numpy_helper.to_array(init).copy())
    flat = [found[k].flatten().tolist() for k in ("transform.lmbda", "transform.mean", "transform.std", "out_mean",
                                                  "out_std")]
    stats = BandStats(*flat)
    model = build(cfg, stats)
    state = model.state_dict()
    loaded = {**found, **(extra or {})}
    state.update({k: v.reshape(state[k].shape) for k, v in loaded.items() if k in state})
    model.load_state_dict(state)
    model.band_stats, model.not_in_onnx = stats, sorted(set(state) - set(loaded))
    return model.eval()


def rate_gains(folder: Path) -> dict:
    """A variable-rate model's gains and lambdas as its torch state holds them (latent_model.npz)."""
    with np.load(Path(folder) / TABLES_FILE) as z:
        return {"log_gain": torch.from_numpy(np.log(z["gain"].astype(np.float32))),
                "log_inv_gain": torch.from_numpy(np.log(z["inv_gain"].astype(np.float32))),
                "lambdas": torch.from_numpy(z["lambdas"].astype(np.float32))}
