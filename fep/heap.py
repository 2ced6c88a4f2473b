"""How the daemon's C heap keeps memory it has freed.

glibc gives memory back to the kernel as soon as 128 KiB lie free at the top of its heap, and serves a
block over its (moving) threshold with mmap, unmapped again when freed. A big inpatient upload allocates
and frees buffers of its own size several times over (the body, the digest's encoding, the journal's
request, the answer), so each was page-faulted afresh: some 6 ms of fep's 70 on a 3.5 MB 2301. The daemon
keeps what it frees, up to KEEP, for the next upload instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util

KEEP = 64 << 20  # bytes free at the heap's top before glibc trims it: a 20,000-line upload's buffers
MMAP_FROM = 32 << 20  # blocks this big or bigger still get mappings of their own (glibc's upper limit)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse. False where the C library is not glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, KEEP)) and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_FROM))
