"""Peak memory of the current process, measured one way everywhere."""
from __future__ import annotations

import resource
import sys


def vm_hwm_mb() -> float | None:
    """``VmHWM`` from /proc/self/status in MB (Linux), or None where unavailable.

    It belongs to the address space, so it starts fresh at exec; ``ru_maxrss`` does not:
    Linux carries the parent's high-water mark across fork + exec, so a child of a big
    process (e.g. a Ray actor) would inherit its parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    hwm = vm_hwm_mb()
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux
