"""The training command runs, resumes from its checkpoint, exports, and the export matches torch.

A smoke step only: a tiny configuration for a few steps on the real train split.
"""
import json
import subprocess
import sys

import numpy as np
import torch

from corsa.codec.codebook import CodebookCodec
from corsa.formats.datasets import LOADERS
from training.export import load_state
from training.train import pad_to

from conftest import ROOT

TINY = ["--k0", "32", "--k1", "8", "--dim", "8", "--width10", "8", "--width20", "16", "--width40", "16",
        "--blocks-dec", "1", "--batch", "2", "--crop", "32", "--val-every", "2", "--val-scenes", "2",
        "--ckpt-every", "2", "--threads", "1"]


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _train_twice(module: str, runs, options: list[str]) -> list[dict]:
    """Two steps, then two more resumed from the checkpoint: the log holds both validations."""
    _run(module, "--name", "smoke", "--runs", str(runs), "--steps", "2", *options)
    out = _run(module, "--name", "smoke", "--runs", str(runs), "--steps", "4", *options)
    assert "resuming" in out and "at step 2" in out
    log = [json.loads(line) for line in (runs / "smoke" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    return log


def test_train_resume_export(tmp_path, data_root):
    runs = tmp_path / "runs"
    log = _train_twice("training.train", runs, TINY)
    assert all(np.isfinite(r["psnr"]) for r in log)

    _run("training.export", "--run", str(runs / "smoke"), "--name", "smoke", "--out", str(tmp_path / "models"),
         "--no-figures", "--entropy-every", "40")
    model_dir = tmp_path / "models" / "smoke"
    card = json.loads((model_dir / "model_card.json").read_text())
    assert set(card["files"]) == {"encoder", "decoder", "features", "entropy_model"}
    assert not list(model_dir.glob("*.data")), "ONNX weights must be inside the .onnx files"
    assert not (model_dir / "torch_state.pt").exists(), "training state stays with the run"
    assert card["codebooks"] == {"k0": 32, "k1": 8, "dim0": 8, "dim1": 8}

    scene = next(LOADERS["bigearthnet"](data_root))
    codec = CodebookCodec(model_dir)
    idx0, idx1 = codec.encode(scene.data)
    with torch.no_grad():
        t0, t1 = load_state(runs / "smoke" / "torch_state.pt").encode(
            torch.from_numpy(pad_to(scene.data, 4).astype(np.float32))[None])
    assert np.mean(idx0 == t0[0].numpy()) >= 0.999 and np.mean(idx1 == t1[0].numpy()) >= 0.999


TINY_RATE = ["--latent", "8", "--width", "16", "--width20", "8", "--blocks-enc", "1", "--blocks-dec", "1",
             "--batch", "2", "--crop", "32", "--val-every", "2", "--val-stride", "10", "--ckpt-every", "2",
             "--threads", "1", "--blocks20", "1", "--width10", "8", "--context-prior"]   # with v4's options


def test_the_training_contexts_are_the_coders():
    """The v4 rate term counts bits in the contexts the run-time coder codes each integer with."""
    from corsa.codec import latent_coder
    from training.rate_model import context_ids

    rng = np.random.default_rng(0)
    ints = (rng.laplace(0, 3, (12, 17, 23)) * rng.random((12, 1, 1)) * 3).round().astype(np.int16)
    ints[3, 2, 2] = 200                                  # an escape
    expected = latent_coder.table_ids(ints)
    got = context_ids(torch.from_numpy(ints.astype(np.float32))[None])[0].reshape(12, -1).numpy()
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected)) == latent_coder.CONTEXTS


def test_variable_rate_train_resume_export(tmp_path, data_root):
    """corsa2's command: seeded, resumable; its export holds integer tables and matches torch."""
    from corsa.codec.models import VariableRateCodec
    from corsa.codec.latent_coder import PRECISION
    from training.export_rate import load_run

    runs = tmp_path / "runs"
    log = _train_twice("training.train_rate", runs, TINY_RATE)
    assert all(np.isfinite(r["val_loss"]) for r in log)
    assert all(len(r["psnr"]) == len(r["bpp"]) == 8 for r in log)

    _run("training.export_rate", "--run", str(runs / "smoke"), "--name", "smoke", "--out", str(tmp_path / "models"),
         "--no-figures")
    model_dir = tmp_path / "models" / "smoke"
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["kind"] == "variable-rate" and set(card["files"]) == {"encoder", "decoder", "latent_model"}
    assert not list(model_dir.glob("*.data")), "ONNX weights must be inside the .onnx files"
    codec = VariableRateCodec(model_dir)
    assert codec.coder.freq.shape[0] == len(codec.qualities) == 8
    assert np.all(codec.coder.freq.sum(-1) == 1 << PRECISION)

    scene = next(LOADERS["bigearthnet"](data_root))
    model, _ = load_run(runs / "smoke")
    with torch.no_grad():
        ref = model.analysis(torch.from_numpy(pad_to(scene.data, 4).astype(np.float32))[None])[0].numpy()
    np.testing.assert_allclose(codec.latent(scene.data), ref, rtol=1e-4, atol=1e-4)


