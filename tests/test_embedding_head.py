"""Int4Embedding (token tables in int4) and Int8Linear (output heads in 8 bits): the modules, and models loaded
from GGUF files that hold their tables in Q4_0/Q4_1 and their heads in other quantized types."""
import copy
import json

import pytest
import torch

from quant4 import Int4Embedding, Int4Linear, Int8Embedding, ops, quantize_model_, set_activation_
from quant4.int8_linear import Int8Linear
from quant4.models.fast_decode import decode_step, lean_stack
from quant4.models.gguf import write_gguf
from quant4.models.llama import ModelArgs, Transformer
from quant4.models.load import load_model
from quant4.serialization import FormatError, read_header, read_quantized, save_quantized

from helpers import gguf_from_float

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def test_int4_embedding_rows_are_the_dequantized_table_bit_exact():
    torch.manual_seed(0)
    w = torch.randn(300, 96)
    emb = Int4Embedding.from_float(w)
    table = emb.dequantize()
    ids = torch.tensor([[0, 299, 7, 7], [150, 1, 2, 3]])
    assert torch.equal(emb(ids), table[ids])
    assert torch.equal(emb(ids.int()), table[ids])
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 96)
    # the table is int4 of w: error at most half a step of each group's range (+ float16 scale rounding)
    err = (table - w).abs().view(300, 3, 32).amax(-1)
    step = (w.view(300, 3, 32).amax(-1) - w.view(300, 3, 32).amin(-1)) / 15
    assert bool((err <= 0.5 * step * 1.01 + 1e-3).all())
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        emb(torch.tensor([300]))
    with pytest.raises(ValueError, match=r"-1"):
        emb(torch.tensor([-1]))
    with pytest.raises(TypeError, match="token ids"):
        emb(torch.tensor([1.0]))
    out = torch.empty(96)
    assert torch.equal(emb.row_into(299, out), table[299])
    with pytest.raises(ValueError, match="300"):
        emb.row_into(300, out)


def test_int4_embedding_dtype_and_state():
    emb = Int4Embedding.from_float(torch.randn(64, 64))
    ids = torch.tensor([3, 9])
    ref = emb(ids)
    emb.to(torch.bfloat16)
    assert emb.dtype == torch.bfloat16 and emb.qweight.dtype == torch.uint8 and emb.scales.dtype == torch.float16
    assert torch.equal(emb(ids), ref.bfloat16())
    other = Int4Embedding(64, 64)
    other.load_state_dict(emb.state_dict())
    assert torch.equal(other(ids), ref)
    with pytest.raises(ValueError, match="embedding_dim"):
        Int4Embedding(64, 32).load_state_dict(emb.state_dict())


def test_int8_linear_values_kernel_and_modes():
    torch.manual_seed(1)
    w = torch.randn(500, 128)
    head = Int8Linear.from_float(w)
    deq = head.dequantize()
    blocks = w.view(500, 4, 32)
    # Q8_0 rounding: each weight within half a step (absmax / 127) of its block
    assert bool(((deq - w).view(500, 4, 32).abs() <= blocks.abs().amax(-1, keepdim=True) / 254 * 1.0001).all())
    x = torch.randn(3, 128)
    y = head(x)
    assert torch.allclose(y, x @ deq.t(), rtol=1e-5, atol=1e-4)
    # the few-rows float kernel against its definition in float64, within 1e-5 of |x| . |w_hat|
    wide = Int8Linear.from_float(torch.randn(96, 2048))
    xw = torch.randn(2, 2048)
    exact = xw.double() @ wide.dequantize().double().t()
    bound = 1e-5 * (xw.abs().double() @ wide.dequantize().abs().double().t())
    assert bool(((wide(xw).double() - exact).abs() <= bound).all())
    assert torch.allclose(head(x[0]), y[0], rtol=1e-5, atol=1e-4)      # BLAS gemv against gemm: rounding only
    if ops.int8_head_available():
        set_activation_(head, "int8")
        y8 = head(x)
        # the inputs rounded to int8 per 32 values: close to the float product, not equal
        assert (y8 - y).abs().max().item() <= 2e-2 * y.abs().max().item()
        out = torch.empty(500)
        assert torch.equal(head.matvec(x[1].contiguous(), out), y8[1])
        many = torch.randn(8, 128)          # more rows than SMALL_ROWS: the float path
        assert torch.allclose(head(many), many @ deq.t(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="in_features=128"):
        head(torch.randn(2, 64))
    with pytest.raises(ValueError, match="divisible by 32"):
        Int8Linear.from_float(torch.randn(4, 40))
    with pytest.raises(ValueError, match="scales"):
        Int8Linear.from_codes(head.codes, head.scales[:, :2])
    with pytest.raises(TypeError, match="uint8"):
        Int8Linear.from_codes(head.codes.float(), head.scales)


def _gguf(path, m, *, layers=Q.Q4_0, table=None, head=None):
    return gguf_from_float(path, m, layers, table=table, head=head)


def _model(tie, seed=3):
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=200, hidden_dim=128,
                              max_seq_len=64, tie_embeddings=tie))
    m.init_weights(seed)
    return m


