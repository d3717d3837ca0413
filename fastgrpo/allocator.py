"""CPU allocator tuning for training and benchmarks on CPU.

glibc returns large freed blocks to the OS (mmap / heap trimming), so a loop that allocates the same multi-MB
tensors every step page-faults on every fresh touch: at SD latent sizes that costs more than the kernels. Raising
the mmap and trim thresholds keeps those blocks in the heap. It changes process-wide malloc behaviour, so only the
trainer and the benchmark suite call it (for every variant alike); FASTGRPO_KEEP_MALLOC=1 leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds; True when applied (Linux with glibc, not disabled)."""
    if not sys.platform.startswith("linux") or os.environ.get("FASTGRPO_KEEP_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
