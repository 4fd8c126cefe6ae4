"""The UDF gives freed activations back to the OS, so a process's memory does not creep up with
the number of chunks it has run (the scale rows in BENCHMARKS.md measure the effect)."""
import platform
import subprocess
import sys

import pytest

# After freeing a 16 MiB block glibc raises its mmap threshold to 16 MiB: the next 8 MiB block comes
# from the heap and stays resident after it is freed, unless the threshold was fixed beforehand.
PROBE = """
import sys
import numpy as np
import corsa_udf

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 >> 20

if sys.argv[1] == "udf":
    corsa_udf.session("{model}")
a = np.ones(16 << 20, np.uint8)
del a
before = rss_mib()
b = np.ones(8 << 20, np.uint8)
del b
print(rss_mib() - before)
"""


def kept_mib(mode: str) -> int:
    from corsa.codec import MODELS_DIR

    code = PROBE.format(model=MODELS_DIR / "corsa512" / "decoder.onnx")
    return int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_freed_blocks_go_back_to_the_os_once_the_udf_has_a_session():
    assert kept_mib("plain") >= 6      # glibc's default: the freed 8 MiB stays resident
    assert kept_mib("udf") <= 1        # after the UDF made its session: given back
