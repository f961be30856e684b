"""glibc malloc settings for processes that stream large buffers (bundles, batches of rows).

Each 1 MiB chunk of a bundle is allocated and freed several times on its way (file read,
protobuf message, serialized bytes, gRPC's copy). glibc's defaults serve such blocks with
``mmap`` once its dynamic threshold has not yet grown past them, and hand freed memory at the
top of the heap back to the kernel as soon as 128 KiB are free; both mean the next chunk
page-faults every one of its pages in again. Keeping blocks up to 4 MiB on the heap and up to
32 MiB of free heap around removes that: measured on the distribution benchmark (2 cores),
deploy -> verified went from 0.56-0.73 s to 0.39-0.59 s for a 200 MB bundle, with hub and
agent both tuned. The cost is at most 32 MiB of freed memory the process keeps for reuse.

Operators who set ``GLIBC_TUNABLES`` for malloc keep their own settings. On other C libraries
(musl) or systems this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt() parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 << 20
TRIM_THRESHOLD_BYTES = 32 << 20


def tune_malloc() -> bool:
    """Apply the settings above to this process; True if glibc accepted them."""
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or not _glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Fixing the mmap threshold also stops glibc from moving it on its own.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def _glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


__all__ = ["tune_malloc"]
