"""Host-memory settings for llmos's long-running processes (the kernel and its services).

They relay large frames (file chunks, prompts) all day. With glibc's defaults every multi-MiB
buffer is a fresh mmap or a trimmed heap, so each one costs ~1,000 page faults; keeping
such buffers in the heap (and not trimming it back eagerly) doubled fs upload throughput
(bench/fs_throughput.py). A no-op where glibc's mallopt is not available.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_large_buffers(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False
