"""Several processes on one product folder, for real: a second writer stops with a clear error while
the first holds the folder (and writes once it is free); a reader running while dates are appended
always sees complete dates that decode."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rasterio.transform import Affine

from corsa.formats.datasets import LOADERS, revisit_series
from test_service import write_scene

ROOT = Path(__file__).resolve().parents[1]


def _corsa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corsa.app.cli", *args, "-q"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.fixture(scope="module")
def dates(data_root, tmp_path_factory):
    (run,) = revisit_series([s for s in LOADERS["worldstrat"](data_root) if s.location == "Landcover-31746"])
    folder = tmp_path_factory.mktemp("conc")
    for s in run:
        write_scene(folder / f"{s.date}.tif", s.data, Affine(*s.transform), s.crs, s.date)
    return sorted(folder.glob("*.tif"))


def test_a_second_writer_is_refused_while_the_first_writes(dates, tmp_path):
    out = tmp_path / "p"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom corsa.core.files import product_lock\n"
                               f"with product_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (["compress", str(dates[0]), "-o", str(out), "--model", "corsa3"],
                     ["reduce", str(out), "--quality", "1", "-o", str(out)]):
            r = _corsa(*args)
            assert r.returncode == 2, r.stderr
            assert f"{out} is being written by another corsa process" in r.stderr
        assert not list(out.glob("corsa_*"))
    finally:
        holder.kill()
        holder.wait()
    assert _corsa("compress", str(dates[0]), "-o", str(out), "--model", "corsa3").returncode == 0


def test_a_reader_sees_only_complete_dates_while_dates_are_appended(dates, tmp_path):
    out = tmp_path / "series"
    assert _corsa("compress", str(dates[0]), "-o", str(out), "--model", "corsa3").returncode == 0
    script = "".join(f"corsa.app.cli.main(['compress', {str(d)!r}, '-o', {str(out)!r}, '--model', 'corsa3', '--append', '-q'])\n"
                     for d in dates[1:])
    writer = subprocess.Popen([sys.executable, "-c", "import corsa.app.cli\n" + script], cwd=ROOT)
    seen, reads = set(), 0
    try:
        while writer.poll() is None or reads < 2:
            r = _corsa("info", str(out), "--json")
            assert r.returncode == 0, r.stderr
            listed = [d["date"] for d in json.loads(r.stdout)["dates"]]
            d = _corsa("decompress", str(out), "-o", str(tmp_path / f"r{reads}.tif"), "--date", listed[-1])
            assert d.returncode == 0, d.stderr
            seen.add(len(listed))
            reads += 1
    finally:
        writer.wait(300)
    assert writer.returncode == 0
    assert len(json.loads(_corsa("info", str(out), "--json").stdout)["dates"]) == len(dates)
    assert len(seen) >= 2        # the reader ran while the product grew
