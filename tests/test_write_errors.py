"""Writes that fail, for real, in subprocesses: a file size limit (RLIMIT_FSIZE: EFBIG), a full
disk (a date's temporary file on /dev/full: ENOSPC) and an I/O error (EIO from the write calls, by
the LD_PRELOAD shim tests/faults/eio.c). Each stops with one clear error naming the file, leaves no
file that looks complete, and keeps the dates already complete readable."""
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from corsa.formats.datasets import LOADERS, revisit_series
from test_service import write_scene

ROOT = Path(__file__).resolve().parents[1]


def _limited(size: int):
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # the write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return setup


def _corsa(*args: str, limit: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corsa.app.cli", *args, "-q"], capture_output=True, text=True, cwd=ROOT,
                          preexec_fn=_limited(limit) if limit else None, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def eio(tmp_path_factory) -> Path:
    """The shim that fails writes to files whose path holds $CORSA_EIO_PATH with EIO, built here."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build tests/faults/eio.c")
    lib = tmp_path_factory.mktemp("eio") / "eio.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(ROOT / "tests" / "faults" / "eio.c"), "-ldl"],
                   check=True)
    return lib


@pytest.fixture(scope="module")
def dates(data_root, tmp_path_factory):
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == "Landcover-31746"])
    folder = tmp_path_factory.mktemp("werr")
    paths = []
    for s in run[:3]:
        data = np.tile(s.data, (1, 3, 3))         # 477 x 471 px: a few kB a date
        paths.append(write_scene(folder / f"{s.date}.tif", data, Affine(*s.transform), s.crs, s.date) or
                     folder / f"{s.date}.tif")
    return paths


def _complete_looking(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*") if p.suffix in (".corsa", ".tif") or p.name.endswith(".part"))


def test_a_file_size_limit_stops_compress_cleanly(dates, tmp_path):
    r = _corsa("compress", str(dates[0]), "-o", str(tmp_path / "p"), "--model", "corsa2.1", limit=2000)
    assert r.returncode == 2, r.stderr
    assert "corsa compress: error: writing " in r.stderr and "corsa_" in r.stderr and "File too large" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "p").exists() or _complete_looking(tmp_path / "p") == []


def test_a_full_disk_stops_compress_cleanly(dates, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    date = dates[0].stem
    os.symlink("/dev/full", out / f"corsa_{date}.corsa.part")     # where the date's bytes go first
    r = _corsa("compress", str(dates[0]), "-o", str(out), "--model", "corsa2.1")
    assert r.returncode == 2, r.stderr
    assert f"writing {out / f'corsa_{date}.corsa'} failed: No space left on device" in r.stderr
    assert _complete_looking(out) == []


def test_a_failed_append_keeps_the_dates_already_there(dates, tmp_path):
    out = tmp_path / "series"
    assert _corsa("compress", str(dates[0]), "-o", str(out), "--model", "corsa3").returncode == 0
    assert _corsa("compress", str(dates[1]), "-o", str(out), "--model", "corsa3", "--append").returncode == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.corsa")}
    assert _corsa("decompress", str(out), "-o", str(tmp_path / "a")).returncode == 0
    r = _corsa("compress", str(dates[2]), "-o", str(out), "--model", "corsa3", "--append", limit=1000)
    assert r.returncode == 2 and "failed: File too large" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.corsa")} == before
    assert not list(out.glob("*.part"))
    assert _corsa("decompress", str(out), "-o", str(tmp_path / "b")).returncode == 0
    for p in (tmp_path / "a").glob("*.tif"):
        with rasterio.open(p) as f, rasterio.open(tmp_path / "b" / p.name) as g:
            assert np.array_equal(f.read(), g.read())


def test_a_file_size_limit_stops_decompress_cleanly(dates, tmp_path):
    assert _corsa("compress", str(dates[0]), "-o", str(tmp_path / "p"), "--model", "corsa2.1").returncode == 0
    r = _corsa("decompress", str(tmp_path / "p"), "-o", str(tmp_path / "out" / "d.tif"), limit=20000)
    assert r.returncode == 2 and "corsa decompress: error: writing " in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list((tmp_path / "out").glob("*"))


def test_an_io_error_stops_compress_append_and_decompress_cleanly(dates, eio, tmp_path):
    out = tmp_path / "series"
    assert _corsa("compress", str(dates[0]), "-o", str(out), "--model", "corsa3").returncode == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.corsa")}
    failing = {"LD_PRELOAD": str(eio), "CORSA_EIO_PATH": ".corsa.part"}     # the new date's bytes (Python's writes)
    r = _corsa("compress", str(dates[1]), "-o", str(out), "--model", "corsa3", "--append", env=failing)
    assert r.returncode == 2, r.stderr
    assert f"writing {out / f'corsa_{dates[1].stem}.corsa'} failed: Input/output error" in r.stderr
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.corsa")} == before and not list(out.glob("*.part"))
    decoded = tmp_path / "decoded"
    failing = {"LD_PRELOAD": str(eio), "CORSA_EIO_PATH": str(decoded)}        # GDAL's writes of the GeoTIFF
    r = _corsa("decompress", str(out), "-o", str(decoded / "d.tif"), env=failing)
    assert r.returncode == 2 and f"corsa decompress: error: writing {decoded / 'd.tif'} failed" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not list(decoded.glob("*"))
    assert _corsa("decompress", str(out), "-o", str(decoded / "d.tif")).returncode == 0
