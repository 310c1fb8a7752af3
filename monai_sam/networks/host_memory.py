"""Give the heap memory the C allocator keeps after freeing back to the operating system.

Why: on a CPU, each slice's image encoder allocates and frees tens of MB of activations while
small tensors that outlive the slice (the memory bank, the results) land between them. glibc
cannot hand such a fragmented heap back, so the process's resident memory creeps up slice by
slice (about 4 MB per slice at 512 px, measured: docs/results.md). ``malloc_trim`` returns the
free pages inside the heap as well as at its end; called once per encoder chunk it took the
RSS increase of 48 slices from 421 to 311 MB at no measurable cost in time. Other C libraries
(musl, macOS, Windows) have no such call: nothing is done there.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

__all__ = ["trim_host_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library the interpreter is linked with
    except (OSError, AttributeError):
        return None


def trim_host_memory() -> bool:
    """Release the allocator's free heap pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
