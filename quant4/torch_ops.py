"""quant4's kernels as PyTorch custom operators, so torch.compile and torch.export see them as single ops.

    torch.ops.quant4.linear(x, qweight, scales, zeros, bias, group_size, in_features, activation, num_threads,
                            slab16=False)
        y [..., N] = x [..., in_features] . dequantize(w)^T (+ bias), in x's dtype (quant4.ops.matmul);
        slab16: the weight's tensors are in the int8 kernels' slab16 layout (Int4Linear.set_slab16_)
    torch.ops.quant4.dequantize(qweight, scales, zeros, group_size, in_features) -> fp32 [N, in_features]

Each has a fake (meta) implementation that checks shapes and dtypes as the real one does, so a compiled graph
is checked when it is traced; `linear` has a gradient for x. Int4Linear calls `linear` whenever it is being
compiled or exported; eagerly it calls the kernels directly (no dispatcher in between).
"""
from __future__ import annotations

from typing import Optional

import torch

from quant4 import ops


def _check_x(x: torch.Tensor, in_features: int) -> None:
    ops._check_tensor("x", x, ndim=x.dim(), dtypes=ops.FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"input shape {tuple(x.shape)}: last dim must be in_features={in_features}")


# Defined with torch.library.Library rather than the @custom_op decorator: the same operator to compile, export
# and opcheck, but 12 us of dispatch per call instead of 30 us (measured on a 128 x 128 layer at M = 1), which
# matters when a small model's decode step is 40 such calls.
_LIB = torch.library.Library("quant4", "DEF")
_LIB.define("linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, int group_size, "
            "int in_features, str activation, int? num_threads, bool slab16=False) -> Tensor")
_LIB.define("dequantize(Tensor qweight, Tensor scales, Tensor zeros, int group_size, int in_features) -> Tensor")


def _linear_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           bias: Optional[torch.Tensor], group_size: int, in_features: int, activation: str,
           num_threads: Optional[int], slab16: bool = False) -> torch.Tensor:
    _check_x(x, in_features)
    w = ops.prepared_for(qweight, scales, zeros, group_size, in_features, bias, slab16=slab16)
    y = ops.matmul_prepared(x.reshape(-1, in_features), w, num_threads=num_threads, activation=activation)
    return y.reshape(*x.shape[:-1], w.N)


def _linear_fake(x, qweight, scales, zeros, bias, group_size, in_features, activation, num_threads, slab16=False):
    _check_x(x, in_features)
    N, _, _ = ops.check_packed(qweight, scales, zeros, group_size, in_features)
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={N}")
    ops.check_activation(activation)
    ops.check_num_threads(num_threads, allow_none=True)
    return x.new_empty((*x.shape[:-1], N))


def _dequantize_impl(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               in_features: int) -> torch.Tensor:
    return ops.dequantize(qweight, scales, zeros, group_size, in_features)


def _dequantize_fake(qweight, scales, zeros, group_size, in_features):
    N, _, _ = ops.check_packed(qweight, scales, zeros, group_size, in_features)
    return qweight.new_empty((N, in_features), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, _, group_size, in_features, _, _ = inputs[:9]
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.group_size, ctx.in_features = group_size, in_features
    ctx.slab16 = bool(inputs[9]) if len(inputs) > 9 else False


def _backward(ctx, grad_y):
    # the weights are frozen: only x gets a gradient, grad_x = grad_y . w_hat
    qweight, scales, zeros = ctx.saved_tensors
    if ctx.slab16:
        qweight, scales, zeros = ops.rows_of_slab16(qweight, scales, zeros)
    w = torch.ops.quant4.dequantize(qweight, scales, zeros, ctx.group_size, ctx.in_features)
    grad_x = (grad_y.float() @ w).to(grad_y.dtype)
    return grad_x, None, None, None, None, None, None, None, None, None


_LIB.impl("linear", _linear_impl, "CPU")
_LIB.impl("dequantize", _dequantize_impl, "CPU")
torch.library.register_fake("quant4::linear", _linear_fake, lib=_LIB)
torch.library.register_fake("quant4::dequantize", _dequantize_fake, lib=_LIB)
torch.library.register_autograd("quant4::linear", _backward, setup_context=_setup_context, lib=_LIB)

linear = torch.ops.quant4.linear.default
dequantize = torch.ops.quant4.dequantize.default
