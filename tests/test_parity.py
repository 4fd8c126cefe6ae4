"""The shipped ONNX files compute what the torch model they were exported from computes: the torch
model rebuilt from the weights in the folder's ONNX files and the card's architecture (the folder
keeps no torch state; training.export.load_model), run as torch.

Tolerances: at least 99.9% of indices (or of a variable-rate model's integers) identical (a near-tie
between two codebook vectors, or a latent next to a rounding boundary, may flip with float summation
order), and, for the same indices, reconstructions within 0.5 DN.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import corsa_udf
from corsa.codec.codebook import CodebookCodec
from corsa.codec.models import VariableRateCodec
from corsa.formats.datasets import LOADERS
from training import export_rate
from training.export import load_model
from training.train import pad_to

# Codec folders only (a classifier folder has no encoder), by kind.
CODECS = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "models_onnx").glob("*/encoder.onnx"))
RATE = [p for p in CODECS if json.loads((p / "model_card.json").read_text()).get("kind") == "variable-rate"]
MODELS = [p for p in CODECS if p not in RATE]


def _scenes(root):
    yield next(LOADERS["terracodec"](root))
    yield next(LOADERS["worldstrat"](root))
    yield next(LOADERS["bigearthnet"](root))


@pytest.mark.parametrize("model_path", MODELS, ids=[p.name for p in MODELS])
def test_onnx_matches_torch_on_real_scenes(model_path, data_root):
    codec = CodebookCodec(model_path)
    model = load_model(model_path)
    for scene in _scenes(data_root):
        idx0, idx1 = codec.encode(scene.data)
        with torch.no_grad():
            t0, t1 = model.encode(torch.from_numpy(pad_to(scene.data, 4).astype(np.float32))[None])
        assert idx0.shape == tuple(t0.shape[1:]) and idx1.shape == tuple(t1.shape[1:])
        assert np.mean(idx0 == t0[0].numpy()) >= 0.999, scene.name
        assert np.mean(idx1 == t1[0].numpy()) >= 0.999, scene.name
        with torch.no_grad():
            ref = model.decode(torch.from_numpy(idx0.astype(np.int64))[None],
                               torch.from_numpy(idx1.astype(np.int64))[None])[0].numpy()
        got = codec.decode_float(idx0, idx1)
        assert np.abs(got - ref).max() < 0.5, scene.name


@pytest.mark.parametrize("model_path", MODELS, ids=[p.name for p in MODELS])
def test_features_are_the_codebook_vectors(model_path, data_root):
    """features.onnx gives downstream models the codebook vectors without the decoder."""
    codec = CodebookCodec(model_path)
    model = load_model(model_path)
    idx0, idx1 = codec.encode(next(LOADERS["bigearthnet"](data_root)).data)
    f0, f1 = codec.features(idx0, idx1)
    np.testing.assert_allclose(f0, model.vq0.embed[torch.from_numpy(idx0.astype(np.int64))].permute(2, 0, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(f1, model.vq1.embed[torch.from_numpy(idx1.astype(np.int64))].permute(2, 0, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize("model_path", RATE, ids=[p.name for p in RATE])
def test_variable_rate_onnx_matches_torch(model_path, data_root):
    codec = VariableRateCodec(model_path, kernels="fp32")     # the torch model's decoder (int8: test_int8_decoder)
    model = export_rate.load_model(model_path)
    gain, inv_gain = (g.detach() for g in model.gains())
    q = codec.default_quality
    for scene in _scenes(data_root):
        ints = codec.encode(scene.data, q)
        with torch.no_grad():
            y = model.analysis(torch.from_numpy(pad_to(scene.data, 4).astype(np.float32))[None])
            scaled = y * gain[codec.level(q)][None, :, None, None]
            dz = corsa_udf.deadzone_of(codec.card)      # the encoder's dead zone (0: plain rounding)
            ref_ints = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5 - dz) if dz else torch.round(scaled))[0].numpy()
            ref = model.synthesis(torch.from_numpy(ints.astype(np.float32))[None]
                                  * inv_gain[codec.level(q)][None, :, None, None])[0].numpy()
        assert np.mean(ints == ref_ints) >= 0.999, scene.name
        got = codec.decode(ints, q).astype(np.float64)
        assert np.abs(got - np.clip(np.rint(ref), 0, 65535)).max() <= 1, scene.name
