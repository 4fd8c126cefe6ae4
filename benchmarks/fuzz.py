"""Fuzzing of the decompress path: random and mutated products through `corsa decompress`.

    python -m benchmarks.fuzz --cases 2000 --seed 1            # the BENCHMARKS.md run (format 2)
    python -m benchmarks.fuzz --cases 15000 --format 5         # dates coded alone (the default model: version 8)
    python -m benchmarks.fuzz --cases 15000 --format 6         # temporal products (a series of it)
    python -m benchmarks.fuzz --cases 15000 --format packed    # a compress job's downloaded files
    python -m benchmarks.fuzz --cases 100 --seconds 60         # about what the test runs

Seed products are compressed from crops of a real scene. Each case copies one, damages it (bytes
flipped in headers and data, files cut, removed or replaced, tags rewritten with hostile values,
pixels overwritten, headers declaring huge grids) and decodes it in a worker process. The worker runs
under an address-space limit (RLIMIT_AS) and each case under a time limit, so a hang or an unbounded
allocation shows up as such. Allowed outcomes: exit 0 with a readable GeoTIFF, or exit 2 with
"corsa decompress: error: ..." and no output file. Anything else (an exception of another type, a
signal, a hang, a MemoryError, output left after an error) is a finding. A damaged product that
decodes is compared with the decode of its undamaged seed: other pixels, grid or CRS count as a
wrong decode (damage that went unnoticed).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .memory import peak_rss_mb
from corsa.core.machine import cpu_name

# Address space of the worker: the decoder, onnxruntime and dask need about 2 GB of it; a product
# read must never need more than a few hundred MB.
MEMORY_LIMIT = 4 << 30
CASE_TIMEOUT = 60.0
TAG_VALUES = ["", "garbage", "null", "[]", "[1]", "[0, 0]", "[-4, 8]", "[1.5, 2]", "[\"a\", \"b\"]", "[true, 2]",
              "[100000, 100000]", "[1000000000, 1000000000]", "[64, 64, 64]", "{\"a\": 1}", "1e309", "NaN",
              "[NaN, 1, 0, 0, -1, 0]", "[1, 2, 3]", "2", "0" * 64, "x" * 5000, "corsa-product", "2022-07-06",
              "1999-01-01", "L1", "L0", "nodata", "mask in nowhere"]
TAGS = ["CORSA_FORMAT", "CORSA_FORMAT_VERSION", "CORSA_LEVEL", "CORSA_MODEL_ID", "CORSA_MODEL_SHA256",
        "CORSA_BANDS", "CORSA_DATE", "CORSA_INPUT_SHAPE", "CORSA_INPUT_TRANSFORM", "CORSA_INPUT_CRS",
        "CORSA_NODATA", "CORSA_PIXELS_CRC32"]


# -- damaging a product ------------------------------------------------------------------------

def _flip_bytes(rng: random.Random, f: Path) -> str:
    data = bytearray(f.read_bytes())
    # Half the flips land in the first kB, where the TIFF header, directory and tags are.
    span = min(len(data), 1024) if rng.random() < 0.5 else len(data)
    for _ in range(rng.choice((1, 2, 8, 64))):
        data[rng.randrange(span)] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(data))
    return f"flip bytes of {f.name}"


def _truncate(rng: random.Random, f: Path) -> str:
    data = f.read_bytes()
    n = rng.randrange(len(data))
    f.write_bytes(data[:n])
    return f"cut {f.name} to {n} bytes"


def _delete(rng: random.Random, f: Path) -> str:
    f.unlink()
    return f"delete {f.name}"


def _random_bytes(rng: random.Random, f: Path) -> str:
    head = rng.choice((b"", b"II*\x00", b"MM\x00*", b"II+\x00\x08\x00\x00\x00"))
    f.write_bytes(head + rng.randbytes(rng.choice((0, 8, 100, 5000))))
    return f"replace {f.name} with random bytes"


def _set_tag(rng: random.Random, f: Path) -> str:
    import rasterio

    tag, value = rng.choice(TAGS), rng.choice(TAG_VALUES)
    with rasterio.open(f, "r+") as dst:
        dst.update_tags(**{tag: value})
    return f"{f.name}: {tag}={value[:40]!r}"


def _set_pixels(rng: random.Random, f: Path) -> str:
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(f, "r+") as dst:
        h, w = rng.randint(1, min(dst.height, 512)), rng.randint(1, min(dst.width, 512))
        top = np.iinfo(np.dtype(dst.dtypes[0])).max
        if rng.random() < 0.5:
            values = np.full((h, w), top)
        else:
            values = np.random.default_rng(rng.randrange(1 << 30)).integers(0, top + 1, (h, w))
        dst.write(values.astype(dst.dtypes[0]), 1, window=Window(0, 0, w, h))
    return f"overwrite {h}x{w} px of {f.name}"


def _huge_header(rng: random.Random, f: Path) -> str:
    """Replace a file by a sparse one declaring a huge grid, keeping (or scaling up) its tags."""
    import rasterio

    with rasterio.open(f) as src:
        tags, profile = src.tags(), src.profile
    side = rng.choice((20000, 100000, 1000000))
    if rng.random() < 0.5:  # tags that agree with the header
        tags["CORSA_INPUT_SHAPE"] = json.dumps([side, side])
    block = -(-side // 200 // 16) * 16  # few tiles: the tile index of a sparse file is written in full
    profile.update(width=side, height=side, tiled=True, blockxsize=block, blockysize=block, sparse_ok=True,
                   BIGTIFF="YES")
    f.unlink()
    with rasterio.open(f, "w", **profile) as dst:
        dst.update_tags(**tags)
    return f"{f.name} declares {side} x {side} px"


def _swap(rng: random.Random, f: Path) -> str:
    other = rng.choice([p for p in f.parent.iterdir() if p != f] or [f])
    shutil.copyfile(other, f)
    return f"{f.name} replaced by {other.name}"


MUTATIONS = {"flip": _flip_bytes, "truncate": _truncate, "delete": _delete, "random": _random_bytes,
             "tag": _set_tag, "pixels": _set_pixels, "huge": _huge_header, "swap": _swap}


def _damageable(folder: Path) -> list[Path]:
    """The files decompress reads: not the STAC documents beside them (a job's job.json is read)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix != ".json" or p.name == "job.json"))


def mutate(rng: random.Random, seed: Path, case: Path) -> list[str]:
    """Copy the product ``seed`` to ``case`` and damage it with 1-3 random mutations."""
    shutil.copytree(seed, case)
    done = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        files = _damageable(case)
        if not files:
            break
        name = rng.choice(sorted(MUTATIONS))
        try:
            done.append(f"{name}: " + MUTATIONS[name](rng, rng.choice(files)))
        except Exception as e:  # rasterio may refuse to open a file an earlier mutation damaged
            done.append(f"{name}: not applied ({type(e).__name__})")
    return done


def mutate_isolated(rng: random.Random, seed: Path, case: Path, timeout: float = 60.0) -> list[str] | None:
    """``mutate`` in a forked child: GDAL itself may crash or hang when it updates a damaged file,
    which must not stop the run. None if the child did not finish."""
    note = case.with_name(case.name + ".json")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            note.write_text(json.dumps(mutate(rng, seed, case)))
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.005)
    return json.loads(note.read_text()) if os.waitstatus_to_exitcode(status) == 0 else None


