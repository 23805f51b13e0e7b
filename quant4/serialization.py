"""quant4's quantized-model file: one safetensors file (no pickle) with JSON metadata in its header.

Tensors: the model's state_dict without Int4Linear extra state, so each quantized layer <name> contributes
<name>.qweight (uint8 [N, Kp/2]), <name>.scales and <name>.zeros (float16 [N, G]) and <name>.bias if any,
in the stored format of quant4.scheme. A layer of kind "int8" (an output head a file held in another quantized
type; quant4.int8_linear.Int8Linear) holds <name>.codes (uint8 [N, K], w / scale + 128) and <name>.scales
(float32 [N, K/32]) instead, and no group_size; kind "int8-embedding" is a token table in those tensors
(quant4.embedding.Int8Embedding). A layer of kind "embedding" is a token-embedding table in the same
tensors (quant4.embedding.Int4Embedding, rows = tokens; readers without the kind refuse it: the model's
embedding has no in/out features to match). Tensors that alias another (tied embeddings) are stored once.
Header metadata key "quant4" holds JSON:
    {"format": "quant4", "format_version": 1,
     "layers": {"<name>": {"in_features": K, "out_features": N, "group_size": g[, "kind": "embedding" | "int8" | "int8-embedding"]}, ...},
     "tied": {"<name>": "<name it aliases>"},
     "model": {...},            free-form description of the architecture (e.g. type and config)
     "tokenizer": "<path relative to the file>" or null}       (files written before the key below)
The model's tokenizer rides in the header too, so that the file stands alone (moved or copied, it still carries
what is needed to use it), under one of (optional; the same keys in quant4's GGUF files):
    "quant4.tokenizer.sentencepiece"   a SentencePiece model, base64
    "quant4.tokenizer.json"            a Hugging Face tokenizer.json, as text
and "quant4.tokenizer.settings": JSON {"bos_id", "eos_ids", "add_bos", "chat_template"} (any may be absent).
Readers refuse other formats and versions, and layers whose tensors disagree with the metadata.
Writes are atomic: a temporary file in the same directory, fsync, rename.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from quant4 import memory, ops
from quant4.embedding import Int4Embedding, Int8Embedding
from quant4.int8_linear import Int8Linear, check_codes
from quant4.nn import Int4Linear
from quant4.scheme import FORMAT_VERSION

FILE_FORMAT = "quant4"
LAYER_KINDS = ("linear", "embedding", "int8", "int8-embedding")
EMBEDDING_KINDS = ("embedding", "int8-embedding")
INT8_KINDS = ("int8", "int8-embedding")
TOKENIZER_KEY = "quant4.tokenizer.sentencepiece"    # the same keys in quant4's GGUF files
TOKENIZER_JSON_KEY = "quant4.tokenizer.json"
TOKENIZER_SETTINGS_KEY = "quant4.tokenizer.settings"


def tokenizer_header(kind: str, data: bytes, settings: dict) -> dict:
    """The header entries (strings) that carry a tokenizer: kind "sentencepiece" or "hf" (tokenizer.json)."""
    out = {TOKENIZER_SETTINGS_KEY: json.dumps({k: v for k, v in settings.items() if v is not None})}
    if kind == "sentencepiece":
        out[TOKENIZER_KEY] = encode_tokenizer(data)
    elif kind == "hf":
        out[TOKENIZER_JSON_KEY] = data.decode("utf-8")
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    return out


def tokenizer_from_header(get) -> Optional[tuple]:
    """(kind, data, settings) from header entries (get(key) -> str or None), or None if there is none.
    ValueError names the key that is malformed."""
    raw_settings = get(TOKENIZER_SETTINGS_KEY)
    settings = {}
    if raw_settings is not None:
        try:
            settings = json.loads(raw_settings)
        except (TypeError, json.JSONDecodeError):
            raise ValueError(f"{TOKENIZER_SETTINGS_KEY} is not JSON") from None
        if not isinstance(settings, dict):
            raise ValueError(f"{TOKENIZER_SETTINGS_KEY} is not a JSON object")
    sp = get(TOKENIZER_KEY)
    if sp:
        return "sentencepiece", decode_tokenizer(sp), settings
    hf = get(TOKENIZER_JSON_KEY)
    if hf:
        if not isinstance(hf, str):
            raise ValueError(f"{TOKENIZER_JSON_KEY} is not a string")
        return "hf", hf.encode("utf-8"), settings
    return None


def encode_tokenizer(data: bytes) -> str:
    """A tokenizer model's bytes as the string stored under TOKENIZER_KEY (base64)."""
    import base64

    return base64.b64encode(data).decode("ascii")


def decode_tokenizer(raw) -> bytes:
    """The inverse of encode_tokenizer; ValueError if `raw` is not a base64 string."""
    import base64
    import binascii

    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError(f"{TOKENIZER_KEY} is not a base64 string") from None
MAX_HEADER_BYTES = 100 * 1024 * 1024  # a safetensors JSON header larger than this is refused
_TRIM_EVERY = 256 << 20              # load_quantized_ returns freed originals to the OS after this many bytes


class FormatError(ValueError):
    """A quant4 file is malformed or of an unknown version; the message names the file and the problem."""


def atomic_write(path, write_fn, *, overwrite: bool = False) -> Path:
    """Call write_fn(tmp_path) and move the result to `path` atomically.

    Refuses to replace an existing file unless overwrite=True. On any failure the temporary file is removed
    and an existing `path` is left untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp made it 0600: give it the mode a new file would get
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_clobber(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask sets it for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _rename_no_clobber(tmp: str, path: Path) -> None:
    """Move tmp to path, failing if path exists by then (another writer won the race): a hard link is created
    atomically or not at all. File systems without hard links fall back to a check and a rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} was created by someone else meanwhile; pass overwrite=True "
                              f"to replace it") from None
    except OSError:
        if path.exists():
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def quantized_tensors(model: nn.Module):
    """(tensors, layers, tied) for save_quantized: plain contiguous CPU tensors, aliases recorded once."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, (Int4Linear, Int4Embedding)):
            layers[name] = {"in_features": m.in_features, "out_features": m.out_features, "group_size": m.group_size}
            if isinstance(m, Int4Embedding):
                layers[name]["kind"] = "embedding"
        elif isinstance(m, (Int8Linear, Int8Embedding)):
            layers[name] = {"in_features": m.in_features, "out_features": m.out_features,
                            "kind": "int8" if isinstance(m, Int8Linear) else "int8-embedding"}
    tensors, tied, seen = {}, {}, {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key.endswith("_extra_state"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {key} is a {type(t).__name__}, not a tensor")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous()
    return tensors, layers, tied


def save_quantized(model: nn.Module, path, *, model_info: dict, tokenizer: Optional[str] = None,
                   tokenizer_bytes: Optional[bytes] = None, tokenizer_source=None, overwrite: bool = False) -> Path:
    """Write `model` (with Int4Linear layers) to `path` in quant4's file format. The tokenizer to carry inside
    the file: tokenizer_source (anything with .kind, .data, .settings, e.g. quant4.models.tokenizer's
    TokenizerSource), or tokenizer_bytes (a SentencePiece model); tokenizer: a path relative to the file (older
    files' way, kept for them)."""
    from safetensors.torch import save_file

    tensors, layers, tied = quantized_tensors(model)
    meta = {"format": FILE_FORMAT, "format_version": FORMAT_VERSION, "layers": layers, "tied": tied,
            "model": model_info, "tokenizer": tokenizer}
    header = {"quant4": json.dumps(meta)}
    if tokenizer_source is not None:
        header.update(tokenizer_header(tokenizer_source.kind, tokenizer_source.data, tokenizer_source.settings))
    elif tokenizer_bytes is not None:
        header[TOKENIZER_KEY] = encode_tokenizer(tokenizer_bytes)

    def write(tmp):
        from safetensors import SafetensorError

        try:
            save_file(tensors, tmp, metadata=header)
        except SafetensorError as exc:     # the writer's I/O errors (disk full, file too large) as OSError
            raise OSError(f"cannot write {path}: {exc}") from None

    return atomic_write(path, write, overwrite=overwrite)


def read_safetensors_header(path) -> tuple:
    """(the JSON header of a safetensors file as a dict, the byte offset where its tensor data starts),
    validated: length inside the file and under MAX_HEADER_BYTES, valid JSON, an object."""
    import struct

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path}: too short for a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise FormatError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n


