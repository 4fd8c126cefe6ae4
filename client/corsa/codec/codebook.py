"""The codebook family (corsa512): codebook indices on two grids (encoder.onnx, decoder.onnx,
features.onnx, entropy_model.npz), stored in products of formats 1-2. Kept to decode, classify and
(through the services) write those products; every main path is written for the variable-rate family
(``corsa.codec.models``). Its index coder is ``corsa.codec.index_coder``; its products
``corsa.formats.codebook_product``.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import corsa_udf
import numpy as np
import onnxruntime as ort

from corsa.codec.models import ModelError, VariableRateCodec, checked_session, read_card
from corsa.core.scene import BANDS, to_uint16


class CodebookCodec:
    """Encoder, decoder and feature lookup of a codebook model, sessions created on first use."""

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

    def quality_level(self, quality: int | None) -> None:
        """A codebook model has one rate: no quality level to choose."""
        if quality is not None:
            raise ValueError(f"model {self.model_id} has a single rate: a quality level needs a variable-rate model")
        return None


def open_codec(model: str | Path, threads: int | None = None) -> "CodebookCodec | VariableRateCodec":
    """A model of either family, as its card names it."""
    _, card = read_card(model)
    return VariableRateCodec(model, threads) if card.get("kind") == "variable-rate" else CodebookCodec(model, threads)