def _write(path: Path, data: np.ndarray, transform, crs: str, date: str) -> Path:
    import rasterio

    from corsa.core.scene import BANDS

    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=len(BANDS),
                       dtype="uint16", transform=transform, crs=crs) as dst:
        dst.write(data)
        dst.update_tags(CORSA_DATE=date)
    return path


def _job_files(tif: Path, out: Path, model: str = "corsa2.1", quality: int = 3) -> Path:
    """What a compress job of the corsa2 service over ``tif`` downloads: its layers and job.json."""
    from corsa.openeo import processes
    from corsa.codec.models import read_card
    from corsa.openeo.engine import Engine
    from corsa.formats.job_files import write_job_file
    from corsa.formats.sources import Catalogue

    path, card = read_card(model)
    Engine(Catalogue({"SENTINEL2_L2A": tif}), output=out).run(
        processes.compress_s2_process(card, 10.0), spatial_extent=None, temporal_extent=None, max_cloud_cover=80,
        model=str(path), quality=quality)
    write_job_file(out, {"process": {"process_graph": {"c": {
        "process_id": "corsa2_openeo_compress_s2", "arguments": {"model": f"models/{model}", "quality": quality},
        "result": True}}}}, sorted(out.glob("corsa_*.tif")))
    return out


def make_seeds(folder: Path, scene: np.ndarray, transform, crs: str, fmt: str = "2", model: str | None = None,
               quality: int = 3) -> list[Path]:
    """Products of real crops: one with a nodata mask, one without, one of odd size (format 2: the
    GeoTIFF product of corsa512; 5: ``model``'s dates coded alone (version 5; 7 with class tables, 8 with a
    refinement), default: the default model;
    packed: a compress job's files of corsa2.1); format 6: a series of ``model`` of three dates, one
    of them with nodata. (Formats 3 and 4, the same without channel maps, are no longer written:
    tests/products holds one of each.)"""
    from corsa.app import cli
    from corsa.codec.models import default_model

    seeds, model = [], model or default_model()
    if fmt == "6":
        for name, (h, w) in (("series", (64, 64)), ("odd", (13, 7))):
            src = folder / f"{name}_in"
            src.mkdir()
            for k, date in enumerate(("2022-07-06", "2022-07-11", "2022-07-16")):
                data = scene[:, 8 * k:8 * k + h, :w].copy()     # the place moves a little: dates differ
                if k == 1:
                    data[:, :9, :13] = 0
                _write(src / f"{date}.tif", data, transform, crs, date)
            if cli.main(["compress", str(src), "-o", str(folder / name), "--model", model, "--quality", str(quality)]) != 0:
                raise RuntimeError(f"compressing the seed {name} failed")
            seeds.append(folder / name)
        return seeds
    for name, (h, w), nodata in (("mask", (64, 64), True), ("plain", (48, 80), False), ("odd", (13, 7), False)):
        data = scene[:, :h, :w].copy()
        if nodata:
            data[:, :9, :13] = 0
        tif = _write(folder / f"{name}.tif", data, transform, crs, "2022-07-06")
        if fmt == "packed":
            _job_files(tif, folder / name)
        elif cli.main(["compress", str(tif), "-o", str(folder / name)] + (["--model", model, "--quality", str(quality)]
                                                                           if fmt == "5" else [])) != 0:
            raise RuntimeError(f"compressing the seed {name} failed")
        seeds.append(folder / name)
    return seeds


