"""Bounded fuzzing of `corsa decompress` (the longer run: benchmarks/fuzz.py, figures in BENCHMARKS.md).

Each mutated product is decoded in a worker process under an address-space limit and a time limit
per case: a crash other than our clear error, a hang, a MemoryError or output left after an error
is a finding, and the test shows them all."""
import os
import signal
from pathlib import Path

import pytest
from rasterio.transform import Affine

from benchmarks import fuzz
from corsa.formats.datasets import LOADERS

# A fixed number of cases, not a time budget: a busy machine runs them slower, not fewer.
CASES, SECONDS, SEED = 40, 300.0, 6


@pytest.mark.parametrize("fmt", ["2", "5", "6", "packed"])
def test_decompress_survives_damaged_products(tmp_path, data_root, fmt):
    scene = next(LOADERS["majortom"](data_root))
    seeds = fuzz.make_seeds(tmp_path, scene.data, Affine(*scene.transform), scene.crs, fmt)
    report = fuzz.fuzz(seeds, tmp_path, CASES, SECONDS, SEED, case_timeout=30.0)
    assert report.cases == CASES, f"only {report.cases} cases ran in {SECONDS} s"
    assert not report.findings, "\n".join(str(f) for f in report.findings)
    assert report.refused > report.cases / 2      # most damage is noticed, not decoded
    # what decodes, decodes as if undamaged (packed files: through the sha256 of each that job.json records)
    assert report.wrong == 0, report.wrong_examples
    assert report.max_rss_mb < fuzz.MEMORY_LIMIT >> 20


def test_worker_is_bounded_in_memory_and_time(tmp_path):
    """The limits are real: the worker runs under RLIMIT_AS, and a case that never answers is a hang."""
    w = fuzz.Worker()
    limits = Path(f"/proc/{w.proc.pid}/limits").read_text().splitlines()
    assert any(line.startswith("Max address space") and str(fuzz.MEMORY_LIMIT) in line for line in limits)
    os.kill(w.proc.pid, signal.SIGSTOP)             # stands for a decoder stuck in a loop
    assert w.run(tmp_path / "p", tmp_path / "o", 2.0)["exc"] == "hang"
    assert w.proc.poll() is not None                # and the stuck worker was killed