TOKENS = torch.tensor([[1, 5, 9, 33, 70, 199]])


@pytest.mark.parametrize("head", [Q.Q8_0, Q.Q5_0])
def test_gguf_q4_table_and_quantized_head_load_compact(tmp_path, head):
    """Q4_0 token table and a quantized head (llama.cpp files: Q6_K or Q8_0): the table stays int4 (exact), the
    head becomes 8-bit (Q8_0 exactly, another type within a Q8_0 step of the file's values), no float copy of
    either; the logits match a float model of the file's values; the lean decode path gives forward's logits."""
    deq = _gguf(tmp_path / "m.gguf", _model(False), table=Q.Q4_0, head=head)
    report = []
    loaded = load_model(tmp_path / "m.gguf", report=report)
    m = loaded.model
    assert type(m.tok_embeddings) is Int4Embedding and type(m.output) is Int8Linear
    assert loaded.quantized["tok_embeddings"]["kind"] == "embedding" and loaded.quantized["output"]["kind"] == "int8"
    assert torch.equal(m.tok_embeddings.dequantize(), deq["tok_embeddings.weight"])
    file_head = deq["output.weight"]
    if head == Q.Q8_0:
        assert torch.equal(m.output.dequantize(), file_head)
        assert any("held in 8 bits (exactly)" in line for line in report)
    else:
        step = file_head.view(200, 2, 32).abs().amax(-1, keepdim=True) / 127
        assert bool(((m.output.dequantize() - file_head).view(200, 2, 32).abs() <= step / 2 * 1.0001).all())
    assert all(t.numel() < 200 * 64 for t in m.state_dict().values()
               if isinstance(t, torch.Tensor) and t.dtype == torch.float32)
    ref = Transformer(m.args)
    ref.load_state_dict(deq, strict=False)
    with torch.no_grad():
        got, want = m(TOKENS), ref.eval()(TOKENS)
    assert (got - want).abs().max().item() <= 1e-2 * want.abs().max().item()
    for activation in ("float", "int8"):
        set_activation_(m, activation)
        with torch.no_grad():
            # forward one token at a time (the 8-bit head's int8 mode takes the float path above 4 rows)
            cache = m.new_cache(1, 16)
            full = torch.cat([m(TOKENS[:, i:i + 1], i, cache)[0] for i in range(TOKENS.shape[1])])
            step_fn = decode_step(m, m.new_cache(1, 16))
            assert getattr(step_fn, "lean", False)
            steps = torch.stack([step_fn(int(t), i) for i, t in enumerate(TOKENS[0])])
        assert (steps - full).abs().max().item() <= 1e-4 * full.abs().max().item(), activation