# -- running cases in a bounded worker ---------------------------------------------------------

def worker() -> None:
    """Decode the cases named on stdin, one JSON line of outcome each on stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import contextlib
    import io

    from corsa.app import cli

    # Our lines go to the real stdout; whatever else writes to fd 1 (progress bars, C libraries) to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        case, target = line.rstrip("\n").split("\t")
        err = io.StringIO()
        result = {"exc": None}
        try:
            with contextlib.redirect_stderr(err):
                result["rc"] = cli.main(["decompress", case, "-o", target])
        except BaseException as e:  # a finding: report it, keep going
            result.update(rc=None, exc=type(e).__name__, msg=str(e)[:300])
        result["stderr"] = err.getvalue()[:400]
        result["maxrss_mb"] = int(peak_rss_mb())
        print(json.dumps(result), file=out, flush=True)


@dataclass
class Worker:
    proc: subprocess.Popen = field(init=False)

    def __post_init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.fuzz", "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                     cwd=Path(__file__).resolve().parents[1])
        if self._line(120.0) is None:
            raise RuntimeError("the fuzz worker did not start")

    def _line(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def run(self, case: Path, target: Path, timeout: float) -> dict:
        self.proc.stdin.write(f"{case}\t{target}\n")
        self.proc.stdin.flush()
        result = self._line(timeout)
        if result is None:
            hung = self.proc.poll() is None
            self.stop()
            return {"rc": None, "exc": "hang" if hung else f"worker died ({self.proc.returncode})"}
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def decoded_image(folder: Path) -> dict[str, tuple]:
    """What a decode gives a user, file by file: pixels, grid and CRS."""
    import rasterio

    out = {}
    for path in sorted(folder.glob("*.tif")):
        with rasterio.open(path) as src:
            out[path.name] = (src.read(), src.transform, src.crs)
    return out


def same_image(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(x[0].shape == y[0].shape and bool((x[0] == y[0]).all()) and x[1:] == y[1:]
                                        for x, y in ((a[k], b[k]) for k in a))


def seed_images(seeds: list[Path], folder: Path) -> dict[Path, tuple]:
    """The decode of each undamaged seed product."""
    from corsa.app import cli

    images = {}
    for seed in seeds:
        target = folder / f"{seed.name}_decoded"
        if cli.main(["decompress", str(seed), "-o", str(target)]) != 0:
            raise RuntimeError(f"decoding the seed {seed.name} failed")
        images[seed] = decoded_image(target)
    return images


def judge(result: dict, target: Path) -> str | None:
    """What is wrong with a case's outcome, or None."""
    if result.get("exc"):
        return f"{result['exc']}: {result.get('msg', '')}"
    if result["rc"] == 2:
        if "error:" not in result["stderr"] or "Traceback" in result["stderr"]:
            return f"exit 2 without a clear message: {result['stderr']!r}"
        if list(target.glob("*.tif*")) or list(target.parent.glob("*.part")):
            return "output left behind after an error"
        return None
    if result["rc"] == 0:
        import rasterio

        for path in target.glob("*.tif"):
            with rasterio.open(path) as src:
                if src.count != 10 or src.dtypes[0] != "uint16":
                    return f"{path.name} decoded to {src.count} bands of {src.dtypes[0]}"
        return None
    return f"exit code {result['rc']}"


