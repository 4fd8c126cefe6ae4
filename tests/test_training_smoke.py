"""The training command runs, resumes from its checkpoint, exports, and the export matches torch.

A smoke step only: a tiny configuration for a few steps on the real train split.
"""
import json
import subprocess
import sys

import numpy as np
import torch

from corsa.codec import OnnxCodec
from corsa.datasets import LOADERS
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


def test_train_resume_export(tmp_path, data_root):
    runs = tmp_path / "runs"
    _run("training.train", "--name", "smoke", "--runs", str(runs), "--steps", "2", *TINY)
    out = _run("training.train", "--name", "smoke", "--runs", str(runs), "--steps", "4", *TINY)
    assert "resuming" in out and "at step 2" in out
    log = [json.loads(line) for line in (runs / "smoke" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(np.isfinite(r["psnr"]) for r in log)

    _run("training.export", "--run", str(runs / "smoke"), "--name", "smoke", "--out", str(tmp_path / "models"),
         "--no-figures", "--entropy-every", "40")
    model_dir = tmp_path / "models" / "smoke"
    card = json.loads((model_dir / "model_card.json").read_text())
    assert set(card["files"]) == {"encoder", "decoder", "features", "entropy_model"}
    assert not list(model_dir.glob("*.data")), "ONNX weights must be inside the .onnx files"
    assert card["codebooks"] == {"k0": 32, "k1": 8, "dim0": 8, "dim1": 8}

    scene = next(LOADERS["bigearthnet"](data_root))
    codec = OnnxCodec(model_dir)
    idx0, idx1 = codec.encode(scene.data)
    with torch.no_grad():
        t0, t1 = load_state(model_dir / "torch_state.pt").encode(
            torch.from_numpy(pad_to(scene.data, 4).astype(np.float32))[None])
    assert np.mean(idx0 == t0[0].numpy()) >= 0.999 and np.mean(idx1 == t1[0].numpy()) >= 0.999
