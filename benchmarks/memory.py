"""Peak resident memory of this process, as the benchmarks report it.

Not getrusage's ru_maxrss: Linux carries it across execve from the image a process replaces, so
a child that subprocess started (vfork + exec) reports at least its parent's peak. The scale
benchmark's parent writes large mosaics first, and its children's "peaks" were the parent's
(BENCHMARKS.md). VmHWM is the high-water mark of this process's own memory since it started."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux: the best there is (kB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