def test_compact_model_round_trips_through_quant4_and_gguf_files(tmp_path):
    _gguf(tmp_path / "m.gguf", _model(False), table=Q.Q4_0, head=Q.Q8_0)
    m = load_model(tmp_path / "m.gguf").model
    with torch.no_grad():
        want = m(TOKENS)
    info = {"type": "llama", "config": dict(m.args.to_dict(), dropout=0.0)}
    save_quantized(m, tmp_path / "m.safetensors", model_info=info)
    meta, tensors = read_quantized(tmp_path / "m.safetensors")
    assert meta["layers"]["output"] == {"in_features": 64, "out_features": 200, "kind": "int8"}
    assert tensors["output.codes"].dtype == torch.uint8 and "tok_embeddings.weight" not in tensors
    back = load_model(tmp_path / "m.safetensors").model
    assert torch.equal(back.output.codes, m.output.codes) and torch.equal(back.tok_embeddings.qweight,
                                                                            m.tok_embeddings.qweight)
    with torch.no_grad():
        assert torch.equal(back(TOKENS), want)
    report = []
    write_gguf(m, m.args, tmp_path / "back.gguf", report=report)
    assert any("8-bit head written as F32" in line for line in report)
    again = load_model(tmp_path / "back.gguf").model
    # Q4_0 -> Q4_1 is exact (offset -8 d); the 8-bit head comes back as its exact float values
    assert torch.equal(again.tok_embeddings.dequantize(), m.tok_embeddings.dequantize())
    assert torch.equal(again.output.weight, m.output.dequantize())


def test_tied_q4_table_is_the_int4_head_shared(tmp_path):
    deq = _gguf(tmp_path / "t.gguf", _model(True), layers=Q.Q4_1, table=Q.Q4_1)
    loaded = load_model(tmp_path / "t.gguf")
    m = loaded.model
    assert loaded.args.tie_embeddings and type(m.tok_embeddings) is Int4Embedding and type(m.output) is Int4Linear
    assert m.output.qweight.data_ptr() == m.tok_embeddings.qweight.data_ptr()
    tol = 2e-3 * deq["tok_embeddings.weight"].abs().max().item()      # Q4_1's offset rounded to float16 once
    assert (m.output.dequantize() - deq["tok_embeddings.weight"]).abs().max().item() <= tol
    with torch.no_grad():
        want = m(TOKENS)
    info = {"type": "llama", "config": dict(m.args.to_dict(), dropout=0.0)}
    save_quantized(m, tmp_path / "t.safetensors", model_info=info)
    meta = json.loads(read_header(tmp_path / "t.safetensors")["quant4"])
    assert meta["tied"] == {f"output.{k}": f"tok_embeddings.{k}" for k in ("qweight", "scales", "zeros")}
    back = load_model(tmp_path / "t.safetensors").model
    assert back.output.qweight.data_ptr() == back.tok_embeddings.qweight.data_ptr()
    with torch.no_grad():
        assert torch.equal(back(TOKENS), want)
    write_gguf(m, m.args, tmp_path / "t2.gguf")
    names = [t.name for t in gguf.GGUFReader(str(tmp_path / "t2.gguf")).tensors]
    assert "output.weight" not in names and "token_embd.weight" in names      # the tied table written once


