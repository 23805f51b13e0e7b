"""Int4Linear: a drop-in inference replacement for nn.Linear holding int4 weights in quant4's stored format."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.autograd import forward_ad as _fwAD

from quant4 import memory, ops
from quant4.scheme import FORMAT_VERSION, SCALE_DTYPE, padded_k


def _torch_ops():
    # imported on first compile: registering the custom ops costs about 12 ms that eager use never needs
    from quant4 import torch_ops

    return torch_ops


def _tracing(x) -> bool:
    """True while torch.compile or torch.export traces the model (fake or functional tensors; no memory to run
    the kernels on): Int4Linear then records the custom op."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or (isinstance(x, torch.Tensor) and type(x) is not torch.Tensor and not isinstance(x, nn.Parameter)))


class _Int4LinearFn(torch.autograd.Function):
    """Int4 matmul with a gradient for the input (weights are frozen): grad_x = grad_y . w_hat."""

    @staticmethod
    def forward(ctx, x2d, mod):
        ctx.mod = mod
        return ops.matmul_prepared(x2d, mod._prepared(), num_threads=mod.num_threads, activation=mod.activation)

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.mod.dequantize()
        return (grad_y.float() @ w).to(grad_y.dtype), None


def _foreign_layout(weight: torch.Tensor, sz) -> str:
    """Name the int4 layout a foreign `weight` (+ scales_and_zeros) most likely is, from shapes alone."""
    shape = tuple(weight.shape)
    if sz is None:
        return f"a plain {weight.dtype} {shape} weight (an unquantized nn.Linear?)"
    if weight.dtype == torch.int32 and weight.dim() == 4:
        return (f"torch's tinygemm int32 tile layout {shape} (gpt-fast; CUDA, or torch <= 2.5 on CPU) with "
                f"scales_and_zeros {tuple(sz.shape)}")
    if weight.dtype == torch.uint8 and weight.dim() == 2:
        return (f"uint8 {shape} from another int4 tool (torch >= 2.6 CPU packed: AVX-512/AVX2/scalar, or "
                f"torch 2.5 / torchao uint8) with scales_and_zeros {tuple(sz.shape)}")
    return f"an unknown packed {weight.dtype} {shape} tensor with scales_and_zeros {tuple(sz.shape)}"


def apply_keeping_dtypes(module: nn.Module, apply, fn, recurse):
    """nn.Module._apply (`apply`, the base class's) keeping the stored dtypes of `module`'s buffers (uint8 /
    float16 / float32) through module.to(dtype), .half(), .bfloat16(); moves between devices still apply."""
    before = dict(module._buffers)
    apply(fn, recurse)
    for name, old in before.items():
        new = module._buffers[name]
        if old is not None and new is not None and new.dtype != old.dtype and new.device == old.device:
            module._buffers[name] = old
    return module


def _refuse_transforms(x: torch.Tensor) -> None:
    """The kernels run outside PyTorch's dispatcher (on numpy views of the tensors), so the program transforms
    that work by intercepting tensor ops cannot see them; refuse those instead of returning garbage."""
    if torch.jit.is_tracing():
        raise NotImplementedError("quant4's Int4Linear cannot be recorded by torch.jit.trace (its kernels run "
                                  "outside PyTorch's dispatcher); run the module eagerly")
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        raise NotImplementedError("quant4's Int4Linear does not support torch.func transforms (vmap, grad, jvp, "
                                  "...); call it on plain tensors (reverse-mode autograd to the input works)")
    if _fwAD._current_level >= 0 and _fwAD.unpack_dual(x).tangent is not None:
        raise NotImplementedError("quant4's Int4Linear does not support forward-mode AD (dual tensors); "
                                  "reverse-mode autograd to the input works")


_LAYOUT_BUFFERS = ("qweight", "scales", "zeros")


def _stored_buffer(name: str) -> property:
    # Int4Linear's stored tensors as attributes: always in the row layout (the stored format). A module whose
    # buffers are in the slab16 layout (Int4Linear.set_slab16_) is permuted back first, so that nothing that
    # reads module.qweight / scales / zeros -- dequantize, interop, the compiled path, user code -- ever sees
    # the kernel layout.
    def get(self):
        b = self.__dict__["_buffers"]
        if name not in b:
            raise AttributeError(name)
        if self.__dict__.get("_slab16") and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            self.set_slab16_(False)     # (a traced forward passes the layout to the custom op instead)
        return b[name]
    return property(get, doc=f"the stored {name} (row layout)")


class Int4Linear(nn.Module):
    """y = x . w_hat^T + bias, with w_hat group-wise int4 (see quant4.scheme).

    Buffers (the stored format, saved by state_dict): qweight uint8 [out, Kp/2], scales and zeros
    float16 [out, Kp/group_size], bias float32 [out] when bias=True; metadata travels as extra state.
    forward accepts any leading dims, fp32/bf16/fp16 (result in the input dtype), non-contiguous input;
    gradients flow to the input (not to the frozen int4 weights).
    activation="int8" (a runtime choice, not saved) quantizes activations to int8 per 32-input block in
    decode (AVX512-VNNI or AVX2 CPUs): faster, slightly less exact; activation="bf16" rounds fp32 inputs to bfloat16
    to use the bf16 kernels (AVX512-BF16); see quant4.ops.matmul.
    The kernels read the buffers directly; module.to(dtype) leaves them in their stored dtypes.
    With activation="int8" on AVX512-VNNI CPUs, quant4.set_activation_ permutes the buffers in place into the
    int8 kernels' slab16 layout (set_slab16_: 16 rows in vector lanes, 1.2-1.6x the decode bandwidth); the
    attributes qweight / scales / zeros and state_dict still give the stored row layout.
    """

    qweight = _stored_buffer("qweight")
    scales = _stored_buffer("scales")
    zeros = _stored_buffer("zeros")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, group_size: int = 32,
                 num_threads: Optional[int] = None, activation: str = "float"):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            ops.check_int(name, v, 1, 1 << 31)
        ops.check_group_size(group_size)
        ops.check_num_threads(num_threads, allow_none=True)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.num_threads = num_threads
        self.activation = ops.check_activation(activation)
        Kp = padded_k(in_features, group_size)
        G = Kp // group_size
        # the weight streams in 2 MiB-page memory where Linux offers it (quant4.memory: fewer TLB misses per token)
        self.register_buffer("qweight", memory.zeros((out_features, Kp // 2), torch.uint8))
        self.register_buffer("scales", memory.zeros((out_features, G), SCALE_DTYPE))
        self.register_buffer("zeros", memory.zeros((out_features, G), SCALE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, *, num_threads: Optional[int] = None,
                    activation: str = "float", method: str = "rtn") -> "Int4Linear":
        """Quantize an nn.Linear; method "rtn" (round to nearest, quant4.scheme) or "search" (per-group
        clipping search minimizing the reconstruction error, see quant4.ops.quantize)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  group_size=group_size, num_threads=num_threads, activation=activation)
        qweight, scales, zeros = ops.quantize(linear.weight.detach(), group_size, num_threads=num_threads,
                                              method=method)
        mod.qweight.copy_(qweight)
        mod.scales.copy_(scales)
        mod.zeros.copy_(zeros)
        if linear.bias is not None:
            b = linear.bias.detach().float()
            if not torch.isfinite(b).all():
                raise ValueError("bias has non-finite values; quant4 refuses NaN/Inf")
            mod.bias.copy_(b)
        return mod

    @classmethod
    def from_packed(cls, qweight, scales, zeros, *, in_features: int, group_size: int, bias=None,
                    num_threads: Optional[int] = None, activation: str = "float") -> "Int4Linear":
        """Wrap tensors already in quant4's stored format (validated). Tensors of 2 MiB or more are copied once
        into 2 MiB-page memory where Linux offers it (quant4.memory); smaller ones are used as they are."""
        N, _, _ = ops.check_packed(qweight, scales, zeros, group_size, in_features)
        ops.check_num_threads(num_threads, allow_none=True)
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features, mod.group_size = in_features, N, group_size
        mod.num_threads = num_threads
        mod.activation = ops.check_activation(activation)
        mod.register_buffer("qweight", memory.adopt(qweight.contiguous()))
        mod.register_buffer("scales", memory.adopt(scales.contiguous()))
        mod.register_buffer("zeros", memory.adopt(zeros.contiguous()))
        if bias is not None:
            if tuple(bias.shape) != (N,):
                raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={N}")
            bias = bias.float().contiguous()
        mod.register_buffer("bias", bias)
        return mod

    def dequantize(self) -> torch.Tensor:
        """The float weight [out_features, in_features] this module multiplies by."""
        return ops.dequantize(self.qweight, self.scales, self.zeros, self.group_size, self.in_features,
                              num_threads=self.num_threads)

    def to_torch_int4pack(self, dtype: torch.dtype = torch.bfloat16):
        """This layer as inputs of PyTorch's CPU int4 op (torch >= 2.6): (packed weight from
        _convert_weight_to_int4pack_for_cpu -- this torch, this CPU's ISA --, scales_and_zeros [K/g, N, 2] in
        `dtype`), so that torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, group_size, sz) gives
        this layer's output without the bias. Needs out_features % 16 == 0 and in_features % group_size == 0."""
        from quant4.interop import layouts

        if self.out_features % 16 or self.in_features % self.group_size:
            raise ValueError(f"torch's int4 op needs out_features % 16 == 0 and in_features % group_size == 0, "
                             f"got [{self.out_features}, {self.in_features}] with group_size {self.group_size}")
        codes = ops.unpack(self.qweight)[:, : self.in_features]
        return layouts.torch_cpu_pack(codes), layouts.scales_and_zeros(self.scales, self.zeros, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tracing(x):
            # torch.compile / torch.export: the kernels as one custom op (quant4.torch_ops), told the layout
            slab = bool(self.__dict__.get("_slab16"))
            if slab and torch.compiler.is_exporting():
                raise ValueError("torch.export of an Int4Linear in the slab16 layout would keep that run-time "
                                 "layout in the program: call quant4.set_activation_(model, 'float') or "
                                 "module.set_slab16_(False) first (exported programs hold the stored format)")
            return _torch_ops().linear(x, self.qweight, self.scales, self.zeros, self.bias, self.group_size,
                                       self.in_features, self.activation, self.num_threads, slab)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Int4Linear expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input shape {tuple(x.shape)}: last dim must be in_features={self.in_features}")
        _refuse_transforms(x)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        if x.requires_grad and torch.is_grad_enabled():
            y = _Int4LinearFn.apply(x2d, self)
        else:
            y = ops.matmul_prepared(x2d, self._prepared(), num_threads=self.num_threads, activation=self.activation)
        return y.reshape(*lead, self.out_features)

    @staticmethod
    def run_group(modules, x: torch.Tensor) -> list:
        """[m(x) for m in modules], with the work on x shared when every module is an Int4Linear with the same
        in_features, group size, activation mode and threads, none has hooks, and no gradient is needed (e.g.
        q/k/v, or w1/w3): one input check and conversion, the kernels back to back, no per-module call
        overhead. Anything else is the plain loop."""
        from torch.nn.modules import module as _m

        first = modules[0]
        if (not isinstance(x, torch.Tensor) or _tracing(x) or (x.requires_grad and torch.is_grad_enabled())
                or _m._global_forward_hooks or _m._global_forward_pre_hooks
                or any(type(m) is not Int4Linear or m._forward_hooks or m._forward_pre_hooks
                       or m.in_features != first.in_features or m.group_size != first.group_size
                       or m.activation != first.activation or m.num_threads != first.num_threads
                       for m in modules)):
            return [m(x) for m in modules]
        if x.dim() == 0 or x.shape[-1] != first.in_features:
            raise ValueError(f"input shape {tuple(x.shape)}: last dim must be in_features={first.in_features}")
        _refuse_transforms(x)
        lead = x.shape[:-1]
        ys = ops.matmul_prepared_many(x.reshape(-1, first.in_features), [m._prepared() for m in modules],
                                      num_threads=first.num_threads, activation=first.activation)
        return [y.reshape(*lead, m.out_features) for y, m in zip(ys, modules)]

    def _prepared(self) -> ops.Prepared:
        # validated kernel views of the buffers, rebuilt whenever a buffer's memory, shape, strides or version
        # changed (see ops.Prepared.matches); never copied or pickled (__getstate__)
        b = self._buffers        # not self.qweight: nn.Module's attribute lookup costs more than the check
        slab = self.__dict__.get("_slab16", False)
        if slab and not self._slab16_fits():
            self.set_slab16_(False)         # the other modes' kernels (and other CPUs' builds) read rows
            slab = False
        p = self.__dict__.get("_prep")
        if p is None or not p.matches(b["qweight"], b["scales"], b["zeros"], b["bias"]):
            p = ops.Prepared(b["qweight"], b["scales"], b["zeros"], self.group_size, self.in_features, b["bias"],
                             slab16=slab)
            self.__dict__["_prep"] = p
        return p

    def _slab16_fits(self) -> bool:
        # the one rule for the layout: the int8 kernels of an AVX512-VNNI build read it
        return self.activation == "int8" and ops.slab16_available()

    @property
    def slab16(self) -> bool:
        """True while the buffers are in the int8 kernels' slab16 layout (set_slab16_)."""
        return bool(self.__dict__.get("_slab16"))

    def set_slab16_(self, on: bool) -> "Int4Linear":
        """Permute the buffers in place into the slab16 layout of the int8-activation kernels (on=True; needs
        ops.slab16_available() and activation "int8") or back into rows: exact both ways. Only for buffers no
        other module shares (quant4.set_activation_ checks that; a tied Int4Embedding reads rows). Reading
        qweight / scales / zeros, state_dict and load_state_dict all see rows; other activation modes permute
        back on their next call."""
        on = bool(on)
        if on == self.slab16:
            return self
        if on and not self._slab16_fits():
            raise ValueError("the slab16 layout is for activation='int8' on CPUs with AVX512-VNNI "
                             "(quant4.ops.slab16_available())")
        b = self._buffers
        ops.permute_slab16_(b["qweight"], b["scales"], b["zeros"], on, self.num_threads)
        self.__dict__["_slab16"] = on
        self.__dict__.pop("_prep", None)
        return self

    def __setattr__(self, name, value):
        if name in _LAYOUT_BUFFERS and self.__dict__.get("_slab16"):
            self.set_slab16_(False)         # a new tensor arrives in rows: the other two must be rows too
        super().__setattr__(name, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.__dict__.get("_slab16"):    # the stored format: rows
            b = self._buffers
            for name, t in zip(_LAYOUT_BUFFERS, ops.rows_of_slab16(b["qweight"], b["scales"], b["zeros"])):
                destination[prefix + name] = t

    def __prepare_scriptable__(self):
        # torch.jit.script calls this before compiling a module
        raise NotImplementedError("quant4's Int4Linear cannot be compiled by torch.jit.script (its kernels run "
                                  "outside TorchScript); run the module eagerly")

    # -- state ---------------------------------------------------------------------------------
    def __getstate__(self):
        # the kernel views are a cache of the buffers: a copy or a pickle carries the buffers only, in the
        # stored row layout (slab16 is this process's arrangement, never written anywhere)
        state = super().__getstate__().copy()
        state.pop("_prep", None)
        if state.pop("_slab16", False):
            b = dict(state["_buffers"])
            b["qweight"], b["scales"], b["zeros"] = ops.rows_of_slab16(b["qweight"], b["scales"], b["zeros"])
            state["_buffers"] = b
        return state

    def get_extra_state(self):
        return {"format_version": FORMAT_VERSION, "in_features": self.in_features,
                "out_features": self.out_features, "group_size": self.group_size}

    def set_extra_state(self, state):
        if not isinstance(state, dict):
            raise ValueError(f"Int4Linear extra state must be a dict, got {type(state).__name__}")
        version = state.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported quant4 format_version {version!r} (this quant4 reads {FORMAT_VERSION})")
        mine = self.get_extra_state()
        for key in ("in_features", "out_features", "group_size"):
            if state.get(key) != mine[key]:
                raise ValueError(f"checkpoint {key}={state.get(key)!r} but this Int4Linear has {key}={mine[key]!r}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        foreign = state_dict.get(prefix + "weight")
        if isinstance(foreign, torch.Tensor) and prefix + "qweight" not in state_dict:
            sz = state_dict.get(prefix + "scales_and_zeros")
            error_msgs.append(
                f"{prefix}weight: checkpoint holds {_foreign_layout(foreign, sz)} where quant4 format "
                f"v{FORMAT_VERSION} expects qweight uint8 {tuple(self.qweight.shape)} + scales/zeros float16. "
                f"quant4.models.load.load_model reads such checkpoints and converts them (scripts/migrate.py saves "
                f"the result in quant4's format).")
            state_dict = {k: v for k, v in state_dict.items() if k not in (prefix + "weight", prefix + "scales_and_zeros")}
        for name in ("qweight", "scales", "zeros"):
            key = prefix + name
            t = state_dict.get(key)
            mine = getattr(self, name)
            if isinstance(t, torch.Tensor) and (t.shape != mine.shape or t.dtype != mine.dtype):
                error_msgs.append(
                    f"{key}: checkpoint has {t.dtype} {tuple(t.shape)}, quant4 format v{FORMAT_VERSION} expects "
                    f"{mine.dtype} {tuple(mine.shape)} (in_features={self.in_features}, "
                    f"group_size={self.group_size}).")
                state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtypes(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        Kp = padded_k(self.in_features, self.group_size)
        pad = f", padded_in={Kp}" if Kp != self.in_features else ""
        act = f", activation={self.activation}" if self.activation != "float" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}{pad}{act}, "
                f"format=v{FORMAT_VERSION}, kernels={ops.kernel_isa()}")
