"""What else this machine is running, without importing torch: the command-line tools choose OpenMP's wait
policy from it before torch loads libgomp (scripts/_common.py), and quant4.ops warns from it when its threads
and other runnable tasks oversubscribe the CPUs."""
from __future__ import annotations

from typing import Optional


def runnable_elsewhere(threads: int, read=None) -> Optional[int]:
    """How many runnable tasks this process's `threads` do not account for, from /proc/loadavg's running count
    (the fewest of three reads, 1 ms apart: an instant's blip is not a neighbour); None where it cannot tell."""
    import time

    def proc_loadavg():
        with open("/proc/loadavg") as f:
            return f.read()

    read = read or proc_loadavg
    counts = []
    for i in range(3):
        try:
            counts.append(int(read().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return None
        if i < 2:
            time.sleep(0.001)
    return max(0, min(counts) - threads)