def test_int8_embedding_rows_are_the_head_values():
    torch.manual_seed(2)
    w = torch.randn(100, 64)
    table, head = Int8Embedding.from_float(w), Int8Linear.from_float(w)
    ids = torch.tensor([[0, 99, 5], [5, 6, 7]])
    assert torch.equal(table(ids), head.dequantize()[ids]) and torch.equal(table.dequantize(), head.dequantize())
    assert torch.equal(table.row_into(99, torch.empty(64)), head.dequantize()[99])
    table.to(torch.bfloat16)
    assert table(ids).dtype == torch.bfloat16 and table.codes.dtype == torch.uint8
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        table(torch.tensor([100]))


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_q8_0_table_is_8bit(tmp_path, tie):
    """A table in Q8_0 (what llama.cpp's Q4_0 makes of a tied table whose width is not a multiple of 256, e.g.
    SmolLM2's 576): an Int8Embedding with the file's values exactly; tied, the head is an Int8Linear over the
    same tensors, saved once; the logits match a float model of the file's values."""
    deq = _gguf(tmp_path / "q.gguf", _model(tie), table=Q.Q8_0)
    m = load_model(tmp_path / "q.gguf").model
    assert type(m.tok_embeddings) is Int8Embedding
    assert torch.equal(m.tok_embeddings.dequantize(), deq["tok_embeddings.weight"])
    if tie:
        assert type(m.output) is Int8Linear and m.output.codes.data_ptr() == m.tok_embeddings.codes.data_ptr()
    ref = Transformer(m.args)
    ref.load_state_dict({**deq, "output.weight": deq.get("output.weight", deq["tok_embeddings.weight"])},
                        strict=False)
    with torch.no_grad():
        got, want = m(TOKENS), ref.eval()(TOKENS)
    assert (got - want).abs().max().item() <= 1e-2 * want.abs().max().item()
    info = {"type": "llama", "config": dict(m.args.to_dict(), dropout=0.0)}
    save_quantized(m, tmp_path / "q.safetensors", model_info=info)
    meta = json.loads(read_header(tmp_path / "q.safetensors")["quant4"])
    assert meta["layers"]["tok_embeddings"]["kind"] == "int8-embedding"
    if tie:
        assert meta["tied"] == {"output.codes": "tok_embeddings.codes", "output.scales": "tok_embeddings.scales"}
    back = load_model(tmp_path / "q.safetensors").model
    with torch.no_grad():
        assert torch.equal(back(TOKENS), got)
    if tie:
        assert back.output.codes.data_ptr() == back.tok_embeddings.codes.data_ptr()
    write_gguf(m, m.args, tmp_path / "q2.gguf")
    again = load_model(tmp_path / "q2.gguf").model      # written as its F32 values: a float table again
    assert torch.equal(again.tok_embeddings.weight, m.tok_embeddings.dequantize())


def test_float_model_with_int4_table_quantized_by_hand():
    m = _model(False)
    quantize_model_(m.eval())
    m.tok_embeddings = Int4Embedding.from_float(m.tok_embeddings.weight)
    assert m.compute_dtype == torch.float32
    cache = m.new_cache(1, 8)
    assert cache[0].k.dtype == torch.float32
    assert lean_stack(m, cache) is not None

    class Table(torch.nn.Embedding):         # a table the lean path cannot read a row of: forward decodes
        pass

    other = copy.deepcopy(m)
    other.tok_embeddings = Table(200, 64)
    assert lean_stack(other, other.new_cache(1, 8)) is None
    m.to(torch.bfloat16)
    assert m.compute_dtype == torch.bfloat16 and m.new_cache(1, 8)[0].k.dtype == torch.bfloat16
    with torch.no_grad():
        assert m(TOKENS).dtype == torch.float32


def test_unknown_layer_kind_and_bad_8bit_tensors_are_refused(tmp_path):
    _gguf(tmp_path / "m.gguf", _model(False), table=Q.Q4_0, head=Q.Q8_0)
    m = load_model(tmp_path / "m.gguf").model
    info = {"type": "llama", "config": dict(m.args.to_dict(), dropout=0.0)}
    from safetensors.torch import load_file, save_file

    save_quantized(m, tmp_path / "m.safetensors", model_info=info)
    header = read_header(tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")
    meta = json.loads(header["quant4"])
    meta["layers"]["output"]["kind"] = "int3"
    save_file(tensors, tmp_path / "kind.safetensors", metadata={**header, "quant4": json.dumps(meta)})
    with pytest.raises(FormatError, match="kind 'int3'"):
        read_quantized(tmp_path / "kind.safetensors")
    bad = dict(tensors, **{"output.scales": tensors["output.scales"][:, :1].contiguous()})
    save_file(bad, tmp_path / "scales.safetensors", metadata=header)
    with pytest.raises(FormatError, match="output.*scales"):
        read_quantized(tmp_path / "scales.safetensors")
    nan = dict(tensors, **{"output.scales": torch.full_like(tensors["output.scales"], float("nan"))})
    save_file(nan, tmp_path / "nan.safetensors", metadata=header)
    with pytest.raises(FormatError, match="non-finite"):
        read_quantized(tmp_path / "nan.safetensors")
