"""GPT model: shapes, causality, loss, activation checkpointing, GQA, init, KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig

V = 101


def tiny(style="gpt2", **kw) -> GPTConfig:
    base = dict(style=style, vocab_size=V, n_layer=2, n_head=4, d_model=64, max_seq_len=32)
    base.update(kw)
    return GPTConfig(**base)


def build(style="gpt2", seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(style, **kw)).eval()


STYLES = ["gpt2", "llama"]


def rope_angles(c: GPTConfig, T: int) -> torch.Tensor:
    """[T, head_dim] float64: position t rotates pair (i, i + D/2) by t * theta^(-2i/D)."""
    D = c.head_dim
    inv_freq = c.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    return torch.cat([torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)] * 2, -1)


def reference_logits(sd: dict, c: GPTConfig, x: torch.Tensor) -> torch.Tensor:
    """The forward pass written out from the formulas, in float64, from a state dict: GPT-2 (learned
    positions, LayerNorm with biases, GELU tanh, tied head) or Llama (RMSNorm, rotate-half RoPE with
    base rope_theta, grouped-query attention, SwiGLU, untied head); pre-norm blocks, causal softmax
    attention with 1/sqrt(head_dim) scaling. Nothing of model/ is called."""
    w = {k: v.detach().double() for k, v in sd.items()}
    B, T = x.shape
    H, Hkv, D, eps = c.n_head, c.n_kv_head, c.head_dim, c.norm_eps

    def norm(h, name):
        if c.style == "gpt2":
            mu = h.mean(-1, keepdim=True)
            var = ((h - mu) ** 2).mean(-1, keepdim=True)
            return (h - mu) / torch.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]
        return h / torch.sqrt((h ** 2).mean(-1, keepdim=True) + eps) * w[name + ".weight"]

    def linear(h, name):
        out = h @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    angles = rope_angles(c, T)

    def rope(t):
        half = torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1)
        return t * angles.cos() + half * angles.sin()

    h = w["tok_emb.weight"][x] + (w["pos_emb.weight"][:T] if c.style == "gpt2" else 0)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c.n_layer):
        p = f"blocks.{i}."
        a = norm(h, p + "attn_norm")
        q = linear(a, p + "attn.q_proj").view(B, T, H, D).transpose(1, 2)
        k = linear(a, p + "attn.k_proj").view(B, T, Hkv, D).transpose(1, 2)
        v = linear(a, p + "attn.v_proj").view(B, T, Hkv, D).transpose(1, 2)
        if c.style == "llama":
            q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)  # head j reads kv head j // rep
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~causal, -math.inf)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        h = h + linear(y, p + "attn.o_proj")
        m = norm(h, p + "mlp_norm")
        if c.style == "gpt2":
            u = linear(m, p + "mlp.fc")
            act = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
            h = h + linear(act, p + "mlp.proj")
        else:
            g = linear(m, p + "mlp.gate_proj")
            h = h + linear(g * torch.sigmoid(g) * linear(m, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = w["tok_emb.weight"] if c.tie_embeddings else w["lm_head.weight"]
    return norm(h, "final_norm") @ head.T


@pytest.mark.parametrize("style, n_kv_head", [("gpt2", None), ("llama", None), ("llama", 2)])
def test_forward_equals_the_formulas(style, n_kv_head):
    """Logits against `reference_logits` in float64: the float32 model to float32 rounding; the
    model cast to float64 to ~1e-12 (gpt2) or to its float32 RMSNorm and RoPE tables (llama)."""
    m = build(style, n_kv_head=n_kv_head)
    x = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(m.state_dict(), m.config, x)
    assert ref.abs().max() > 0.1  # a model whose logits are not all ~0, so the tolerances mean something
    torch.testing.assert_close(m(x), ref.float(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        m64 = build(style, n_kv_head=n_kv_head).double()
    logits64 = m64.head(m64.hidden_states(x))  # forward() returns float32 logits
    assert logits64.dtype == torch.float64
    # Llama keeps float32 where Hugging Face does: RMSNorm's statistics and the RoPE tables.
    tol = dict(rtol=1e-10, atol=1e-12) if style == "gpt2" else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits64, ref, **tol)


@pytest.mark.parametrize("style", STYLES)
def test_parameter_names(style):
    """Names are a contract (Hugging Face adapter, tensor parallelism, pipeline stages)."""
    m = build(style)
    names = set(dict(m.named_parameters()))
    common = {"tok_emb.weight", "final_norm.weight", "blocks.1.attn_norm.weight", "blocks.1.mlp_norm.weight",
              *(f"blocks.0.attn.{p}_proj.weight" for p in "qkvo")}
    assert common <= names
    if style == "gpt2":
        assert {"pos_emb.weight", "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.bias",
                "blocks.0.attn.q_proj.bias", "final_norm.bias"} <= names
        assert m.lm_head.weight is m.tok_emb.weight  # tied
    else:
        assert {"lm_head.weight", "blocks.0.mlp.gate_proj.weight", "blocks.0.mlp.up_proj.weight",
                "blocks.0.mlp.down_proj.weight"} <= names
        assert not any(n.endswith(".bias") for n in names)
        assert m.lm_head.weight is not m.tok_emb.weight
        assert "rope_cos" not in m.state_dict()  # non-persistent buffer


@pytest.mark.parametrize("style", STYLES)
def test_causality(style):
    m = build(style)
    x = torch.randint(0, V, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % V  # change the future only
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("style", STYLES)
def test_loss_matches_cross_entropy(style):
    m = build(style)
    x = torch.randint(0, V, (2, 10))
    t = torch.randint(0, V, (2, 10))
    t[0, :3] = -100
    ref = F.cross_entropy(m(x).reshape(-1, V), t.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(m.loss(x, t), ref)
    t2 = t.clone()
    t2[t2 == -100] = 7
    t2[1, 4] = 7
    ref2 = F.cross_entropy(m(x).reshape(-1, V), t2.reshape(-1), ignore_index=7)
    torch.testing.assert_close(m.loss(x, t2, ignore_index=7), ref2)
    torch.testing.assert_close(m(x, targets=t), ref)  # forward(targets=...) is the loss too


@pytest.mark.parametrize("style", STYLES)
def test_activation_checkpointing_same_loss_and_grads(style):
    x = torch.randint(0, V, (2, 16))
    results = []
    for ckpt in (False, True):
        m = build(style, activation_checkpointing=ckpt).train()
        loss = m.loss(x, x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-6, atol=1e-7, msg=n)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """n_kv_head < n_head must equal MHA whose k/v heads are the kv heads repeated (HF repeat_kv)."""
    gqa = build("llama", n_head=4, n_kv_head=2)
    mha = GPT(tiny("llama", n_head=4, n_kv_head=4)).eval()
    sd = gqa.state_dict()
    hd = gqa.config.head_dim
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            w = sd[k].view(2, hd, -1)
            sd[k] = w.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    x = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(gqa(x), mha(x))
    assert gqa.blocks[0].attn.k_proj.weight.shape == (2 * hd, 64)
    gqa.train()
    gqa.loss(x, x).backward()  # training path (SDPA enable_gqa)


def test_config_errors():
    with pytest.raises(ValueError):
        tiny("llama", n_head=4, n_kv_head=3)
    with pytest.raises(ValueError):
        GPT(GPTConfig(style="bert", vocab_size=V, n_layer=1, n_head=4, d_model=64))


def test_init_statistics():
    torch.manual_seed(0)
    m = GPT(GPTConfig(style="gpt2", vocab_size=1000, n_layer=8, n_head=4, d_model=256, max_seq_len=64))
    std, resid = 0.02, 0.02 / math.sqrt(16)
    assert abs(m.blocks[0].attn.q_proj.weight.std().item() - std) < 2e-3
    assert abs(m.blocks[0].attn.o_proj.weight.std().item() - resid) < 5e-4
    assert abs(m.blocks[0].mlp.proj.weight.std().item() - resid) < 5e-4
    assert abs(m.blocks[0].mlp.fc.weight.std().item() - std) < 2e-3
    assert abs(m.tok_emb.weight.std().item() - std) < 2e-3
    assert m.blocks[0].attn.q_proj.bias.abs().max() == 0
    assert torch.equal(m.blocks[0].attn_norm.weight, torch.ones(256))
    ll = build("llama")
    assert abs(ll.blocks[0].mlp.down_proj.weight.std().item() - 0.02 / 2) < 1e-3


@pytest.mark.parametrize("style", STYLES)
def test_num_params_and_flops(style):
    m = build(style)
    c = m.config
    total = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    assert m.num_params() == total
    emb = V * 64 + (32 * 64 if style == "gpt2" else 0)
    assert m.num_params(exclude_embeddings=True) == total - emb
    # N: the weights of matmuls (norms and biases are elementwise) plus the head, which costs
    # matmul FLOPs even when it is the tied embedding (checked against FlopCounterMode in test_flops).
    small = sum(p.numel() for n, p in m.named_parameters() if "norm" in n or n.endswith(".bias"))
    n_mm = total - emb - small + (V * 64 if c.tie_embeddings else 0)
    assert m.matmul_weights() == n_mm
    assert m.flops_per_token(32) == 6 * n_mm + 12 * c.n_layer * c.d_model * 32


@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_incremental_equals_full_forward(style):
    m = build(style)
    x = torch.randint(0, V, (2, 12))
    full = m(x)
    cache = m.new_kv_cache(2, 12)
    parts = [m(x[:, :5], kv_cache=cache)]
    for t in range(5, 12):
        parts.append(m(x[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_left_padding_with_mask_matches_unpadded(style):
    m = build(style)
    x = torch.randint(0, V, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = m(padded, positions=positions, attention_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], m(x), rtol=1e-5, atol=1e-5)


def test_too_long_sequence_raises():
    m = build("llama")
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_meta_init_and_reset_buffers():
    with torch.device("meta"):
        m = GPT(tiny("llama"), init=False)
    assert m.tok_emb.weight.is_meta and m.rope_cos.is_meta
    m.to_empty(device="cpu")
    m.reset_buffers()
    ref = build("llama")
    torch.testing.assert_close(m.rope_cos, ref.rope_cos)
    torch.testing.assert_close(m.rope_sin, ref.rope_sin)


@pytest.mark.parametrize("style", STYLES)
def test_bf16_forward_and_kernels_auto(style):
    """A bf16 model (kernels=auto: the fused CPU kernels where they build) against the float64
    formulas on the same bf16 weights: within bf16 rounding (2^-8 relative per op; about 3e-3 on
    logits up to ~0.9 here), and really computed in bf16 (the float32 model is ~1e-7 off)."""
    m = build(style, kernels="auto").to(torch.bfloat16)
    x = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = m(x)
        ref = reference_logits(m.state_dict(), m.config, x)
        assert out.dtype == torch.float32  # upcast at the end
        err = (out.double() - ref).abs()
        assert err.max() > 1e-4 and torch.all(err <= 0.02 + 0.02 * ref.abs()), err.max()
        ce = F.cross_entropy(ref.reshape(-1, V), x.reshape(-1))
        assert abs(m.loss(x, x).double() - ce) < 0.01
