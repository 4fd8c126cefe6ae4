"""The catalogue of bad inputs: each gets a clear error naming the problem, or correct output.

Every case runs the CLI on a crop of a real scene (or a product or model folder damaged on
purpose). An error must be exit 2 with "corsa <cmd>: error: <what is wrong>", no traceback, and
no output file left that could pass for a finished one. docs/operations.md's troubleshooting section
lists this same table; the last test checks that it does, row by row.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import rasterio
from rasterio.shutil import copy as gdal_copy
from rasterio.transform import Affine

from corsa.app import cli
from corsa.formats import codebook_product
from corsa.codec.models import MODELS_DIR, sha256_file
from corsa.formats.datasets import LOADERS
from corsa.core.metrics import psnr
from corsa.core.scene import BANDS
from conftest import stored_files

ROOT = Path(__file__).resolve().parents[1]
DATE = "2022-07-06"
ALL_S2 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def write_tif(path: Path, data: np.ndarray, transform: Affine, crs: str, descriptions=BANDS, date: str | None = DATE,
              **profile) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=profile.pop("dtype", data.dtype), transform=transform, crs=crs, **profile) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions or (), 1):
            dst.set_band_description(i, d)
        if date:
            dst.update_tags(TIFFTAG_DATETIME=f"{date.replace('-', ':')} 10:00:00")
    return path


@dataclass
class Ctx:
    tmp: Path
    data: np.ndarray          # 64 x 64 px of the Major-TOM scene, with a nodata corner
    transform: Affine
    crs: str
    reference: Path           # the product of ``data`` as written in canonical band order

    def tif(self, data=None, name="in.tif", **kw) -> Path:
        return write_tif(self.tmp / name, self.data if data is None else data, self.transform, self.crs, **kw)

    def product_copy(self) -> Path:
        return Path(shutil.copytree(self.reference, self.tmp / "prod"))

    def model_copy(self) -> Path:
        return Path(shutil.copytree(MODELS_DIR / "corsa512", self.tmp / "model",
                                    ignore=shutil.ignore_patterns("torch_state.pt", "*.npz", "*.md")))

    def compress(self, src: Path, *extra: str) -> list[str]:
        return ["compress", str(src), "-o", str(self.tmp / "out"), "--model", "corsa512", *extra]

    def decompress(self, prod: Path, *extra: str) -> list[str]:
        return ["decompress", str(prod), "-o", str(self.tmp / "out" / "decoded.tif"), *extra]


# -- what the correct outputs are ----------------------------------------------------------------

def same_product_as_reference(ctx: Ctx) -> None:
    files = sorted(p.name for p in stored_files(ctx.reference))
    assert sorted(p.name for p in stored_files(ctx.tmp / "out")) == files
    for name in files:
        assert (ctx.tmp / "out" / name).read_bytes() == (ctx.reference / name).read_bytes(), name


def decoded(ctx: Ctx) -> np.ndarray:
    assert cli.main(["decompress", str(ctx.tmp / "out"), "-o", str(ctx.tmp / "decoded.tif")]) == 0
    with rasterio.open(ctx.tmp / "decoded.tif") as src:
        assert src.transform == ctx.transform and src.descriptions == BANDS
        return src.read()


def all_nodata_back(ctx: Ctx) -> None:
    assert codebook_product.read_date(ctx.tmp / "out", DATE).nodata.all()
    assert not decoded(ctx).any()


def nan_is_nodata(ctx: Ctx) -> None:
    out = decoded(ctx)
    mask = codebook_product.read_date(ctx.tmp / "out", DATE).nodata
    assert mask[:10].all() and not mask[10:].any()
    assert not out[:, :10].any() and out[:, 10:].all()


def saturation_stays_local(ctx: Ctx) -> None:
    out = decoded(ctx)
    far = np.ones(ctx.data.shape[1:], bool)
    far[16:48, 16:48] = False             # the saturated 8 x 8 patch and its neighbourhood
    assert psnr(ctx.data[:, far][:, :, None], out[:, far][:, :, None]) > 30


def tiny(data: np.ndarray) -> np.ndarray:
    return data[:, 20:23, 20:25]


def tiny_grid(shape: tuple[int, int]) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        out = decoded(ctx)
        assert out.shape == (10, *shape) and psnr(tiny(ctx.data)[:, :shape[0], :shape[1]], out) > 25
    return check


def same_decode_as_reference(ctx: Ctx) -> None:
    assert cli.main(["decompress", str(ctx.reference), "-o", str(ctx.tmp / "reference.tif")]) == 0
    with rasterio.open(ctx.tmp / "reference.tif") as a, rasterio.open(ctx.tmp / "out" / "decoded.tif") as b:
        assert a.crs == b.crs and a.transform == b.transform
        np.testing.assert_array_equal(a.read(), b.read())


def output_folder_created(ctx: Ctx) -> None:
    with rasterio.open(ctx.tmp / "new" / "folder" / f"corsa_decoded_{DATE}.tif") as src:
        assert src.count == 10 and src.shape == ctx.data.shape[1:]


# -- how the bad inputs are made ------------------------------------------------------------------

def truncated_after_header(ctx: Ctx) -> list[str]:
    """GDAL opens such a file and fails only on reading a block (directory first, as COGs are)."""
    gdal_copy(ctx.tif(name="plain.tif"), ctx.tmp / "in.tif", driver="GTiff", compress="deflate", tiled=True,
              blockxsize=16, blockysize=16)
    raw = (ctx.tmp / "in.tif").read_bytes()
    (ctx.tmp / "in.tif").write_bytes(raw[:len(raw) // 2])
    return ctx.compress(ctx.tmp / "in.tif")


def cut_before_directory(ctx: Ctx) -> list[str]:
    raw = ctx.tif().read_bytes()
    (ctx.tmp / "in.tif").write_bytes(raw[:len(raw) // 2])    # GDAL writes a new file's directory last
    return ctx.compress(ctx.tmp / "in.tif")


def two_crs(ctx: Ctx) -> list[str]:
    (ctx.tmp / "scenes").mkdir()
    ctx.tif(name="scenes/a.tif")
    write_tif(ctx.tmp / "scenes" / "b.tif", ctx.data, ctx.transform, "EPSG:32632", date="2022-07-08")
    return ctx.compress(ctx.tmp / "scenes")


def edit_product(edit: Callable[[Path, dict], None]) -> Callable[[Ctx], list[str]]:
    def make(ctx: Ctx) -> list[str]:
        prod = ctx.product_copy()
        edit(prod, {k: prod / v for k, v in codebook_product.file_names(DATE).items()})
        return ctx.decompress(prod)
    return make


def set_tags(level: str, **tags: str) -> Callable[[Path, dict], None]:
    def edit(prod: Path, files: dict) -> None:
        for f in ([files[level]] if level else files.values()):
            with rasterio.open(f, "r+") as dst:
                dst.update_tags(**tags)
    return edit


def truncate_l0(prod: Path, files: dict) -> None:
    raw = files["L0"].read_bytes()
    files["L0"].write_bytes(raw[:len(raw) // 2])


def huge_header(prod: Path, files: dict) -> None:
    """An L0 whose header declares 100000 x 100000 px (a sparse file of a few kB) but whose tags
    keep the true grid: reading it whole would need 20 GB."""
    with rasterio.open(files["L0"]) as src:
        tags, profile = src.tags(), src.profile
    profile.update(width=100000, height=100000, tiled=True, blockxsize=256, blockysize=256, sparse_ok=True,
                   BIGTIFF="YES")
    with rasterio.open(files["L0"], "w", **profile) as dst:
        dst.update_tags(**tags)


def indices_past_codebook(prod: Path, files: dict) -> None:
    """Out-of-range indices with a matching checksum, as a faulty writer would leave them."""
    with rasterio.open(files["L1"], "r+") as dst:
        dst.write(np.full((1, 4, 4), 255, np.uint8), window=rasterio.windows.Window(0, 0, 4, 4))
        dst.update_tags(CORSA_PIXELS_CRC32=codebook_product.pixels_crc32(dst.read(1)))


def flipped_index_bit(prod: Path, files: dict) -> None:
    """One index changed inside the compressed data, still a valid index: decodes without the checksum."""
    with rasterio.open(files["L0"], "r+") as dst:
        dst.write(dst.read(1, window=rasterio.windows.Window(5, 5, 1, 1)) ^ 1, 1,
                  window=rasterio.windows.Window(5, 5, 1, 1))


def as_version_1(prod: Path, files: dict) -> None:
    """Each file rewritten as version 1 wrote it: no checksum, no CRS tag."""
    for f in files.values():
        with rasterio.open(f) as src:
            profile, pixels, tags = src.profile, src.read(), src.tags()
        del tags["CORSA_PIXELS_CRC32"], tags["CORSA_INPUT_CRS"]
        with rasterio.open(f, "w", **profile) as dst:
            dst.write(pixels)
            dst.update_tags(**{**tags, "CORSA_FORMAT_VERSION": "1"})


def other_crs_in_header(prod: Path, files: dict) -> None:
    with rasterio.open(files["L0"], "r+") as dst:
        dst.crs = rasterio.crs.CRS.from_epsg(32632)


def foreign_l1(prod: Path, files: dict) -> None:
    other = prod.parent / "other"
    write_tif(prod.parent / "other.tif", np.full((10, 40, 40), 900, np.uint16), Affine.identity(), "EPSG:32633")
    assert cli.main(["compress", str(prod.parent / "other.tif"), "-o", str(other), "--model", "corsa512"]) == 0
    shutil.copyfile(other / files["L1"].name, files["L1"])


def only_part_files(prod: Path, files: dict) -> None:
    for f in files.values():
        f.rename(f.with_name(f.name + ".part"))


def edit_model(name: str, edit: Callable[[Path], None], command: str = "compress") -> Callable[[Ctx], list[str]]:
    def make(ctx: Ctx) -> list[str]:
        model = ctx.model_copy()
        edit(model / name)
        args = ctx.compress(ctx.tif()) if command == "compress" else ctx.decompress(ctx.reference)
        return args + ["--model", str(model)]
    return make


def damage(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[5000:5100] = b"\xff" * 100
    f.write_bytes(bytes(raw))


def junk_with_matching_card(f: Path) -> None:
    f.write_bytes(b"not an onnx model" * 100)
    card_path = f.parent / "model_card.json"
    card = json.loads(card_path.read_text())
    card["files"]["decoder"]["sha256"] = sha256_file(f)
    card_path.write_text(json.dumps(card))


def error(message: str) -> str:
    return f"exit 2: `{message}`"


def empty_folder(ctx: Ctx) -> Path:
    (ctx.tmp / "empty").mkdir()
    return ctx.tmp / "empty"


def other_files(ctx: Ctx) -> Path:
    folder = empty_folder(ctx)
    (folder / "notes.txt").write_text("not a product")
    return folder


def variable_rate_product(ctx: Ctx) -> Path:
    """The scene compressed with the default model (a single .corsa file a date)."""
    assert cli.main(["compress", str(ctx.tif()), "-o", str(ctx.tmp / "vr"), "-q"]) == 0
    return ctx.tmp / "vr"


def without_corsa_file(ctx: Ctx) -> list[str]:
    prod = variable_rate_product(ctx)
    (prod / f"corsa_{DATE}.corsa").unlink()
    return ctx.decompress(prod)


def saturated(ctx: Ctx) -> np.ndarray:
    data = ctx.data.copy()
    data[:, 28:36, 28:36] = 65535
    return data


def with_nan(ctx: Ctx) -> np.ndarray:
    data = ctx.data.astype(np.float32)
    data[:, :10] = np.nan                      # covers the nodata corner: only these rows are nodata
    return data


# (problem, what corsa does, make the command line, check a correct output or None for an error)
CATALOGUE: list[tuple[str, str, Callable[[Ctx], list[str]], Callable[[Ctx], None] | None]] = [
    ("3 bands, no band descriptions", error("has 3 bands and lacks B02"),
     lambda c: c.compress(c.tif(c.data[:3], descriptions=None)), None),
    ("9 bands, B12 missing", error("has 9 bands and lacks B12"),
     lambda c: c.compress(c.tif(c.data[:9], descriptions=BANDS[:9])), None),
    ("two bands described as B04", error("describes more than one band as B04"),
     lambda c: c.compress(c.tif(descriptions=BANDS[:3] + ("B04",) + BANDS[4:])), None),
    ("bands in another order, named by descriptions", "taken by name: the same product as in canonical order",
     lambda c: c.compress(c.tif(c.data[::-1], descriptions=BANDS[::-1])), same_product_as_reference),
    ("all 12 bands of an L2A file (B01 ... B12)", "B01 and B09 left out: the same product",
     lambda c: c.compress(c.tif(np.concatenate([c.data[:1], c.data[:8], c.data[7:8], c.data[8:]]),
                                descriptions=ALL_S2)), same_product_as_reference),
    ("float32 DN", "the same product as uint16 DN",
     lambda c: c.compress(c.tif(c.data.astype(np.float32))), same_product_as_reference),
    ("complex data type", error("has data type complex64"),
     lambda c: c.compress(c.tif(c.data.astype(np.complex64))), None),
    ("all nodata (every band 0)", "compressed; the mask covers all, decodes to 0",
     lambda c: c.compress(c.tif(np.zeros_like(c.data))), all_nodata_back),
    ("NaN pixels (float input)", "NaN pixels are nodata: in the mask, decoded as 0",
     lambda c: c.compress(c.tif(with_nan(c))), nan_is_nodata),
    ("saturated pixels (DN 65535)", "compressed; the rest of the scene decodes as usual (> 30 dB)",
     lambda c: c.compress(c.tif(saturated(c))), saturation_stays_local),
    ("1 x 1 px input", "compressed; decodes to 1 x 1 px on the input grid",
     lambda c: c.compress(c.tif(tiny(c.data)[:, :1, :1])), tiny_grid((1, 1))),
    ("3 x 5 px input", "compressed; decodes to 3 x 5 px on the input grid",
     lambda c: c.compress(c.tif(tiny(c.data))), tiny_grid((3, 5))),
    ("--bbox outside the data", error("selects no pixel"),
     lambda c: c.compress(c.tif(), "--bbox", "0,0,1,1"), None),
    ("--dates with no scene in the range", error("no date of 'SENTINEL2_L2A' lies in"),
     lambda c: c.compress(c.tif(), "--dates", "2000-01-01/2001-01-01"), None),
    ("--dates on an input without dates", error("has data without a date"),
     lambda c: c.compress(c.tif(date=None), "--dates", "2022-01-01/2023-01-01"), None),
    ("a folder of scenes in two CRSs", error("mixes coordinate reference systems"), two_crs, None),
    ("input GeoTIFF truncated (header intact, blocks cut)", error("reading the data failed (truncated or corrupt"),
     truncated_after_header, None),
    ("input GeoTIFF cut before its directory", error("TIFFReadDirectory:Failed to read directory"),
     cut_before_directory, None),
    ("input file does not exist", error("missing.tif: No such file or directory"),
     lambda c: c.compress(c.tmp / "missing.tif"), None),
    ("product L0 file truncated", error("is not a readable GeoTIFF (truncated or corrupt?)"),
     edit_product(truncate_l0), None),
    ("product L1 file missing", error(f"corsa_{DATE}_L1.tif is missing"),
     edit_product(lambda p, f: f["L1"].unlink()), None),
    ("product nodata mask missing", error(f"corsa_{DATE}_nodata.tif is missing"),
     edit_product(lambda p, f: f["nodata"].unlink()), None),
    ("product header declaring 100000 x 100000 px", error("its input grid tags imply"),
     edit_product(huge_header), None),
    ("product tag declaring a huge input grid", error("px this reader accepts (corrupt tag?)"),
     edit_product(set_tags("", CORSA_INPUT_SHAPE="[400000, 400000]")), None),
    ("product tag holding garbage", error("CORSA_INPUT_TRANSFORM '[1, 2]' is not 6 numbers"),
     edit_product(set_tags("", CORSA_INPUT_TRANSFORM="[1, 2]")), None),
    ("product files of two different runs", error("do not belong together"), edit_product(foreign_l1), None),
    ("product indices past the codebook", error("level-1 index 255 out of range for a codebook of 128"),
     edit_product(indices_past_codebook), None),
    ("product index pixel changed (a still valid index)", error("its pixels do not match their checksum"),
     edit_product(flipped_index_bit), None),
    ("product L0 header with another CRS than its tags", error("differs from CORSA_INPUT_CRS"),
     edit_product(other_crs_in_header), None),
    ("a version 1 product (before checksums)", "read as before: decodes to the same image",
     edit_product(as_version_1), same_decode_as_reference),
    ("product written by another model (sha256 differs)", error("was written with model"),
     edit_product(set_tags("", CORSA_MODEL_SHA256="0" * 64)), None),
    ("product folder with only unfinished .part files", error(f"corsa_{DATE}_L0.tif, corsa_{DATE}_L1.tif"),
     edit_product(only_part_files), None),
    ("decompress of an empty folder", error("is empty: give a product folder"),
     lambda c: c.decompress(empty_folder(c)), None),
    ("decompress of a folder of other files", error("holds no CORSA product"),
     lambda c: c.decompress(other_files(c)), None),
    ("compress of an empty folder", error("is empty: give a 10-band GeoTIFF"),
     lambda c: c.compress(empty_folder(c)), None),
    ("variable-rate product whose .corsa file was deleted", error(f"corsa_{DATE}.corsa is missing"),
     without_corsa_file, None),
    ("info of a folder of other files", error("holds no CORSA product"),
     lambda c: ["info", str(other_files(c))], None),
    ("land cover of a corsa512 product", error("gives scene classes only"),
     lambda c: ["classify", str(c.reference), "-o", str(c.tmp / "out" / "lc.tif"), "--classes", "landcover"], None),
    ("--scheduler where no scheduler answers", error("no dask scheduler answers there"),
     lambda c: c.decompress(variable_rate_product(c), "--scheduler", "tcp://127.0.0.1:9"), None),
    ("--model naming no shipped model", error("no model 'corsa9': give a folder with model_card.json or one of"),
     lambda c: c.compress(c.tif(), "--model", "corsa9"), None),
    ("decompress -o to a folder that does not exist", "the folder is created",
     lambda c: ["decompress", str(c.reference), "-o", str(c.tmp / "new" / "folder")], output_folder_created),
    ("encoder.onnx missing", error("encoder.onnx is missing"), edit_model("encoder.onnx", Path.unlink), None),
    ("encoder.onnx damaged", error("does not match the sha256 in its model card"),
     edit_model("encoder.onnx", damage), None),
    ("decoder.onnx not a model, card sha256 matching", error("onnxruntime cannot load"),
     edit_model("decoder.onnx", junk_with_matching_card, "decompress"), None),
    ("model_card.json not valid JSON", error("is not valid JSON"),
     edit_model("model_card.json", lambda f: f.write_text("{bad")), None),
]


@pytest.fixture(scope="module")
def scene(data_root):
    s = next(LOADERS["majortom"](data_root))
    data = s.data[:, 300:364, 500:564].copy()
    data[:, :6, :10] = 0                          # a nodata corner: the product has all three files
    return data, Affine(*s.transform) * Affine.translation(500, 300), s.crs


@pytest.fixture(scope="module")
def reference(scene, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    assert cli.main(["compress", str(write_tif(tmp / "in.tif", *scene)), "-o", str(tmp / "prod"), "--model", "corsa512"]) == 0
    return tmp / "prod"


@pytest.mark.parametrize("problem, answer, make, check", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_catalogue(problem, answer, make, check, tmp_path, scene, reference, capsys):
    ctx = Ctx(tmp_path, *scene, reference)
    argv = make(ctx)
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    if check is not None:
        assert rc == 0, err
        check(ctx)
        return
    message = answer.split("`")[1]
    assert rc == 2 and f"corsa {argv[0]}: error: " in err and message in err, err
    assert "Traceback" not in err
    out = ctx.tmp / "out"
    left = [p.name for p in out.rglob("*")] if out.exists() else []
    assert not left, f"files left after an error: {left}"


def test_the_docs_list_the_catalogue():
    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [f"| {problem} | {answer} |" for problem, answer, _, _ in CATALOGUE
               if f"| {problem} | {answer} |" not in doc]
    assert not missing, "docs/operations.md's troubleshooting table lacks:\n" + "\n".join(missing)
