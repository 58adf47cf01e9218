"""The cost of an edit as ``surgery compare`` measures it: wall time and peak resident memory of a block."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import time
from collections.abc import Iterator


def trim_memory() -> None:
    """Give freed memory back to the OS, so that the next peak is measured from what is really in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.contextmanager
def measure(cost: dict) -> Iterator[None]:
    """Wall time and peak resident memory of the block, into ``cost``.

    Linux: the process's peak (VmHWM) is reset before the block (``/proc/self/clear_refs``), so
    ``peak_rss_bytes`` is the peak during the block (the loaded model included) and
    ``edit_rss_bytes`` what the block added on top of what was resident before. Elsewhere the
    peak is the process's since it started (``peak_rss_scope: process``).
    """
    trim_memory()
    scope = "edit"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        scope = "process"
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    try:
        yield
    finally:
        cost["edit_seconds"] = round(time.perf_counter() - started, 2)
        peak = _status_kb("VmHWM") if scope == "edit" else None
        if peak is None:
            scope = "process"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        cost["peak_rss_bytes"] = peak * 1024
        cost["edit_rss_bytes"] = (peak - before) * 1024 if before is not None and scope == "edit" else None
        cost["peak_rss_scope"] = scope
