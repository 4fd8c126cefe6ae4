"""A shipped model run with onnxruntime: DN cube -> what the product stores -> DN cube.

Two kinds, named by the card: codebook models (corsa512: encoder.onnx, decoder.onnx, features.onnx;
codebook indices on two grids) and variable-rate models (corsa2: encoder.onnx, decoder.onnx,
latent_model.npz; integer latents at a chosen quality level). model_card.json lists the sha256 of
each file; a mismatch is refused, so a product is never decoded with another model.
"""
from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import corsa_udf
import numpy as np
import onnxruntime as ort

from corsa.codec.latent_coder import TEMPORAL_FILE_NAME, LatentCoder
from corsa.core.scene import BANDS, to_uint16

MODELS_DIR = Path(__file__).resolve().parents[3] / "models_onnx"
# Where the services' model parameters point by default: this repository's model folders on main,
# whose files a back end's UDF fetches by URL; and where a model archive given in the job options
# (udf-dependency-archives "URL#models") unpacks on a back end.
MODELS_URL = "https://raw.githubusercontent.com/corsa-openeo/corsa-openeo/refs/heads/main/models_onnx"
UNPACKED_MODELS = "models/"


class ModelError(RuntimeError):
    """A model folder is missing, incomplete or does not match its card."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_dir(model: str | Path) -> Path:
    """A model folder given by path, or by name under models_onnx/."""
    path = Path(model)
    return path if path.is_dir() else MODELS_DIR / str(model)


def shipped_cards(folder: Path = MODELS_DIR) -> list[dict]:
    """The model cards under ``folder`` (codecs and classifiers), by folder name."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/model_card.json"))]


def default_model(folder: Path = MODELS_DIR) -> str:
    """The id of the one model whose card says "default": true (a newer model becomes the default by
    its card alone)."""
    marked = sorted(p.parent.name for p in folder.glob("*/model_card.json")
                    if json.loads(p.read_text()).get("default") is True)
    if len(marked) != 1:
        raise ModelError(f"exactly one model card under {folder} must say \"default\": true, not {marked or 'none'}")
    return marked[0]


DEFAULT_MODEL = default_model()


def local_model(location: str) -> str:
    """A model location as the services name it (this repository's URL of a model folder, or a back
    end's unpacked archive "models/<id>") as the folder here holding the same files; any other
    location as it is."""
    for prefix in (MODELS_URL + "/", UNPACKED_MODELS):
        if location.startswith(prefix) and (MODELS_DIR / location[len(prefix):].rstrip("/")).is_dir():
            return str(MODELS_DIR / location[len(prefix):].rstrip("/"))
    return location


def read_card(model: str | Path) -> tuple[Path, dict]:
    """A model folder (by path or name) and its model_card.json."""
    path = model_dir(model)
    card = path / "model_card.json"
    if not card.is_file():
        shipped = ", ".join(sorted(p.parent.name for p in MODELS_DIR.glob("*/model_card.json")))
        if not Path(model).exists():
            raise ModelError(f"no model {str(model)!r}: give a folder with model_card.json or one of the models under "
                             f"{MODELS_DIR}: {shipped}")
        raise ModelError(f"no model_card.json in {path} (the models under {MODELS_DIR}: {shipped})")
    try:
        return path, json.loads(card.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"model card {card} is not valid JSON: {e}") from e


def checked_session(folder: Path, entry: dict, threads: int | None) -> ort.InferenceSession:
    """The onnxruntime session of a card's file entry, refused unless the file matches its sha256."""
    path = folder / entry["path"]
    if not path.is_file():
        raise ModelError(f"model file {path} is missing")
    if sha256_file(path) != entry["sha256"]:
        raise ModelError(f"{path} does not match the sha256 in its model card")
    try:
        return corsa_udf.session(str(path), threads or 0)
    except Exception as e:  # onnxruntime raises its own exception types for corrupt files
        raise ModelError(f"onnxruntime cannot load {path}: {e}") from e


