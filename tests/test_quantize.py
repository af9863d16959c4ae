"""Int8 weight-only quantisation (model/quantize.py) against float64 references."""

from __future__ import annotations

import torch
import torch.nn as nn

from model import GPT, GPTConfig
from model.quantize import Int8Linear, quantize_int8_weight_only


def test_int8_linear_is_the_linear_layer_of_its_dequantised_weight():
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    q = Int8Linear(lin)
    w = lin.weight.detach().double()
    deq = q.qweight.double() * q.scale.double()[:, None]
    # Symmetric per-row rounding: every element within half a step of the original.
    assert ((w - deq).abs() <= q.scale.double()[:, None] / 2 + 1e-7).all()
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() == 127
    x = torch.randn(3, 5, 48)
    ref = torch.nn.functional.linear(x.double(), deq, lin.bias.detach().double())
    torch.testing.assert_close(q(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q(x), lin(x))  # it is quantised


def test_a_zero_row_does_not_divide_by_zero():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight[0] = 0
    q = Int8Linear(lin)
    assert torch.isfinite(q(torch.randn(2, 4))).all() and (q.qweight[0] == 0).all()


def test_quantised_gpt_keeps_a_tied_head_and_generates_its_own_greedy_tokens():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, d_model=64, n_layer=2, n_head=4, d_ff=256, max_seq_len=64, style="gpt2",
                    kernels="torch", dropout=0.0)
    model = GPT(cfg).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(ids)
    stats = quantize_int8_weight_only(model)
    assert stats["layers"] == 2 * 6  # q, k, v, o, fc, proj per block; the tied head stays
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_emb.weight
    # int8 values plus one fp32 scale per output row, against fp32 weights
    assert stats["bytes_before"] == 4 * 2 * (4 * 64 * 64 + 2 * 64 * 256)
    assert stats["bytes_after"] == 2 * (4 * (64 * 64 + 4 * 64) + (256 * 64 + 4 * 256) + (64 * 256 + 4 * 64))
    with torch.no_grad():
        out = model(ids)
        p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(out.double(), -1)
        assert (p.exp() * (p - q)).sum(-1).max() < 1e-3
        # The decoding engine (KV cache, one token per step) through the quantised layers gives the
        # tokens of a cache-free argmax loop over the same quantised model.
        gen = model.generate([[5, 6, 7]], max_new_tokens=8, temperature=0)[0]
        seq = [5, 6, 7]
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert gen == seq


def test_untied_llama_head_is_quantised_too():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=128, d_model=32, n_layer=1, n_head=4, n_kv_head=2, d_ff=64, max_seq_len=32,
                    style="llama", kernels="torch", tie_embeddings=False)
    model = GPT(cfg).eval()
    stats = quantize_int8_weight_only(model)
    assert isinstance(model.lm_head, Int8Linear) and stats["layers"] == 4 + 3 + 1
