"""A corpus of bad inputs to the public API: each raises ValueError or TypeError naming the problem."""
import numpy as np
import pytest
import torch
from torch import nn

import quant4
from quant4 import Int4Linear, quantize_model_

W = torch.randn(8, 64)
QW, S, Z = quant4.quantize(W, 32)
X = torch.randn(2, 64)

BAD_WEIGHTS = [
    ("list", [[1.0] * 64]), ("numpy", np.ones((8, 64), dtype=np.float32)), ("scalar", torch.tensor(1.0)),
    ("1-D", torch.randn(64)), ("3-D", torch.randn(2, 8, 64)), ("4-D", torch.randn(1, 1, 8, 64)),
    ("empty rows", torch.randn(0, 64)), ("empty cols", torch.randn(8, 0)),
    ("int64", torch.ones(8, 64, dtype=torch.int64)), ("int32", torch.ones(8, 64, dtype=torch.int32)),
    ("uint8", torch.ones(8, 64, dtype=torch.uint8)), ("bool", torch.ones(8, 64, dtype=torch.bool)),
    ("float64", torch.ones(8, 64, dtype=torch.float64)), ("complex", torch.ones(8, 64, dtype=torch.complex64)),
    ("meta", torch.empty(8, 64, device="meta")),
] + [(f"nan@{i}", W.clone().index_put_((torch.tensor([i % 8]), torch.tensor([i])), torch.tensor(float("nan"))))
     for i in (0, 13, 31, 32, 63)] + [
    (f"inf@{i}", W.clone().index_put_((torch.tensor([i % 8]), torch.tensor([i])), torch.tensor(float(s) * float("inf"))))
    for i, s in ((0, 1), (40, -1), (63, 1))] + [
    ("huge range", torch.tensor([[-7e4] * 32 + [7e4] * 32]))]

BAD_GROUP_SIZES = [0, 1, 16, 31, 48, 100, 512, -32, 32.0, "32", None, True]
BAD_THREADS = [0, -1, 1.5, "2", True]


@pytest.mark.parametrize("name,w", BAD_WEIGHTS, ids=[n for n, _ in BAD_WEIGHTS])
def test_quantize_bad_weight(name, w):
    with pytest.raises((ValueError, TypeError)):
        quant4.quantize(w, 32)


@pytest.mark.parametrize("g", BAD_GROUP_SIZES, ids=repr)
def test_bad_group_size(g):
    with pytest.raises(ValueError, match="group_size"):
        quant4.quantize(W, g)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(64, 8, group_size=g)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear.from_linear(nn.Linear(64, 8), group_size=g)
    with pytest.raises(ValueError, match="group_size"):
        quant4.matmul(X, QW, S, Z, g, 64)


@pytest.mark.parametrize("n", BAD_THREADS, ids=repr)
def test_bad_thread_count(n):
    with pytest.raises(ValueError, match="num_threads"):
        quant4.quantize(W, 32, num_threads=n)
    with pytest.raises(ValueError, match="num_threads"):
        quant4.matmul(X, QW, S, Z, 32, 64, num_threads=n)
    with pytest.raises(ValueError, match="num_threads"):
        quant4.set_num_threads(n)


BAD_X = [
    ("1-D", torch.randn(64)), ("3-D", torch.randn(1, 2, 64)), ("K-1", torch.randn(2, 63)),
    ("K+1", torch.randn(2, 65)), ("K*2", torch.randn(2, 128)), ("int", torch.ones(2, 64, dtype=torch.int32)),
    ("float64", torch.randn(2, 64, dtype=torch.float64)), ("bool", torch.ones(2, 64, dtype=torch.bool)),
    ("meta", torch.empty(2, 64, device="meta")), ("numpy", np.ones((2, 64), dtype=np.float32)),
]


@pytest.mark.parametrize("name,x", BAD_X, ids=[n for n, _ in BAD_X])
def test_matmul_bad_x(name, x):
    with pytest.raises((ValueError, TypeError)):
        quant4.matmul(x, QW, S, Z, 32, 64)


BAD_PACKED = [
    ("qweight int8", (QW.to(torch.int8), S, Z)), ("qweight int32 4-D", (torch.zeros(1, 1, 32, 4, dtype=torch.int32), S, Z)),
    ("qweight short", (QW[:, :16], S, Z)), ("qweight long", (torch.cat([QW, QW], 1), S, Z)),
    ("qweight 1-D", (QW.flatten(), S, Z)), ("scales fp32", (QW, S.float(), Z)), ("scales bf16", (QW, S.bfloat16(), Z)),
    ("zeros fp32", (QW, S, Z.float())), ("scales rows", (QW, S[:4], Z)), ("zeros cols", (QW, S, Z[:, :1])),
    ("scales 1-D", (QW, S.flatten(), Z)), ("meta", (QW.to("meta"), S, Z)),
]


@pytest.mark.parametrize("name,packed", BAD_PACKED, ids=[n for n, _ in BAD_PACKED])
def test_bad_packed(name, packed):
    with pytest.raises((ValueError, TypeError)):
        quant4.matmul(X, *packed, 32, 64)
    with pytest.raises((ValueError, TypeError)):
        quant4.dequantize(*packed, 32, 64)
    with pytest.raises((ValueError, TypeError)):
        Int4Linear.from_packed(*packed, in_features=64, group_size=32)


@pytest.mark.parametrize("in_features", [0, -1, 63, 65, 2**40, 64.0, "64", True])
def test_bad_in_features(in_features):
    with pytest.raises((ValueError, TypeError)):
        quant4.matmul(X, QW, S, Z, 32, in_features)
    if not (isinstance(in_features, int) and not isinstance(in_features, bool) and 0 < in_features < 2**31):
        with pytest.raises((ValueError, TypeError)):
            Int4Linear(in_features, 8)


@pytest.mark.parametrize("bias", [torch.zeros(3), torch.zeros(8, 1), torch.zeros(8, dtype=torch.int64),
                                  torch.zeros(8, device="meta"), [0.0] * 8])
def test_bad_bias(bias):
    with pytest.raises((ValueError, TypeError)):
        quant4.matmul(X, QW, S, Z, 32, 64, bias)


@pytest.mark.parametrize("activation", ["fp8", "", None, "INT8", 8])
def test_bad_activation(activation):
    with pytest.raises(ValueError, match="activation"):
        quant4.matmul(X, QW, S, Z, 32, 64, activation=activation)
    with pytest.raises(ValueError, match="activation"):
        Int4Linear(64, 8, activation=activation)


@pytest.mark.parametrize("bad", ["model", None, 3, nn.Linear])
def test_quantize_model_bad_model(bad):
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_model_(bad)


def test_forward_bad_inputs_name_the_shape():
    q = Int4Linear.from_linear(nn.Linear(64, 8))
    for x in (torch.randn(3, 5), torch.randn(64, 3), torch.tensor(2.0)):
        with pytest.raises(ValueError, match="in_features=64"):
            q(x)