class OnnxCodec:
    """Encoder, decoder and feature lookup of one model, sessions created on first use."""

    def __init__(self, model: str | Path, threads: int | None = None):
        self.path, self.card = read_card(model)
        self.threads = threads
        if tuple(self.card["bands"]) != BANDS:
            raise ModelError(f"model {self.path.name} expects bands {self.card['bands']}, not {BANDS}")
        self.stride0, self.stride1 = self.card["grids"]["level0"]["stride"], self.card["grids"]["level1"]["stride"]
        if (self.stride0, self.stride1) != (corsa_udf.STRIDE0, corsa_udf.STRIDE1):
            raise ModelError(f"model {self.path.name} has grid strides {self.stride0}/{self.stride1}, "
                             f"the UDF knows {corsa_udf.STRIDE0}/{corsa_udf.STRIDE1}")
        self.tile, self.overlap = self.card["tile"]["size"], self.card["tile"]["overlap"]

    @property
    def model_id(self) -> str:
        return self.card["id"]

    def _session(self, name: str) -> ort.InferenceSession:
        return checked_session(self.path, self.card["files"][name], self.threads)

    @cached_property
    def encoder(self) -> ort.InferenceSession:
        return self._session("encoder")

    @cached_property
    def decoder(self) -> ort.InferenceSession:
        return self._session("decoder")

    @cached_property
    def features_session(self) -> ort.InferenceSession:
        return self._session("features")

    def encode(self, dn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(10, H, W) DN -> level-0 (ceil(H/4)*2, ...) and level-1 (ceil(H/4), ...) indices, uint16.

        Encoded in overlapping tiles (size and overlap from the model card); NaN counts as nodata.
        """
        if dn.ndim != 3 or dn.shape[0] != len(BANDS):
            raise ValueError(f"expected ({len(BANDS)}, y, x) bands {BANDS}, got shape {dn.shape}")
        return corsa_udf.encode(self.encoder, dn, self.tile, self.overlap)

    def decode(self, idx0: np.ndarray, idx1: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Indices -> (10, H, W) uint16 DN, cropped to ``shape`` (the input's y, x) if given."""
        rec = self.decode_float(idx0, idx1)
        if shape is not None:
            rec = rec[:, : shape[0], : shape[1]]
        return to_uint16(rec)

    def decode_float(self, idx0: np.ndarray, idx1: np.ndarray) -> np.ndarray:
        self.check_indices(idx0, idx1)
        return corsa_udf.decode(self.decoder, idx0, idx1, self.tile, self.overlap)

    def features(self, idx0: np.ndarray, idx1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codebook vectors of the indices: (dim0, h0, w0) and (dim1, h1, w1) float32."""
        self.check_indices(idx0, idx1)
        f0, f1 = self.features_session.run(None, {"idx0": idx0[None].astype(np.int64),
                                                   "idx1": idx1[None].astype(np.int64)})
        return f0[0], f1[0]

    def check_indices(self, idx0: np.ndarray, idx1: np.ndarray) -> None:
        ratio = self.stride1 // self.stride0
        if idx0.shape != (idx1.shape[0] * ratio, idx1.shape[1] * ratio):
            raise ValueError(f"level-0 grid {idx0.shape} does not nest level-1 grid {idx1.shape} x{ratio}")
        for name, idx, k in (("level-0", idx0, self.card["codebooks"]["k0"]),
                             ("level-1", idx1, self.card["codebooks"]["k1"])):
            if idx.size and int(idx.max()) >= k:
                raise ValueError(f"{name} index {int(idx.max())} out of range for a codebook of {k}")


class VariableRateCodec:
    """A variable-rate model (corsa2 onward): one encoder and decoder for every quality level.

    The encoder gives a float latent on the card's latent grid; a quality level scales it by its
    gains and rounds (the integers the product stores, coded by ``corsa.codec.latent_coder``); the
    decoder takes the integers times the level's inverse gains. Quality levels are the card's
    ``qualities`` (1 = smallest files; higher is better)."""

    def __init__(self, model: str | Path, threads: int | None = None):
        self.path, self.card = read_card(model)
        self.threads = threads
        if self.card.get("kind") != "variable-rate":
            raise ModelError(f"model {self.path.name} is not a variable-rate model")
        if tuple(self.card["bands"]) != BANDS:
            raise ModelError(f"model {self.path.name} expects bands {self.card['bands']}, not {BANDS}")
        self.stride, self.channels = self.card["latent"]["stride"], self.card["latent"]["channels"]
        if self.stride != corsa_udf.STRIDE1:
            raise ModelError(f"model {self.path.name} has latent stride {self.stride}, the UDF knows {corsa_udf.STRIDE1}")
        self.tile, self.overlap = self.card["tile"]["size"], self.card["tile"]["overlap"]
        self.qualities: list[int] = [q["quality"] for q in self.card["qualities"]]
        self.default_quality: int = self.card["default_quality"]

    def __reduce__(self):
        # Sent to a dask worker as its folder: the worker opens (and checks) its own sessions.
        return type(self), (str(self.path), self.threads)

    @property
    def model_id(self) -> str:
        return self.card["id"]

    @cached_property
    def encoder(self) -> ort.InferenceSession:
        return checked_session(self.path, self.card["files"]["encoder"], self.threads)

    @cached_property
    def decoder(self) -> ort.InferenceSession:
        return checked_session(self.path, self.card["files"]["decoder"], self.threads)

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray, LatentCoder]:
        entry = self.card["files"]["latent_model"]
        path = self.path / entry["path"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise ModelError(f"{path} is missing or does not match the sha256 in its model card")
        with np.load(path) as z:
            gain, inv_gain = z["gain"].astype(np.float32), z["inv_gain"].astype(np.float32)
        return gain, inv_gain, LatentCoder.load(self.path)

    @property
    def coder(self) -> LatentCoder:
        return self._tables[2]

    @cached_property
    def temporal_coder(self) -> LatentCoder | None:
        """The tables that code a date with references to earlier dates (``corsa.formats.series``); None
        for a model without them (its series are coded date by date)."""
        entry = self.card["files"].get("temporal_model")
        if entry is None:
            return None
        path = self.path / entry["path"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise ModelError(f"{path} is missing or does not match the sha256 in its model card")
        coder = LatentCoder.load(self.path, TEMPORAL_FILE_NAME)
        if not coder.temporal or coder.freq.shape[0] != len(self.qualities) or coder.channels != self.channels:
            raise ModelError(f"{path} does not hold temporal tables of this model's levels and channels")
        return coder

    def level(self, quality: int) -> int:
        """Index of a quality level in the model's tables."""
        if quality not in self.qualities:
            raise ValueError(f"model {self.model_id} has quality levels {self.qualities}, not {quality}")
        return self.qualities.index(quality)

    def latent(self, dn: np.ndarray) -> np.ndarray:
        """(10, H, W) DN -> float latent (L, ceil(H/4), ceil(W/4)); NaN counts as nodata."""
        if dn.ndim != 3 or dn.shape[0] != len(BANDS):
            raise ValueError(f"expected ({len(BANDS)}, y, x) bands {BANDS}, got shape {dn.shape}")
        return corsa_udf.analyse(self.encoder, dn, self.tile, self.overlap)

    def quantise(self, latent: np.ndarray, quality: int) -> np.ndarray:
        gain = self._tables[0][self.level(quality)][:, None, None]
        return np.clip(np.rint(latent * gain), -(1 << 15), (1 << 15) - 1).astype(np.int16)

    def dequantise(self, ints: np.ndarray, quality: int) -> np.ndarray:
        return ints.astype(np.float32) * self._tables[1][self.level(quality)][:, None, None]

    def encode(self, dn: np.ndarray, quality: int) -> np.ndarray:
        """(10, H, W) DN -> the integers a product stores at this quality."""
        return self.quantise(self.latent(dn), quality)

    def decode(self, ints: np.ndarray, quality: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Integers -> (10, H, W) uint16 DN, cropped to ``shape`` (the input's y, x) if given."""
        if ints.ndim != 3 or ints.shape[0] != self.channels:
            raise ValueError(f"expected a latent of {self.channels} channels, got shape {ints.shape}")
        rec = corsa_udf.synthesise(self.decoder, self.dequantise(ints, quality), self.tile, self.overlap)
        if shape is not None:
            rec = rec[:, : shape[0], : shape[1]]
        return to_uint16(rec)

    def requantise(self, ints: np.ndarray, quality: int, to_quality: int) -> np.ndarray:
        """A stored latent brought to a lower quality without the source: dequantise, quantise again."""
        if to_quality > quality:
            raise ValueError(f"a product of quality {quality} cannot be raised to quality {to_quality}")
        return self.quantise(self.dequantise(ints, quality), to_quality)


def open_codec(model: str | Path, threads: int | None = None) -> "OnnxCodec | VariableRateCodec":
    """The codec class a model's card asks for."""
    _, card = read_card(model)
    return VariableRateCodec(model, threads) if card.get("kind") == "variable-rate" else OnnxCodec(model, threads)