def test_render_heads_train_export_and_render(tmp_path, data_root):
    """A few steps of training.train_render and train_between on a copy of corsa3.1, whose exported
    heads then run inside corsa decompress --scale and --date (the inputs the run time feeds are the
    ones they were exported with)."""
    import shutil

    from corsa.app import cli
    from corsa.formats.datasets import revisit_series
    from rasterio.transform import Affine
    from test_service import write_scene

    model = tmp_path / "corsa3.1"
    shutil.copytree(ROOT / "models_onnx" / "corsa3.1", model)
    for f in ("render.onnx", "between.onnx"):
        (model / f).unlink()
    _run("training.train_render", "--model", str(model), "--steps", "2", "--crops", "4", "--val-crops", "2", "--batch", "2")
    _run("training.train_between", "--model", str(model), "--steps", "2", "--batch", "2", "--series", "2")
    card = json.loads((model / "model_card.json").read_text())
    for key in ("render", "between"):
        assert card[key]["steps"] == 2 and (model / f"{key}.onnx").stat().st_size == card["files"][key]["bytes"]
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == "Landcover-31746"])
    src = tmp_path / "in"
    src.mkdir()
    for s in (run[0], run[2]):
        write_scene(src / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    assert cli.main(["compress", str(src), "-o", str(tmp_path / "p"), "--model", str(model)]) == 0
    for extra in (["--date", run[1].date], ["--date", run[0].date, "--scale", "2"]):
        assert cli.main(["decompress", str(tmp_path / "p"), "-o", str(tmp_path / "o.tif"), "--model", str(model)] + extra) == 0


def test_decoder_training_resumes_and_exports_a_model_with_the_same_products(tmp_path, data_root):
    """training.train_decoder on corsa3.1: the exported model keeps every file that makes a product
    (encoder, tables) and a new decoder; the card says so and drops the old decoder's figures."""
    import hashlib

    runs, models = tmp_path / "runs", tmp_path / "models"
    small = ["--model", "corsa3.1", "--batch", "2", "--crop", "32", "--val-every", "2", "--val-scenes", "2",
             "--ckpt-every", "2", "--threads", "1", "--bright", "0.5", "--snow", "0.2", "--water", "0.2"]
    log = _train_twice("training.train_decoder", runs, small)
    assert all(len(r["psnr"]) == 9 and np.isfinite(r["mean"]) for r in log)
    _run("training.train_decoder", "--name", "smoke", "--runs", str(runs), "--steps", "4", "--export", "--out",
         str(models), "--no-figures", *small)
    old = json.loads((ROOT / "models_onnx" / "corsa3.1" / "model_card.json").read_text())
    card = json.loads((models / "smoke" / "model_card.json").read_text())
    assert card["id"] == "smoke" and card["default"] is False and "int8" not in card
    for key in ("encoder", "latent_model", "temporal_model", "encoder_int8"):
        assert card["files"][key] == old["files"][key]
    assert card["files"]["decoder"]["sha256"] != old["files"]["decoder"]["sha256"]
    assert hashlib.sha256((models / "smoke" / "decoder.onnx").read_bytes()).hexdigest() == card["files"]["decoder"]["sha256"]
    assert "decoder_int8" not in card["files"] and not (models / "smoke" / "decoder_int8.onnx").exists()
    assert card["decoder_training"]["steps"] == 4
    assert "--bright 0.5 --snow 0.2 --water 0.2" in card["decoder_training"]["command"]


def test_decoder_sampler_draws_snow_and_water_at_their_shares(data_root):
    """--snow / --water: the few snowy and open-water scenes of the real train split get those shares
    of the draws, the rest by area as before."""
    from training.data import CropSampler
    from training.train import SPLIT_FILE
    from training.train_decoder import snowy, watery
    from corsa.formats.datasets import load_split

    scenes = load_split(SPLIT_FILE, "train", data_root)
    sampler = CropSampler(scenes, 64, 0, max_weight_px=250_000, boost=[(snowy, 0.1), (watery, 0.15)])
    snow = np.array([snowy(a) for a in sampler.scenes])
    water = np.array([watery(a) for a in sampler.scenes]) & ~snow
    assert 2 <= snow.sum() <= 10 and 10 <= water.sum() <= 40, (snow.sum(), water.sum())
    assert sampler.boosted == [int(snow.sum()), int(water.sum())]
    assert np.isclose(sampler.p[snow].sum(), 0.1) and np.isclose(sampler.p[water].sum(), 0.15)
    plain = CropSampler(scenes, 64, 0, max_weight_px=250_000)
    rest = ~(snow | water)
    assert np.allclose(sampler.p[rest] / sampler.p[rest].sum(), plain.p[rest] / plain.p[rest].sum())
    assert sampler.p[snow].sum() > 10 * plain.p[snow].sum()


def test_reshaped_decoder_starts_from_the_shipped_one_and_exports_its_architecture(tmp_path, data_root):
    """--blocks20 / --width10 / --first-kernel: the added layers start as the identity, so step 0 decodes
    as the shipped decoder; a first convolution cut keeps its centre; the export's card names the
    architecture, so the exported files load back as the trained network."""
    from training.export_rate import load_model
    from training.train_decoder import reshaped

    model = load_model(ROOT / "models_onnx" / "corsa3.1")
    big = reshaped(load_model(ROOT / "models_onnx" / "corsa3.1"), 1, 8)
    assert big.cfg.blocks20 == 1 and big.cfg.width10 == 8 and len(big.refine20) == 1
    (scene,) = LOADERS["majortom"](data_root)
    with torch.no_grad():
        y = model.analysis(torch.from_numpy(pad_to(scene.data[:, :128, :128], 4).astype(np.float32))[None])
        assert torch.equal(model.synthesis(y), big.synthesis(y))
    cut = reshaped(load_model(ROOT / "models_onnx" / "corsa3.1"), first_kernel=1)
    assert torch.equal(cut.dec[0].weight, model.dec[0].weight[:, :, 1:2, 1:2])
    runs, models = tmp_path / "runs", tmp_path / "models"
    grow = ("--blocks20", "1", "--width10", "8", "--first-kernel", "1")
    _run("training.train_decoder", "--name", "grown", "--runs", str(runs), "--steps", "1", "--model", "corsa3.1",
         "--batch", "2", "--crop", "32", "--val-every", "1", "--val-scenes", "2", "--threads", "1", "--tilt", "1.5", *grow)
    _run("training.train_decoder", "--name", "grown", "--runs", str(runs), "--model", "corsa3.1", "--export", "--out",
         str(models), "--no-figures")
    card = json.loads((models / "grown" / "model_card.json").read_text())
    assert {k: card["architecture"][k] for k in ("blocks20", "width10", "first_kernel")} == \
        {"blocks20": 1, "width10": 8, "first_kernel": 1}
    assert " ".join(grow) in card["decoder_training"]["command"] and "--tilt 1.5 " in card["decoder_training"]["command"]
    trained = torch.load(runs / "grown" / "best.pt", weights_only=False)["model"]
    back = load_model(models / "grown").state_dict()
    assert all(torch.allclose(back[k], v) for k, v in trained.items() if k.startswith(("dec.", "refine")))


def test_tilt_draws_the_high_levels_more_often():
    """--tilt T: level q of L drawn in proportion to exp(T q / (L - 1)); 0 draws every level alike."""
    from training.train_decoder import level_weights

    w = level_weights(9, 1.5)
    assert torch.allclose(w[1:] / w[:-1], torch.full((8,), float(np.exp(1.5 / 8))))
    assert torch.allclose(w[-1] / w[0], torch.tensor(float(np.exp(1.5))))
    assert torch.equal(level_weights(9, 0.0), torch.ones(9))
    torch.manual_seed(0)
    drawn = torch.bincount(torch.multinomial(w, 90_000, replacement=True), minlength=9).float() / 90_000
    assert torch.allclose(drawn, w / w.sum(), atol=0.005)
