"""A compress job killed midway leaves no file that looks finished, and re-running completes it."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
from rasterio.transform import Affine

from corsa.app import cli
from corsa.formats import codebook_product
from corsa.formats.datasets import LOADERS

from test_bad_inputs import DATE, write_tif
from conftest import stored_files


def test_killed_compress_leaves_nothing_that_looks_finished(tmp_path, data_root, capsys):
    s = next(LOADERS["majortom"](data_root))
    data = s.data[:, :768, :768].copy()
    data[:, :40, :40] = 0                           # the mask file is opened with the first block
    src = write_tif(tmp_path / "in.tif", data, Affine(*s.transform), s.crs)
    out = tmp_path / "prod"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "corsa.app.cli", "compress", str(src), "-o", str(out), "--model", "corsa512"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("*.part")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)                 # midway: the first blocks are written, the rest not
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    left = sorted(p.name for p in stored_files(out))
    assert left and all(name.endswith(".part") for name in left), left
    assert codebook_product.dates_in(out) == []
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 2
    assert cli.main(["decompress", str(out), "-o", str(tmp_path / "decoded.tif")]) == 2
    assert capsys.readouterr().err.count("holds no CORSA product") == 2
    assert not (tmp_path / "decoded.tif").exists()

    assert cli.main(["compress", str(src), "-o", str(out), "--model", "corsa512"]) == 0
    assert sorted(p.name for p in stored_files(out)) == sorted(codebook_product.file_names(DATE).values())
    d = codebook_product.read_date(out, DATE)
    np.testing.assert_array_equal(d.nodata, (data == 0).all(0))
    assert d.idx0.shape == (384, 384) and d.idx1.shape == (192, 192)
