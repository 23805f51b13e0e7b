"""Bits shared by the scripts: repo on sys.path, threads, memory readings, layer selection arguments."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


TOKENIZER_FILES = ("a SentencePiece .model, a tokenizer.json, or a directory with one (default: the one the "
                   "checkpoint carries or has beside it)")


def add_checkpoint_args(ap, checkpoint_help="checkpoint (default: the embedded model)",
                        tokenizer_help="tokenizer: " + TOKENIZER_FILES):
    """--checkpoint (one; any kind load_model reads) and --tokenizer."""
    ap.add_argument("--checkpoint", default=None, help=checkpoint_help)
    ap.add_argument("--tokenizer", default=None, help=tokenizer_help)


def add_thread_arg(ap):
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch and quant4's kernels (default: torch's default)")


DTYPES = ("fp32", "bf16")


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def add_activation_args(ap):
    """--dtype (the model's compute dtype) and --activation (what the int4 layers do with their inputs)."""
    from quant4.options import ACTIVATIONS

    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                    help="the model's dtype: norms, embeddings, KV cache, activations; int4 layers keep their "
                         "format (default: %(default)s)")
    ap.add_argument("--activation", default="auto", choices=("auto",) + ACTIVATIONS,
                    help="int4 layers' inputs: float (exact: as given), bf16 (fp32 inputs rounded to bf16: the "
                         "bf16 kernels), int8 (rounded to int8 per 32 inputs in decode, as llama.cpp does: "
                         "AVX512-VNNI or AVX2 kernels), auto (int8 where this CPU has the kernel, else float) "
                         "(default: %(default)s)")


def resolve_activation(name: str) -> str:
    """The tools' --activation: "auto" is int8 where this CPU has an int8 decode kernel (1.5-2.5x the exact
    kernel per layer; its accuracy cost is in docs/quality.md), else float."""
    from quant4 import ops

    if name == "auto":
        return "int8" if ops.int8_kernel_available() else "float"
    return name


def apply_activation(model, args) -> None:
    import quant4

    quant4.set_activation_(model, resolve_activation(args.activation))
    if args.dtype != "fp32":
        model.to(torch_dtype(args.dtype))


def default_wait_policy(threads=None, read=None) -> None:
    """OpenMP's wait policy unless the user chose one (OMP_WAIT_POLICY or GOMP_SPINCOUNT set), before torch loads
    libgomp: libgomp's default (threads spin a while between parallel loops) when the CPUs are free at start,
    OMP_WAIT_POLICY=PASSIVE when other runnable tasks would share them with our `threads` (default: one per CPU)
    or when that cannot be told (no /proc/loadavg). On the 2-core test VM, decode of the 135M-shaped model
    through generate.py (lean path, about 120 parallel loops per token): idle, spinning 170-192 tok/s against
    passive 86-88; beside one CPU-bound process, passive 95-98 against spinning 51-57 (and 20-44 with short
    spins, GOMP_SPINCOUNT 3000-30000). A neighbour that starts later is not seen here: generate and chat warn
    once when they find the CPUs oversubscribed (quant4.ops.warn_if_oversubscribed)."""
    import os

    from quant4.machine import runnable_elsewhere

    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    cpus = os.cpu_count() or 1
    others = runnable_elsewhere(1, read)         # this process, one thread before torch loads, is one task
    if others is None or others + (threads or cpus) > cpus:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def apply_threads(n, wait_policy: bool = True):
    """--threads, and (wait_policy) the OpenMP wait policy of default_wait_policy: call before importing torch."""
    if wait_policy:
        default_wait_policy(n)
    if n is None:
        return
    import quant4

    try:
        quant4.set_num_threads(n)
    except ValueError as exc:
        raise SystemExit(f"error: --threads: {exc}") from None
    import torch

    torch.set_num_threads(n)


def advice(exc: BaseException) -> str:
    """A library error as one line for a script's user: the library speaks of keywords (tokenizer=,
    overwrite=True, option="layout"); the scripts name their flags."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, FileExistsError):
        return msg.replace("pass overwrite=True", "pass --force")
    if isinstance(exc, FileNotFoundError) and "give load_model(tokenizer=PATH)" in msg:
        return msg.replace("give load_model(tokenizer=PATH)", "pass --tokenizer path/to/tokenizer.model")
    option = getattr(exc, "option", None)
    if option:
        return f"{msg}; pass --{option.replace('_', '-')}"
    return msg


def run_main(main):
    """Run a script's main(): expected failures (bad files, bad arguments, I/O errors, an impossible request)
    end in one line on stderr and exit status 1, Ctrl-C in status 130; never a traceback."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, RuntimeError, MemoryError) as exc:
        # RuntimeError includes NotImplementedError and torch's own errors (e.g. allocation failures)
        print(f"error: {advice(exc)}", file=sys.stderr)
        sys.exit(1)


