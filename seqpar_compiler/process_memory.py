"""This process's memory, as the benchmarks and the demo measure it (docs/architecture.md).

"Activation memory" = peak RSS during a step minus RSS before it. Linux keeps the peak (VmHWM)
and lets a process reset it by writing 5 to /proc/self/clear_refs; elsewhere the readings are 0
and the reset reports False, so callers can say the figure is unavailable instead of wrong.
"""
from __future__ import annotations

import ctypes

__all__ = ["status_kib", "reset_peak_rss", "trim_malloc"]


def status_kib(field: str) -> int:
    """A KiB figure of /proc/self/status (``VmRSS``: now, ``VmHWM``: peak since the last reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_malloc() -> None:
    """Give freed heap back to the OS, so the next peak is measured from what is really in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
