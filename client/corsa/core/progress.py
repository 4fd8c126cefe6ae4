"""A command's progress on stderr: one bar redrawn in place on a terminal, a line at every tenth
otherwise (logs stay readable), nothing with --quiet. Work reports itself through ``grow`` (units
of work it now knows of) and ``advance`` (units done), whatever runs it (blocks of the CLI's path,
tasks of dask's local schedulers); without an active display both do nothing.
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager, nullcontext
from typing import Iterator, TextIO

WIDTH = 30


class Display:
    def __init__(self, label: str, stream: TextIO | None, on_update=None):
        self.label, self.stream, self.on_update = label, stream, on_update
        self.tty = stream is not None and stream.isatty()
        self.total = self.done = 0
        self.shown = -1
        self.lock = threading.Lock()

    def grow(self, n: int) -> None:
        with self.lock:
            self.total += n

    def advance(self, n: int = 1) -> None:
        with self.lock:
            self.done = min(self.done + n, self.total)
            tenth = 10 * self.done // max(self.total, 1)
            if self.on_update is not None:
                self.on_update(self.done, self.total)
            if self.stream is None:
                return
            if self.tty:
                filled = WIDTH * self.done // max(self.total, 1)
                self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] "
                                  f"{100 * self.done // max(self.total, 1):3d}%")
                self.stream.flush()
            elif tenth > self.shown:
                self.shown = tenth
                self.stream.write(f"{self.label}: {10 * tenth}% ({self.done}/{self.total})\n")
                self.stream.flush()

    def close(self) -> None:
        if self.tty and self.total and self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


_active: Display | None = None


@contextmanager
def shown(label: str, quiet: bool = False, stream: TextIO | None = None, on_update=None,
          dask_tasks: bool = True) -> Iterator[None]:
    """Progress of the work inside the block, labelled ``label`` (nothing when ``quiet``); with
    ``on_update(done, total)`` told to it instead of written. ``dask_tasks``: dask's tasks count too
    (False: dask is not imported for it, work that runs no dask graph starts faster)."""
    global _active
    _active = None if quiet else Display(label, None if on_update else (stream or sys.stderr), on_update)
    try:
        with _dask_tasks() if dask_tasks else nullcontext():
            yield
    finally:
        if _active is not None:
            _active.close()
        _active = None


def grow(n: int) -> None:
    if _active is not None:
        _active.grow(n)


def advance(n: int = 1) -> None:
    if _active is not None:
        _active.advance(n)


@contextmanager
def _dask_tasks() -> Iterator[None]:
    """dask's tasks (local schedulers) as units of the active display, where dask is installed."""
    try:
        from dask.callbacks import Callback
    except ImportError:
        yield
        return

    class Tasks(Callback):
        def _start_state(self, dsk, state) -> None:
            grow(len(state["ready"]) + len(state["waiting"]))

        def _posttask(self, key, result, dsk, state, worker_id) -> None:
            advance()

    with Tasks():
        yield
