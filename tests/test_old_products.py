"""Products written by earlier versions of corsa keep decoding to the same pixels: one committed
product of each format version (1, 2: corsa512's GeoTIFF index grids, version 1 without checksums
or STAC documents; 3: a corsa3.1 date; 4: a corsa3.1 series coded with references), written and
decoded by the code of before the package was regrouped by layer; 12 and 13 (corsa4.2's level 11: level 9 and a
residual layer, a 96 px Major-TOM crop with a nodata corner and three 96 px WorldStrat dates) by the code that
introduced them (issue 28, twenty-fourth part). tests/products/decoded.json holds
each decoded date's grid, CRS and the sha256 of its pixels, <product>-decoded.npz the pixels: on
the CPU kernels that wrote them the pixels are identical; on others the decoder's float arithmetic
may move a value by 1 DN (README, "other machines"), never more. Decoded with the float decoder
(--kernels fp32): a model's int8 decoder, the default at the levels its card lists, came later and
is held to its card's figures instead (test_int8_decoder)."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from corsa.app import cli

PRODUCTS = Path(__file__).resolve().parent / "products"
EXPECTED = json.loads((PRODUCTS / "decoded.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_old_product_decodes_to_the_same_pixels(name, tmp_path):
    product = Path(shutil.copytree(PRODUCTS / name, tmp_path / name))
    assert cli.main(["decompress", str(product), "-o", str(tmp_path / "decoded"), "-q", "--kernels", "fp32"]) == 0
    decoded = sorted((tmp_path / "decoded").glob("*.tif"))
    assert [p.name for p in decoded] == sorted(EXPECTED[name])
    with np.load(PRODUCTS / f"{name}-decoded.npz") as then:
        for path in decoded:
            with rasterio.open(path) as src:
                pixels = src.read()
                assert [list(src.transform)[:6], str(src.crs)] == [EXPECTED[name][path.name][k] for k in ("transform", "crs")]
            before = then[path.stem]
            assert hashlib.sha256(before.tobytes()).hexdigest() == EXPECTED[name][path.name]["sha256"]
            diff = np.abs(pixels.astype(np.int32) - before)
            assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, (path.name, diff.max(), np.mean(diff > 0))
            assert pixels.any()