def read_header(path) -> dict:
    """The safetensors header metadata of `path` (validated to be quant4-readable safetensors)."""
    header, _ = read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: safetensors __metadata__ is not an object")
    return meta


def read_tokenizer(path) -> Optional[tuple]:
    """The tokenizer a quant4 file carries as (kind, data, settings), or None."""
    header = read_header(path)
    try:
        return tokenizer_from_header(header.get)
    except ValueError as exc:
        raise FormatError(f"{path}: {exc}") from None


def read_quantized(path) -> tuple[dict, dict]:
    """Read and validate a quant4 file -> (metadata, tensors). Tensors are loaded from a memory map."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    raw = read_header(path).get("quant4")
    if raw is None:
        raise FormatError(f"{path}: not a quant4 file (no 'quant4' metadata in the safetensors header)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: quant4 metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
        raise FormatError(f"{path}: quant4 metadata has format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{path}: unknown quant4 format_version {meta.get('format_version')!r} "
                          f"(this quant4 reads {FORMAT_VERSION})")
    for key, typ in (("layers", dict), ("tied", dict), ("model", dict)):
        if not isinstance(meta.get(key), typ):
            raise FormatError(f"{path}: quant4 metadata field {key!r} is missing or not a {typ.__name__}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise FormatError(f"{path}: cannot read tensors ({exc})") from None
    for key, target in meta["tied"].items():
        if not isinstance(target, str) or target not in tensors:
            raise FormatError(f"{path}: tied tensor {key!r} points at missing {target!r}")
    for name, info in meta["layers"].items():
        if not isinstance(info, dict):
            raise FormatError(f"{path}: layer {name!r} metadata is not an object")
        if info.get("kind", "linear") not in LAYER_KINDS:
            raise FormatError(f"{path}: layer {name!r} has kind {info.get('kind')!r} (this quant4 reads "
                              f"{', '.join(LAYER_KINDS)})")
        held = {k: tensors.get(f"{name}.{k}", tensors.get(meta["tied"].get(f"{name}.{k}")))
                for k in layer_tensors(info)}
        for k, t in held.items():
            if t is None:
                raise FormatError(f"{path}: layer {name!r} has no tensor {name}.{k}")
        try:
            if info.get("kind") in INT8_KINDS:
                check_codes(held["codes"], held["scales"])
                N, K = held["codes"].shape
                if K != info.get("in_features"):
                    raise ValueError(f"in_features={info.get('in_features')!r} but codes have {K} columns")
            else:
                N, _, _ = ops.check_packed(held["qweight"], held["scales"], held["zeros"], info.get("group_size"),
                                           ops.check_int("in_features", info.get("in_features")))
        except (ValueError, TypeError) as exc:
            raise FormatError(f"{path}: layer {name!r}: {exc}") from None
        if N != info.get("out_features"):
            raise FormatError(f"{path}: layer {name!r}: out_features={info.get('out_features')!r} but qweight has {N} rows")
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FormatError(f"{path}: tensor {key!r} has non-finite values (NaN/Inf); the file is damaged")
    if not isinstance(meta.get("tokenizer"), (str, type(None))):
        raise FormatError(f"{path}: quant4 metadata field 'tokenizer' must be a relative path or null, "
                          f"got {meta['tokenizer']!r}")
    return meta, tensors


def layer_tensors(info: dict) -> tuple:
    """The tensor names (after "<layer>.") a layer of this metadata holds, bias aside."""
    return ("codes", "scales") if info.get("kind") in INT8_KINDS else ("qweight", "scales", "zeros")


def load_quantized_(model: nn.Module, meta: dict, tensors: dict, *, num_threads: Optional[int] = None) -> nn.Module:
    """Put the file's tensors into `model` (which may live on the meta device), in place.

    Layers listed in meta["layers"] become Int4Linear modules wrapping the stored tensors (no float copy);
    every other parameter and buffer is assigned from the file. Missing or unexpected tensors raise.
    """
    taken = set()
    copied = 0            # bytes copied by from_packed since the last trim
    tied = meta["tied"]
    # layers whose tensors alias another's (a tied head over an int4 embedding) come after the one they alias,
    # and take its tensors as that one's module holds them: one copy, shared
    order = sorted(meta["layers"].items(), key=lambda item: any(f"{item[0]}.{k}" in tied for k in layer_tensors(item[1])))
    for name, info in order:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"quantized layer {name!r} does not exist in the model") from None
        embedding = info.get("kind", "linear") in EMBEDDING_KINDS
        if embedding:
            want = (getattr(old, "num_embeddings", None), getattr(old, "embedding_dim", None))
        else:
            want = (getattr(old, "out_features", None), getattr(old, "in_features", None))
        if want != (info.get("out_features"), info.get("in_features")):
            raise FormatError(f"quantized {'embedding' if embedding else 'layer'} {name!r} is "
                              f"[{info.get('out_features')}, {info.get('in_features')}] but the model's config "
                              f"needs [{want[0]}, {want[1]}]")
        parts = layer_tensors(info)
        keys = [f"{name}.{k}" for k in parts + ("bias",)]
        for key in keys:
            if key not in tensors and key in tied and tied[key] in tensors:
                tensors[key] = tensors[tied[key]]
        missing = [k for k in keys[:-1] if k not in tensors]
        if missing:
            raise FormatError(f"file does not match the model: missing {missing}")
        if (getattr(old, "bias", None) is not None) != (keys[-1] in tensors):
            raise FormatError(f"quantized layer {name!r}: the model's config "
                              f"{'has a bias there and the file none' if keys[-1] not in tensors else 'has no bias there but the file one'}")
        given = [tensors[k] for k in keys[:-1]]
        if info.get("kind") in INT8_KINDS and keys[-1] in tensors:
            raise FormatError(f"8-bit layer {name!r} has a bias; quant4's 8-bit layers have none")
        if info.get("kind") == "int8-embedding":
            mod = Int8Embedding.from_codes(*given)
        elif embedding:
            mod = Int4Embedding.from_packed(*given, embedding_dim=info["in_features"], group_size=info["group_size"])
        elif info.get("kind") == "int8":
            mod = Int8Linear.from_codes(*given, num_threads=num_threads)
        else:
            mod = Int4Linear.from_packed(*given, in_features=info["in_features"], group_size=info["group_size"],
                                         bias=tensors.get(keys[-1]), num_threads=num_threads)
        model.set_submodule(name, mod)
        # the module may hold copies in 2 MiB-page memory (quant4.memory): the dict then points at them, so that
        # each original is freed here, and the heap is trimmed as the loop goes (glibc keeps freed blocks in its
        # heap until trimmed: untrimmed, every original would stay resident until the end of the load)
        for key, held in zip(keys, (getattr(mod, k) for k in parts)):
            if tensors[key] is not held:
                memory.drop_file_pages(tensors[key])     # a view of the file's map keeps its pages resident
                tensors[key] = held
                copied += held.numel() * held.element_size()
        if copied >= _TRIM_EVERY:
            memory.release_freed_memory()
            copied = 0
        taken.update(k for k in keys if k in tensors)
    rest = {k: v for k, v in tensors.items() if k not in taken}
    for key, target in tied.items():
        if key not in taken:
            rest[key] = tensors[target]
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")} - taken
    missing, unexpected = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or unexpected:
        raise FormatError(f"file does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(rest, strict=False, assign=True)
    return model
