"""The FLOP/token figure behind MFU, against torch's own FLOP counter on the real model.

`torch.utils.flop_counter.FlopCounterMode` counts every matmul the model's forward and backward
actually dispatch (mm, addmm, bmm), from their shapes. Attention runs on SDPA's math backend here,
which computes the score and value matmuls as plain bmm over the whole T x T matrix (causal
masking applied to the scores, no FLOPs skipped). On CPU the default SDPA kernel is
`_scaled_dot_product_flash_attention_for_cpu`, which the counter has no formula for (it would count
no attention at all); on CUDA the flash/efficient kernels are counted with their backward's
recomputation of the scores (5 matmuls instead of 4), which model FLOPs (MFU) exclude. The math
backend counts exactly the model FLOPs of the PaLM convention the formula uses.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import GPT, GPTConfig

V, L, H, D, T, B = 96, 3, 4, 32, 24, 2

CONFIGS = {
    # GPT-2: biases, LayerNorm, tied head, GELU MLP of 4d
    "gpt2": dict(style="gpt2"),
    # Llama: no biases, RMSNorm, untied head, grouped KV heads, SwiGLU MLP of the Llama width
    "llama": dict(style="llama", n_kv_head=2),
}


def _count(model: GPT, input_ids, targets) -> tuple[int, dict]:
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model.loss(input_ids, targets).backward()
    return counter.get_total_flops(), {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


def _hand_matmul_weights(c: GPTConfig) -> int:
    """The matmul weights of one model, from the architecture (not from the module)."""
    hd = c.d_model // c.n_head
    attn = c.d_model * c.n_head * hd + 2 * c.d_model * c.n_kv_head * hd + c.n_head * hd * c.d_model
    mlp = (2 if c.style == "gpt2" else 3) * c.d_model * c.d_ff
    return c.n_layer * (attn + mlp) + c.d_model * c.vocab_size  # + the output head (tied or not)


@pytest.mark.parametrize("style", sorted(CONFIGS))
def test_flops_per_token_equals_flop_counter(style):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, n_layer=L, n_head=H, d_model=D, max_seq_len=T, **CONFIGS[style])
    model = GPT(cfg)
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    total, by_op = _count(model, x, y)

    # The attention matmuls alone (bmm under the math backend): 2 forward (q k^T, p v) and 4
    # backward, each 2 * T * T * head_dim per head: 12 * d * T per token and layer.
    assert by_op["aten.bmm"] == 12 * L * D * T * (B * T)
    # Everything else is nn.Linear: forward 2 FLOPs per weight and token, backward 4 (the gradient
    # of the input and of the weight), the first layer's input gradient included (the embedding
    # is trained). Biases and norm weights are elementwise and cost no matmul FLOPs.
    assert total - by_op["aten.bmm"] == 6 * _hand_matmul_weights(cfg) * (B * T)

    per_token = total / (B * T)
    assert model.flops_per_token(T) == pytest.approx(per_token, rel=1e-12)  # stated tolerance: exact
    # The convention, made visible: a kernel that skips the masked half of the T x T matrix needs
    # 6 * L * d * T fewer FLOPs per token; MFU here counts the whole matrix (PaLM, nanoGPT).
    causal_only = model.flops_per_token(T) - 6 * L * D * T
    assert causal_only < per_token


def test_flops_scale_with_batch_and_only_attention_with_length():
    """Per token, the count is independent of the batch size, and only the attention term grows
    with the sequence length (linearly)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, n_layer=L, n_head=H, d_model=D, max_seq_len=2 * T, **CONFIGS["llama"])
    model = GPT(cfg)
    counts = {}
    for b, t in ((1, T), (3, T), (1, 2 * T)):
        x, y = torch.randint(0, V, (b, t)), torch.randint(0, V, (b, t))
        counts[b, t] = _count(model, x, y)[0] / (b * t)
        assert model.flops_per_token(t) == counts[b, t]
    assert counts[1, T] == counts[3, T]
    assert counts[1, 2 * T] - counts[1, T] == 12 * L * D * T



def test_the_final_mfu_uses_the_higher_of_the_start_and_end_ceilings(monkeypatch):
    """A busy moment at start-up must not leave the run an MFU above 100%: on CPU the ceiling is
    measured again at the end and the higher kept; a given or datasheet peak is never replaced."""
    from model import flops

    measured = iter([(250e9, "measured again"), (100e9, "measured lower")])
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda dtype: next(measured))
    cpu, start = torch.device("cpu"), (200e9, "measured at start")
    assert flops.end_of_run_peak(cpu, None, torch.float32, start) == (250e9, "measured again (at the end of the run, "
                                                                      "above the start's)")
    assert flops.end_of_run_peak(cpu, None, torch.float32, start) == start
    assert flops.end_of_run_peak(cpu, 0.3, torch.float32, start) == start  # train.peak_tflops
    assert flops.end_of_run_peak(torch.device("cuda"), None, torch.bfloat16, start) == start
