"""Where the block path's work runs: two local threads, or the workers of a dask.distributed cluster.

    with runner(scheduler) as run:          # None: local threads; "tcp://host:port": that cluster
        for result in run.map(fn, items):   # in the order of items
            ...

On a cluster the function is sent once (scattered to the workers, not copied into each task), so
the task graph holds only the items: block positions and names, whatever the scene's size. What a
function needs it opens where it runs: files by path (the workers must see the same paths: one
machine, or a shared file system), onnxruntime sessions by model folder (a codec pickles as its
folder, ``corsa.codec.models``), a lazy input cube's window read by the worker itself. Results come back
in order and are released as they are taken, so the client holds a row of blocks at a time.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

THREADS = 2


def _in_worker(fn: Callable, item: Any) -> Any:
    """One item on a worker: a lazy array it reads is computed right there, not sent back to the
    cluster as tasks of its own (which would wait on the worker's own thread)."""
    import dask
    with dask.config.set(scheduler="sync"):
        return fn(item)


class Local:
    """Items on this machine's threads (onnxruntime and the range coder release the GIL)."""

    def __init__(self, threads: int | None = None):
        self.pool = ThreadPoolExecutor(threads or THREADS)

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        return self.pool.map(fn, items)

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(cancel_futures=cancel)


class Cluster:
    """Items on the workers of a dask.distributed scheduler."""

    def __init__(self, address: str):
        from dask.distributed import Client
        host, _, port = address.split("://")[-1].rpartition(":")
        try:
            # A refused port fails at once here; the client would retry until its timeout.
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
            self.client = Client(address, timeout="30s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            raise ValueError(f"--scheduler {address}: no dask scheduler answers there ({e}); start one with "
                             "'dask scheduler' and workers with 'dask worker ADDRESS'") from None

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        items = list(items)
        if not items:
            return iter(())
        [sent] = self.client.scatter([fn], broadcast=True, hash=False)
        futures = self.client.map(_in_worker, [sent] * len(items), items, pure=False)
        return self._results(futures, sent)

    @staticmethod
    def _results(futures: list, sent) -> Iterator:
        try:
            for i, f in enumerate(futures):
                yield f.result()
                futures[i] = None       # released: the worker may drop it
        finally:
            for f in futures:
                if f is not None:
                    f.cancel()
            sent.release()

    def close(self, cancel: bool = False) -> None:
        self.client.close()


@contextmanager
def runner(scheduler: str | None = None) -> Iterator[Local | Cluster]:
    """Local threads (``scheduler`` None) or the cluster at ``scheduler``, closed on leaving."""
    run = Cluster(scheduler) if scheduler else Local()
    try:
        yield run
    except BaseException:
        run.close(cancel=True)
        raise
    run.close()


@contextmanager
def processes(workers: int = 2, threads: int = 1) -> Iterator[str]:
    """A scheduler and ``workers`` worker processes on 127.0.0.1, started as a user starts them
    (``dask scheduler``, ``dask worker``) and stopped on leaving; yields the scheduler's address."""
    from dask.distributed import Client

    dask_cli = str(Path(sys.executable).with_name("dask"))
    with tempfile.TemporaryDirectory(prefix="corsa-cluster-") as folder:
        address_file = Path(folder) / "scheduler.json"
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": folder}
        procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                   "--scheduler-file", str(address_file)], **quiet)]
        try:
            for _ in range(600):
                if address_file.is_file() and address_file.stat().st_size:
                    break
                time.sleep(0.1)
            procs.append(subprocess.Popen([dask_cli, "worker", "--scheduler-file", str(address_file), "--nworkers",
                                           str(workers), "--nthreads", str(threads), "--host", "127.0.0.1",
                                           "--no-dashboard", "--local-directory", folder], **quiet))
            with Client(scheduler_file=str(address_file), timeout="60s") as client:
                client.wait_for_workers(workers, timeout=120)
                address = client.scheduler.address
            yield address
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
