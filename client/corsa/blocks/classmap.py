"""Class maps from compressed products: the shipped classifier and the class GeoTIFF.

A classifier folder (models_onnx/<name>/) holds classifier.onnx (codebook vectors f0, f1 -> class
logits on the 20 m grid) and model_card.json naming its classes and the codec it was trained on.
The class GeoTIFF is uint8 on the product's level-0 grid (0 = nodata) with a colour table and the
tag CORSA_CLASSES = JSON {value: name}, so GDAL / QGIS users see what each value means.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import corsa_udf
import numpy as np
import onnxruntime as ort
import rasterio
from rasterio.transform import Affine

from corsa.codec.codebook import CodebookCodec
from corsa.codec.models import ModelError, VariableRateCodec, checked_session, read_card
from corsa.core.files import writing

DEFAULT_CLASSIFIER = "corsa512-scl"


class Classifier:
    """classifier.onnx of one folder, checked against its card and against the codec it belongs to."""

    def __init__(self, model: str | Path = DEFAULT_CLASSIFIER, threads: int | None = None):
        self.path, self.card = read_card(model)
        if "classes" not in self.card or "classifier" not in self.card.get("files", {}):
            raise ModelError(f"{self.path / 'model_card.json'} is not a classifier card (no classes / classifier file)")
        self.threads = threads

    @property
    def names(self) -> dict[int, str]:
        return {c["value"]: c["name"] for c in self.card["classes"]}

    @property
    def colors(self) -> dict[int, tuple[int, ...]]:
        return {c["value"]: tuple(c["color"]) for c in self.card["classes"]}

    def check_codec(self, codec: CodebookCodec) -> None:
        """Refuse a codec whose codebook vectors are not those the classifier was trained on."""
        want = self.card["codec"]["features_sha256"]
        if codec.card["files"]["features"]["sha256"] != want:
            raise ModelError(f"classifier {self.path.name} was trained on the features of codec "
                             f"{self.card['codec']['id']!r}, not of {codec.model_id!r}")

    @cached_property
    def session(self) -> ort.InferenceSession:
        return checked_session(self.path, self.card["files"]["classifier"], self.threads)

    def predict(self, codec: CodebookCodec, idx0: np.ndarray, idx1: np.ndarray) -> np.ndarray:
        """Index grids -> class values (uint8) on the level-0 grid, straight through onnxruntime."""
        codec.check_indices(idx0, idx1)
        return corsa_udf.classify(codec.features_session, self.session, idx0, idx1)


CLASS_SETS = ("scl", "landcover")   # what a variable-rate model's heads give: scene classes, land cover


def scene_classes(codec: CodebookCodec | VariableRateCodec, classifier: str | Path | None = None, classes: str = "scl"
                  ) -> tuple[dict[int, str], dict[int, tuple[int, ...]], Path | None]:
    """(class names, colours, classifier folder or None) of a codec's classes: a variable-rate
    model's own head for ``classes`` (its card's heads), a codebook model's classifier (scene
    classes only, checked against it)."""
    if isinstance(codec, VariableRateCodec):
        head = codec.card.get("heads", {}).get(classes)
        if head is None:
            raise ModelError(f"model {codec.model_id} ships no {classes} head (it has: "
                             f"{', '.join(sorted(codec.card.get('heads', {}))) or 'none'}); train one with "
                             f"python -m training.classify --codec {codec.model_id} --classes {classes}")
        checked_session(codec.path, head, codec.threads)
        return ({c["value"]: c["name"] for c in head["classes"]},
                {c["value"]: tuple(c["color"]) for c in head["classes"]}, None)
    if classes != "scl":
        raise ModelError(f"model {codec.model_id} (a codebook model) gives scene classes only, not {classes}")
    clf = Classifier(classifier or DEFAULT_CLASSIFIER)
    clf.check_codec(codec)
    return clf.names, clf.colors, clf.path


def write_classes(path: Path, classes: np.ndarray, transform: Affine | None, crs: str | None,
                  names: dict[int, str], colors: dict[int, tuple[int, ...]]) -> Path:
    """A uint8 class GeoTIFF with colour table and CORSA_CLASSES tag, under a temporary name first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    kw = {"driver": "GTiff", "count": 1, "dtype": "uint8", "width": classes.shape[1], "height": classes.shape[0],
          "compress": "deflate", "nodata": 0, "photometric": "palette"}
    if transform is not None:
        kw["transform"] = transform
    if crs:
        kw["crs"] = crs
    table = {0: (0, 0, 0, 0), **{v: tuple(c) + (255,) for v, c in colors.items()}}
    try:
        with writing(path), rasterio.open(part, "w", **kw) as dst:
            dst.write(classes.astype(np.uint8), 1)
            dst.write_colormap(1, table)
            dst.update_tags(CORSA_CLASSES=json.dumps({str(v): n for v, n in names.items()}))
            dst.set_band_description(1, "class")
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(path)
    return path