@dataclass
class Report:
    cases: int = 0
    refused: int = 0
    decoded: int = 0
    wrong: int = 0              # decoded, but not to what the undamaged product gives
    findings: list = field(default_factory=list)
    mutation_crashes: int = 0   # GDAL died damaging a file (in the harness, not in decompress)
    decoded_examples: list = field(default_factory=list)   # damage that decoded
    wrong_examples: list = field(default_factory=list)     # damage that decoded to a wrong image
    max_rss_mb: int = 0
    seconds: float = 0.0


def fuzz(seeds: list[Path], work: Path, cases: int, seconds: float, seed: int = 0,
         case_timeout: float = CASE_TIMEOUT) -> Report:
    """Decode ``cases`` mutated products within ``seconds`` (checked between cases); a case whose
    mutation crashed GDAL in the harness is not one of them."""
    report, t0 = Report(), time.monotonic()
    images = seed_images(seeds, work)
    w = Worker()
    try:
        for i in itertools.count():
            if report.cases >= cases or time.monotonic() - t0 > seconds:
                break
            case_dir = work / f"case{i}"
            case, target = case_dir / "product", case_dir / "out"
            rng = random.Random(f"{seed}-{i}")  # each case on its own: a run can be replayed case by case
            seed_product = rng.choice(seeds)
            what = mutate_isolated(rng, seed_product, case)
            if what is None:
                report.mutation_crashes += 1
                shutil.rmtree(case_dir, ignore_errors=True)
                continue
            result = w.run(case, target, case_timeout)
            problem = judge(result, target)
            report.cases += 1
            report.max_rss_mb = max(report.max_rss_mb, result.get("maxrss_mb", 0))
            if problem:
                report.findings.append({"case": i, "mutations": what, "problem": problem})
            elif result["rc"] == 0:
                report.decoded += 1
                if len(report.decoded_examples) < 20:
                    report.decoded_examples.append(what)
                if not same_image(decoded_image(target), images[seed_product]):
                    report.wrong += 1
                    report.wrong_examples.append(what)
            else:
                report.refused += 1
            if w.proc.poll() is not None:
                w = Worker()
            shutil.rmtree(case_dir)
    finally:
        w.stop()
        report.seconds = time.monotonic() - t0
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cases", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=3600.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--format", default="2", choices=("2", "5", "6", "packed"),
                   help="the products fuzzed: 2 (corsa512 GeoTIFFs), 5 (entropy-coded streams), 6 (a temporal "
                   "series), packed (a compress job's files)")
    p.add_argument("--model", help="the variable-rate model of formats 5 and 6 (default: the default model)")
    p.add_argument("--quality", type=int, default=3, help="the quality of the seeds of formats 5 and 6 (a loop filter "
                   "at the levels its model's card lists, on the 64 px seeds)")
    p.add_argument("--out", type=Path, help="also write the report here (JSON)")
    args = p.parse_args()
    if args.worker:
        worker()
        return
    from rasterio.transform import Affine

    from corsa.formats.datasets import LOADERS, default_data_root

    scene = next(LOADERS["majortom"](default_data_root()))
    with tempfile.TemporaryDirectory() as tmp:
        seeds = make_seeds(Path(tmp), scene.data, Affine(*scene.transform), scene.crs, args.format, args.model, args.quality)
        report = fuzz(seeds, Path(tmp), args.cases, args.seconds, args.seed)
    from corsa.codec.models import default_model

    model = (args.model or default_model()) if args.format in ("5", "6") else None
    text = json.dumps({"format": args.format, "model": model, "quality": args.quality if model else None, "cpu": cpu_name(),
                       **report.__dict__}, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