METHOD_HELP = {"rtn": "min/max scale and zero", "search": "a per-group clipping search",
               "refit": "the search, then least-squares refits of scale and zero",
               "gptq": "GPTQ on calibration text, group scales by the search",
               "gptq-refine": "GPTQ with two rounds of scale/zero refits",
               "tune": "block-wise tuning of rounding, scales and zeros on calibration text (signed gradient)",
               "awq-tune": "activation-aware channel scales, then block-wise tuning",
               "awq-gptq": "activation-aware channel scales (folded into the float norms and wv/w3), then GPTQ",
               "awq-gptq-refine": "the same, then GPTQ with two rounds of refits"}


def add_layer_args(ap, methods=None, sweep=False):
    """--group-size, --method (one each, or lists where a script sweeps), --include, --exclude."""
    from quant4.options import DEFAULT_METHOD, GROUP_SIZES, MODEL_METHODS

    methods = tuple(methods or MODEL_METHODS)
    many = {"nargs": "+"} if sweep else {}
    ap.add_argument("--group-size", type=int, default=[32, 64, 128] if sweep else 32, choices=GROUP_SIZES,
                    metavar="G", help=f"inputs per scale and zero, one of {', '.join(map(str, GROUP_SIZES))}"
                                      f"{' (several: one row each)' if sweep else ''} (default: %(default)s)",
                    **many)
    ap.add_argument("--method", default=[DEFAULT_METHOD] if sweep else DEFAULT_METHOD, choices=methods, metavar="M",
                    help="; ".join(f"{m}: {METHOD_HELP[m]}" for m in methods) + " (default: %(default)s)",
                    **many)
    ap.add_argument("--include", nargs="*", default=[], metavar="NAME",
                    help="also quantize these nn.Linear layers (attribute or full name), e.g. output")
    ap.add_argument("--exclude", nargs="*", default=[], metavar="NAME",
                    help="keep these projections in float (attribute or full name), e.g. w2")


def add_calibration_args(ap, gptq_options: bool = True):
    """--calibration, --calib-sequences, --calib-len; gptq_options: also --gptq-refine and --awq (eval.py names
    those variants as methods instead)."""
    ap.add_argument("--calibration", default=None, metavar="TEXT",
                    help="GPTQ: calibration text file (default: ../shared/data/tinystories_train.txt)")
    ap.add_argument("--calib-sequences", type=int, default=256,
                    help="GPTQ: calibration windows (default: %(default)s)")
    ap.add_argument("--calib-len", type=int, default=256,
                    help="GPTQ: tokens per calibration window (default: %(default)s)")
    if not gptq_options:
        return
    ap.add_argument("--gptq-refine", type=int, default=0, metavar="N",
                    help="GPTQ: rounds of least-squares scale/zero refits (2 measured best; 5-10x the time)")
    ap.add_argument("--awq", action="store_true",
                    help="GPTQ / tune: activation-aware input-channel scales first (quant4.awq; quant4's Llama "
                         "blocks)")


def refuse_unused_layer_args(args, used: bool, why: str) -> None:
    """--group-size / --method / --include / --exclude given where nothing is quantized: an error, not ignored."""
    from quant4.options import DEFAULT_METHOD

    given = [f for f, v, default in (("--group-size", args.group_size, 32), ("--method", args.method, DEFAULT_METHOD),
                                     ("--include", args.include, []), ("--exclude", args.exclude, []))
             if v != default]
    if given and not used:
        raise SystemExit(f"error: {', '.join(given)} only apply {why}")


def calibration_tokens(args, tok, max_seq_len: int, vocab_size: int):
    """The calibration windows the --calibration arguments ask for (token ids [n, len])."""
    from quant4.models.calibration import DATA_DIR, TRAIN_FILE, calibration_windows, read_stories

    path = Path(args.calibration) if args.calibration else DATA_DIR / TRAIN_FILE
    if not path.is_file():
        raise SystemExit(f"error: calibration text {path} not found; pass --calibration FILE")
    if tok.vocab_size > vocab_size:
        raise SystemExit(f"error: the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size}: "
                         f"it is not this model's tokenizer (pass the right one with --tokenizer)")
    try:
        return calibration_windows(tok, read_stories(path), args.calib_sequences, min(args.calib_len, max_seq_len))
    except ValueError as exc:
        raise SystemExit(f"calibration: {exc}")


def load_or_exit(path, **kw):
    """quant4.models.load.load_model, with a damaged or missing checkpoint reported as a one-line exit message."""
    from quant4.models.load import load_model

    report = kw.pop("report", [])
    try:
        loaded = load_model(path, report=report, **kw)
    except (ValueError, OSError) as exc:     # CheckpointError / FormatError are ValueErrors
        raise SystemExit(f"error: {advice(exc)}")
    for line in report:                       # what the reader converted or kept, e.g. float layers in a GGUF
        if "float" in line or "re-quantized" in line:
            print(f"note: {line}", file=sys.stderr)
    return loaded


def tokenizer_or_exit(loaded):
    from quant4.models.load import load_tokenizer

    try:
        return load_tokenizer(loaded)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"error: {advice(exc)}")
