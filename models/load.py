"""Load any supported checkpoint into a Transformer (float or int4) without a second float copy.

Kinds, detected from the path:
  directory with config.json      Hugging Face Llama (safetensors)
  *.bin                           llama2.c (legacy, v1 fp32, v2 int8)
  *.pt / *.pth                    PyTorch state dict in Meta / llama2.c names (torch.load(weights_only=True,
                                  mmap=True)); model args embedded ("model_args"/"params"/"config"), or in
                                  <name>.params.json or params.json beside the file. Int4 state dicts of
                                  other tools (gpt-fast, torchchat, torchao) load as int4 (models/torch_int4.py),
                                  the same policy as GGUF Q4_0/Q4_1
  *.gguf                          llama.cpp GGUF, architecture llama (models/gguf.py): Q4_0/Q4_1 kept int4
  *.safetensors                   quant4 quantized file (quant4.serialization) or quant4 float file
                                  (metadata "format": "quant4-float", as shipped for the embedded model)
The model is built on the meta device and the checkpoint's tensors are assigned into it (assign=True), so
peak memory stays near the checkpoint's size.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .llama import ModelArgs, Transformer
from .tokenizer import Tokenizer, TokenizerSource, check_settings, open_tokenizer
from quant4.memory import release_freed_memory

class CheckpointError(ValueError):
    """A checkpoint file is malformed; the message names the file and what is wrong. Every reader raises it.
    `option`: the load_model keyword that would resolve it (e.g. "layout"), if any; front ends translate it."""

    def __init__(self, message: str, option: Optional[str] = None):
        super().__init__(message)
        self.option = option


EMBEDDED_DIR = Path(__file__).resolve().parent / "tiny"
EMBEDDED_MODEL = EMBEDDED_DIR / "model.safetensors"


@dataclass
class Loaded:
    model: Transformer
    args: ModelArgs
    kind: str
    path: Path
    tokenizer: Optional[TokenizerSource] = None      # carried inside the checkpoint, found beside it, or given
    quantized: dict = field(default_factory=dict)   # layer name -> {in_features, out_features, group_size}
    generation: dict = field(default_factory=dict)  # e.g. sampling defaults from generation_config.json


# ------------------------------------------------------------------------------------------------
# readers that produce (ModelArgs, float state_dict)

def strip_prefixes(sd: dict) -> dict:
    """State-dict names without the wrappers' prefixes (torch.compile's _orig_mod., DDP's module., a
    `model.` before the Meta names)."""
    out = {}
    for k, v in sd.items():
        if isinstance(k, str):
            k = re.sub(r"^(_orig_mod\.|module\.)+", "", k)
            k = re.sub(r"^model\.(?=(layers|tok_embeddings|norm|output)\b)", "", k)
        out[k] = v
    return out


def _read_params(source: Path):
    try:
        return json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: cannot read model parameters ({exc})") from None


def read_torch_state(path, params_file=None) -> tuple[dict, dict]:
    """A .pt/.pth checkpoint -> (tensors by stripped name, model hyperparameters). Loaded weights-only and
    memory-mapped. Hyperparameters: params_file if given, else embedded ("model_args" / "params" / "config"
    beside "model"), else <name>.params.json beside the file, else params.json there; {} if none."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types; report them uniformly
        raise CheckpointError(f"{path}: cannot load as a weights-only PyTorch checkpoint ({exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    params = {}
    if isinstance(obj.get("model"), dict):
        params = obj.get("model_args") or obj.get("params") or obj.get("config") or {}
        obj = obj["model"]
    if params_file:
        params = _read_params(Path(params_file))
    elif not params:
        for side in (path.with_suffix(".params.json"), path.parent / "params.json"):
            if side.is_file():
                params = _read_params(side)
                break
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: model parameters are a {type(params).__name__}, not an object")
    sd = {k: v for k, v in strip_prefixes(obj).items() if isinstance(v, torch.Tensor)}
    for k in ("freqs_cis", "freqs_cos", "freqs_sin"):
        sd.pop(k, None)
    return sd, params


def check_params(params: dict, path, **actual) -> None:
    """Hyperparameters from a params file or the checkpoint must agree with the tensors they come with: a
    params.json of another model would otherwise run these weights with the wrong heads and give garbage."""
    for key, value in actual.items():
        given = params.get(key)
        if given is not None and given != -1 and given != value:
            raise CheckpointError(f"{path}: its model parameters say {key}={given!r} but the tensors have {value}: "
                                  f"they belong to another model (check the params file beside it)",
                                  option="params")


def _infer_args(sd: dict, params: dict, path) -> ModelArgs:
    try:
        emb = sd["tok_embeddings.weight"]
        n_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
        n_heads = int(params.get("n_heads") or 0)
        if n_heads <= 0:
            raise CheckpointError(f"{path}: n_heads unknown (no params.json or embedded model args)")
        head_dim = emb.shape[1] // n_heads
        n_kv = params.get("n_kv_heads") or sd["layers.0.attention.wk.weight"].shape[0] // head_dim
        check_params(params, path, dim=emb.shape[1], n_layers=n_layers, vocab_size=emb.shape[0],
                     n_kv_heads=sd["layers.0.attention.wk.weight"].shape[0] // head_dim)
        return ModelArgs(dim=emb.shape[1], n_layers=n_layers, n_heads=n_heads, n_kv_heads=int(n_kv),
                         vocab_size=emb.shape[0], hidden_dim=hidden, norm_eps=float(params.get("norm_eps", 1e-5)),
                         rope_theta=float(params.get("rope_theta", 10000.0)),
                         max_seq_len=int(params.get("max_seq_len", 2048)),
                         tie_embeddings="output.weight" not in sd)
    except (KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a Llama state dict in Meta names, or bad model args ({exc})") from None


def read_float_safetensors(path) -> tuple[ModelArgs, dict]:
    from safetensors.torch import load_file

    from quant4.serialization import read_header

    meta = read_header(path)
    if meta.get("format") != "quant4-float":
        raise CheckpointError(f"{path}: safetensors file is neither a quant4 quantized nor a quant4 float model")
    try:
        args = ModelArgs.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad model config in metadata ({exc})") from None
    return args, load_file(str(path))


# ------------------------------------------------------------------------------------------------

def check_layer_count(args: ModelArgs, names, path="the checkpoint") -> None:
    """The tensors must confirm the layer count a header claims before a model of that many layers is built
    (even on the meta device each layer costs Python objects; ModelArgs caps the count at 1024): a clear error
    naming both counts instead of load_state_dict's list of missing keys."""
    found = {int(p[1]) for p in (n.split(".") for n in names) if p[0] == "layers" and len(p) > 1 and p[1].isdigit()}
    if found != set(range(args.n_layers)):
        raise CheckpointError(f"{path}: the header claims {args.n_layers} layers, the tensors hold layers "
                              f"{sorted(found)[:3]}{'...' if len(found) > 3 else ''} ({len(found)} in all)")


def build_model(args: ModelArgs, sd: dict, path, dtype: Optional[torch.dtype] = None) -> Transformer:
    """Transformer on the meta device, then the checkpoint's tensors assigned into it."""
    check_layer_count(args, sd, path)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = Transformer(args)
    if args.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "output.weight"}
        sd["output.weight"] = sd.get("tok_embeddings.weight")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit the model it describes: {exc}") from None
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope()
    return model.eval()


def tie_head(args: ModelArgs, layers: dict) -> dict:
    """The "tied" entries of a converted int4 model (quant4.serialization's meta["tied"]): none when the head is
    its own; the float head on the float embedding table; or, over a quantized table (layers "tok_embeddings" of
    kind "embedding" or "int8-embedding"), an int4 or 8-bit head layer "output" added to `layers` whose tensors
    are the table's."""
    if not args.tie_embeddings:
        return {}
    emb = layers.get("tok_embeddings")
    if emb is None:
        return {"output.weight": "tok_embeddings.weight"}
    layers["output"] = {k: v for k, v in emb.items() if k != "kind"}
    if emb.get("kind") == "int8-embedding":
        layers["output"]["kind"] = "int8"
        return {f"output.{k}": f"tok_embeddings.{k}" for k in ("codes", "scales")}
    return {f"output.{k}": f"tok_embeddings.{k}" for k in ("qweight", "scales", "zeros")}


def build_quantized(args: ModelArgs, meta: dict, tensors: dict, *, num_threads: Optional[int] = None) -> Transformer:
    """Transformer from quant4-format tensors: meta["layers"] (int4 layers) and meta["tied"] as in a quant4 file."""
    from quant4.serialization import load_quantized_

    check_layer_count(args, tensors)
    with torch.device("meta"):
        model = Transformer(args)
    try:
        load_quantized_(model, meta, tensors, num_threads=num_threads)
    except RuntimeError as exc:       # load_state_dict's size mismatches
        raise CheckpointError(f"tensors do not fit the model they describe: {exc}") from None
    if args.tie_embeddings and type(model.output) is nn.Linear and type(model.tok_embeddings) is nn.Embedding:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope()
    return model.eval()


def _detect(path: Path) -> str:
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf"
        raise CheckpointError(f"{path}: directory without config.json")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".bin":
        return "llama2c"
    if suffix in (".pt", ".pth"):
        return "torch"
    if suffix == ".gguf":
        return "gguf"
    if suffix == ".safetensors":
        from quant4.serialization import read_header

        return "quant4" if "quant4" in read_header(path) else "float-safetensors"
    raise CheckpointError(f"{path}: unknown checkpoint kind (expected a directory, .bin, .pt/.pth, .gguf or .safetensors)")


def load_model(path=None, *, tokenizer=None, dtype: Optional[torch.dtype] = None,
               num_threads: Optional[int] = None, layout: Optional[str] = None, params=None,
               report: Optional[list] = None) -> Loaded:
    """Load a checkpoint (default: the embedded model) -> Loaded(model, args, kind, path, tokenizer, ...).

    Int4 checkpoints of other tools load as int4 like GGUF Q4_0/Q4_1: gpt-fast / torchchat / torchao .pth
    (kind "torch-int4"; `layout` names their packed layout when the bytes cannot tell, `params` is a
    params.json giving n_heads when the file does not). What was detected or converted is appended to `report`.
    """
    path = Path(path) if path is not None else EMBEDDED_MODEL
    kind = _detect(path)
    quantized = {}
    tok = None            # TokenizerSource from the checkpoint
    tok_guess = None      # else a tokenizer file that may sit beside it
    sd = None
    if kind == "torch":
        sd, torch_params = read_torch_state(path, params)
        from .torch_int4 import convert_torch_int4, is_int4_state_dict

        if is_int4_state_dict(sd):
            kind = "torch-int4"
            args, layers, tensors = convert_torch_int4(sd, torch_params, path, layout=layout, report=report)
            tied = tie_head(args, layers)
            model = build_quantized(args, {"layers": layers, "tied": tied}, tensors, num_threads=num_threads)
            quantized = layers
            tok_guess = _tokenizer_beside(path)
        else:
            args = _infer_args(sd, torch_params, path)
    if kind == "gguf":
        from .gguf import read_gguf

        args, layers, tensors, tok = read_gguf(path, report=report)
        tied = tie_head(args, layers)
        model = build_quantized(args, {"layers": layers, "tied": tied}, tensors, num_threads=num_threads)
        quantized = layers
        tok_guess = _tokenizer_beside(path) if tok is None else None
    elif kind == "torch-int4":
        pass
    elif kind == "hf" and _is_hf_int4(path):
        from .hf import read_hf_int4

        kind = "hf-int4"
        args, layers, tensors = read_hf_int4(path, report=report)
        tied = tie_head(args, layers)
        model = build_quantized(args, {"layers": layers, "tied": tied}, tensors, num_threads=num_threads)
        quantized = layers
        tok_guess = path if any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")) else None
    elif kind == "quant4":
        from quant4.serialization import FormatError, read_quantized, read_tokenizer

        meta, tensors = read_quantized(path)
        info = meta["model"]
        if info.get("type") != "llama":
            raise FormatError(f"{path}: model type {info.get('type')!r} is not 'llama'")
        try:
            args = ModelArgs.from_dict(info["config"])
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(f"{path}: bad model config ({exc})") from None
        model = build_quantized(args, meta, tensors, num_threads=num_threads)
        quantized = meta["layers"]
        carried = read_tokenizer(path)          # carried inside (files since the keys existed)
        if carried is not None:
            tok = _carried(carried, path)
        elif meta.get("tokenizer"):
            tok_guess = path.parent / meta["tokenizer"]
    else:
        if kind == "hf":
            from .hf import read_hf

            args, sd = read_hf(path, report=report)
            tok_guess = path if any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")) else None
        elif kind == "llama2c":
            from .llama2c import read_llama2c

            args, sd = read_llama2c(path)
            tok_guess = _tokenizer_beside(path)
        elif kind == "torch":
            tok_guess = _tokenizer_beside(path)
        else:
            args, sd = read_float_safetensors(path)
            tok_guess = _tokenizer_beside(path)
        model = build_model(args, sd, path, dtype)
    if tokenizer is not None:
        tok = open_tokenizer(tokenizer)
    elif tok is None and tok_guess is not None and tok_guess.exists():
        tok = open_tokenizer(tok_guess)
    generation = _generation_config(path) if kind in ("hf", "hf-int4") else {}
    model.relayout_head_()
    release_freed_memory()
    return Loaded(model, args, kind, path, tok, quantized, generation)


def _is_hf_int4(path: Path) -> bool:
    """A Hugging Face directory whose config.json says quant4 quantized it (other tools' are refused by
    read_hf_int4 / read_hf with their name)."""
    from .hf import int4_config, read_config

    return int4_config(read_config(path), path) is not None


def _carried(carried: tuple, path) -> TokenizerSource:
    from quant4.serialization import FormatError

    kind, data, settings = carried
    try:
        settings = check_settings(settings, path)
    except ValueError as exc:
        raise FormatError(str(exc)) from None
    return TokenizerSource(kind, data, f"{path} (tokenizer inside)", settings)


def _generation_config(directory: Path) -> dict:
    """Sampling defaults of a Hugging Face directory (generation_config.json): temperature, top_k, top_p when
    do_sample is true; {} otherwise."""
    f = directory / "generation_config.json"
    try:
        cfg = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{f}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or not cfg.get("do_sample"):
        return {}
    out = {}
    for key, lo, hi in (("temperature", 0.0, 100.0), ("top_p", 0.0, 1.0), ("top_k", 1, 1 << 20)):
        v = cfg.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi:
            out[key] = v
    return out


def _tokenizer_beside(path: Path) -> Optional[Path]:
    """tokenizer.model next to the checkpoint, else the directory's only *.model file (e.g. tok512.model)."""
    if (path.parent / "tokenizer.model").is_file():
        return path.parent / "tokenizer.model"
    found = sorted(path.parent.glob("*.model"))
    return found[0] if len(found) == 1 else None


def load_tokenizer(loaded: Loaded) -> Tokenizer:
    if loaded.tokenizer is None:
        raise FileNotFoundError(f"no tokenizer found for {loaded.path}; give load_model(tokenizer=PATH)")
    return loaded.tokenizer.build()
