"""The UDF gives freed activations back to the OS, so a process's memory does not creep up with
the number of chunks it has run (the scale rows in BENCHMARKS.md measure the effect)."""
import ctypes
import os
import platform
import subprocess
import sys

import pytest

# After freeing a 16 MiB block glibc raises its mmap threshold to 16 MiB: the next 8 MiB block comes
# from the heap, which keeps it after it is freed, unless the threshold was fixed beforehand. Where
# a block came from is read from glibc itself (mallinfo2: bytes in mmapped blocks): an RSS delta
# alone depends on how much free, resident heap the imports happened to leave (0 MiB seen in CI).
PROBE = """
import ctypes, sys
import numpy as np
import corsa_udf

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 >> 20

if sys.argv[1] == "udf":
    corsa_udf.session("{model}")
a = np.ones(16 << 20, np.uint8)
del a
before, mapped = rss_mib(), libc.mallinfo2().hblkhd
b = np.ones(8 << 20, np.uint8)
mapped = (libc.mallinfo2().hblkhd - mapped) >> 20
del b
print(mapped, rss_mib() - before)
"""


def probe(mode: str) -> tuple[int, int]:
    """(MiB of the 8 MiB block that glibc mmapped, MiB of RSS kept after it was freed)."""
    from corsa.codec.models import MODELS_DIR

    code = PROBE.format(model=MODELS_DIR / "corsa512" / "decoder.onnx")
    # glibc's defaults: a dask LocalCluster started earlier in this process put MALLOC_TRIM_THRESHOLD_
    # in os.environ, and any MALLOC_ setting turns glibc's moving threshold off.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                         env=env).stdout
    mapped, kept = map(int, out.split())
    return mapped, kept


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not _has_mallinfo2(),
                    reason="glibc's allocator (2.33 or later, for mallinfo2)")
def test_freed_blocks_go_back_to_the_os_once_the_udf_has_a_session():
    assert probe("plain")[0] == 0          # glibc's default: the block comes from the heap, which keeps it
    mapped, kept = probe("udf")
    assert mapped >= 8                     # after the UDF made its session: mapped on its own ...
    assert kept <= 1                       # ... and given back when freed
