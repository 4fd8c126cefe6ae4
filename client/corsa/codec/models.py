"""A shipped model run with onnxruntime: DN cube -> what the product stores -> DN cube.

The variable-rate family (corsa2 onward: encoder.onnx, decoder.onnx, latent_model.npz; integer
latents at a chosen quality level); the codebook family that came before lives in
``corsa.codec.codebook``. model_card.json lists the sha256 of
each file; a mismatch is refused, so a product is never decoded with another model.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import corsa_udf
import numpy as np
import onnxruntime as ort

from corsa.codec.latent_coder import TEMPORAL_FILE_NAME, LatentCoder
from corsa.codec.refine_coder import RefineCoder
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


def _by_version(name: str) -> list:
    """Sort key of a model id: its numbers as numbers (corsa3.9 before corsa3.10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def shipped_cards(folder: Path = MODELS_DIR) -> list[dict]:
    """The model cards under ``folder`` (codecs and classifiers), by model id."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/model_card.json"), key=lambda p: _by_version(p.parent.name))]


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
        shipped = ", ".join(sorted((p.parent.name for p in MODELS_DIR.glob("*/model_card.json")), key=_by_version))
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


class VariableRateCodec:
    """A variable-rate model (corsa2 onward): one encoder and decoder for every quality level.

    The encoder gives a float latent on the card's latent grid; a quality level scales it by its
    gains and rounds (the integers the product stores, coded by ``corsa.codec.latent_coder``); the
    decoder takes the integers times the level's inverse gains. Quality levels are the card's
    ``qualities`` (1 = smallest files; higher is better)."""

    def __init__(self, model: str | Path, threads: int | None = None, kernels: str = "auto"):
        """``threads``: how many tiles run side by side in ``latent`` / ``decode``, each on one of its
        own (default: the machine's cores, ``os.cpu_count()``)."""
        self.path, self.card = read_card(model)
        self.threads, self.kernels = threads, kernels
        self._sessions: dict[str, ort.InferenceSession] = {}
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
        return type(self), (str(self.path), self.threads, self.kernels)

    @property
    def model_id(self) -> str:
        return self.card["id"]

    @property
    def encoder(self) -> ort.InferenceSession:
        """The float encoder."""
        return self._session("encoder")

    def encoder_for(self, quality: int):
        """The session of the encoder that compresses ``quality`` with these ``kernels``."""
        try:
            return corsa_udf.network_session(self.card, {"kernels": self.kernels}, quality, self._session, "encoder")
        except corsa_udf.UdfError as e:
            raise ModelError(str(e)) from None

    def network_entry(self, quality: int | None = None, network: str = "decoder") -> str:
        """The card's files entry of the ``network`` that runs at ``quality`` with these ``kernels``
        (``corsa_udf.network_file``: the services' UDF chooses alike); None: the int8 one if any."""
        try:
            return corsa_udf.network_file(self.card, {"kernels": self.kernels}, quality, network)
        except corsa_udf.UdfError as e:
            raise ModelError(str(e)) from None

    def decoder(self, quality: int | None = None):
        """The session of ``network_entry(quality)`` (cached per file); with the int8 decoder taken by
        the "auto" rule, ``corsa_udf.BrightGuard`` around it and the float one."""
        try:
            return corsa_udf.network_session(self.card, {"kernels": self.kernels}, quality, self._session)
        except corsa_udf.UdfError as e:
            raise ModelError(str(e)) from None

    def _session(self, entry: str) -> ort.InferenceSession:
        if entry not in self._sessions:
            # One intra-op thread: tiles side by side use two cores better than one tile's layers
            # split over two (a 2136 px decode 2.68 -> 1.73 s, BENCHMARKS.md issue 28, ninth part).
            self._sessions[entry] = checked_session(self.path, self.card["files"][entry], 1)
        return self._sessions[entry]

    def _tiles_run(self, fn, network, x: np.ndarray) -> np.ndarray:
        """``fn(network, x, tile, overlap, map_tiles)`` with its tiles on ``threads`` threads."""
        threads = self.threads or os.cpu_count() or 1
        if threads == 1:
            return fn(network, x, self.tile, self.overlap)
        with ThreadPoolExecutor(threads) as pool:
            return fn(network, x, self.tile, self.overlap, pool.map)

    def _checked_file(self, entry: str) -> Path:
        """The path of the card's files entry, refused if missing or not the file its sha256 names."""
        path = self.path / self.card["files"][entry]["path"]
        if not path.is_file() or sha256_file(path) != self.card["files"][entry]["sha256"]:
            raise ModelError(f"{path} is missing or does not match the sha256 in its model card")
        return path

    def prefetch(self) -> None:
        """The latent tables loaded in a thread of its own while the caller goes on (unzipping 100 MB
        releases the GIL: a compress imports its input readers meanwhile); whoever asks for them waits."""
        threading.Thread(target=lambda: self._tables, daemon=True).start()

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray, LatentCoder]:
        with np.load(self._checked_file("latent_model")) as z:
            gain, inv_gain = z["gain"].astype(np.float32), z["inv_gain"].astype(np.float32)
        return gain, inv_gain, LatentCoder.load(self.path)

    @property
    def coder(self) -> LatentCoder:
        return self._tables[2]

    @property
    def temporal(self) -> bool:
        """Whether the model has temporal tables (without loading them: a single date needs none)."""
        return "temporal_model" in self.card["files"]

    @cached_property
    def temporal_coder(self) -> LatentCoder | None:
        """The tables that code a date with references to earlier dates (``corsa.formats.series``); None
        for a model without them (its series are coded date by date)."""
        if "temporal_model" not in self.card["files"]:
            return None
        path = self._checked_file("temporal_model")
        coder = LatentCoder.load(self.path, TEMPORAL_FILE_NAME)
        if not coder.temporal or coder.freq.shape[0] != len(self.qualities) or coder.channels != self.channels:
            raise ModelError(f"{path} does not hold temporal tables of this model's levels and channels")
        return coder

    @cached_property
    def refiner(self) -> RefineCoder | None:
        """The model's refinement (``corsa.codec.refine_coder``); None for a model without one."""
        if "refine_model" not in self.card["files"]:
            return None
        path = self._checked_file("refine_model")
        refiner = RefineCoder.load(self.path)
        if refiner.filter_shape:
            self._checked_file("loop_filter")
            refiner.filter_lambda = np.array([corsa_udf.filter_lambda(self.card, q) for q in self.qualities])
        if refiner.steps.size != len(self.qualities):
            raise ModelError(f"{path} does not hold a step for each of this model's levels")
        return refiner

    def refines(self, quality: int) -> bool:
        """Whether dates of ``quality`` are written with a refinement."""
        return self.refiner is not None and self.refiner.at(self.level(quality))

    def level(self, quality: int) -> int:
        """Index of a quality level in the model's tables."""
        if quality not in self.qualities:
            raise ValueError(f"model {self.model_id} has quality levels {self.qualities}, not {quality}")
        return self.qualities.index(quality)

    def layer(self, quality: int) -> tuple[int, float] | None:
        """(base level, lambda in DN² a bit) of a level made of its base and a residual layer
        (``corsa.codec.residual_coder``, the card's ``layer`` of the level); None for a level of its own."""
        entry = self.card["qualities"][self.level(quality)].get("layer")
        return None if entry is None else (int(entry["base"]), float(entry["lambda"]))

    def base(self, quality: int) -> int:
        """The level whose integers a level's products store: its own, or its layer's base."""
        layer = self.layer(quality)
        return quality if layer is None else layer[0]

    def quality_level(self, quality: int | None) -> int:
        """The quality level a run uses: the one asked for (checked), else the card's default."""
        if quality is None:
            return self.default_quality
        self.level(quality)
        return quality

    def latent(self, dn: np.ndarray, quality: int | None = None) -> np.ndarray:
        """(10, H, W) DN -> float latent (L, ceil(H/4), ceil(W/4)); NaN counts as nodata. By the
        encoder that compresses ``quality`` (``encoder_for``), the float one if None."""
        if dn.ndim != 3 or dn.shape[0] != len(BANDS):
            raise ValueError(f"expected ({len(BANDS)}, y, x) bands {BANDS}, got shape {dn.shape}")
        encoder = self.encoder if quality is None else self.encoder_for(quality)
        return self._tiles_run(corsa_udf.analyse, encoder, dn)

    def quantise(self, latent: np.ndarray, quality: int) -> np.ndarray:
        gain = self._tables[0][self.level(quality)][:, None, None]
        return corsa_udf.quantise(latent * gain, corsa_udf.deadzone_of(self.card))

    def dequantise(self, ints: np.ndarray, quality: int) -> np.ndarray:
        return ints.astype(np.float32) * self._tables[1][self.level(quality)][:, None, None]

    def encode(self, dn: np.ndarray, quality: int) -> np.ndarray:
        """(10, H, W) DN -> the integers a product stores at this quality."""
        return self.quantise(self.latent(dn, quality), quality)

    def synthesis(self, ints: np.ndarray, quality: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Integers -> (10, H, W) float32 DN, cropped to ``shape`` (the input's y, x) if given."""
        if ints.ndim != 3 or ints.shape[0] != self.channels:
            raise ValueError(f"expected a latent of {self.channels} channels, got shape {ints.shape}")
        rec = self._tiles_run(corsa_udf.synthesise, self.decoder(quality), self.dequantise(ints, quality))
        return rec if shape is None else rec[:, : shape[0], : shape[1]]

    def decode(self, ints: np.ndarray, quality: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Integers -> (10, H, W) uint16 DN, cropped to ``shape`` (the input's y, x) if given."""
        return to_uint16(self.synthesis(ints, quality, shape))

    def requantise(self, ints: np.ndarray, quality: int, to_quality: int) -> np.ndarray:
        """A stored latent brought to a lower quality without the source: dequantise, quantise again."""
        if to_quality > quality:
            raise ValueError(f"a product of quality {quality} cannot be raised to quality {to_quality}")
        if to_quality == quality:      # the same integers (dequantised and quantised again, some would move by one)
            return ints
        return self.quantise(self.dequantise(ints, quality), to_quality)
