"""Bits shared by the scripts: repo on sys.path, threads, memory readings, layer selection arguments."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_thread_arg(ap):
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch and quant4's kernels (default: torch's default)")


def apply_threads(n):
    import quant4

    if n is not None:
        if n < 1:
            raise SystemExit(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)
        quant4.set_num_threads(n)


def add_layer_args(ap):
    ap.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128, 256))
    ap.add_argument("--method", default="rtn", choices=("rtn", "search"),
                    help="scale/zero choice: min/max (rtn) or a per-group clipping search (search)")
    ap.add_argument("--include", nargs="*", default=[], metavar="NAME",
                    help="also quantize these nn.Linear layers (attribute or full name), e.g. output")
    ap.add_argument("--exclude", nargs="*", default=[], metavar="NAME",
                    help="keep these projections in float (attribute or full name), e.g. w2")
