"""The one GPT definition: GPT-2 style and Llama style decoder-only transformers.

Every fusable op (norms, GELU/SwiGLU, RoPE, cross-entropy) goes through `self.ops`
(`model.kernels.get_ops(config.kernels)`), so fused kernels can be swapped in without changing
parameters or the state dict.

Module and parameter names are a contract used by the Hugging Face adapter (`model.hf`), tensor
parallelism and pipeline stages:

    tok_emb, pos_emb (gpt2), drop,
    blocks.{i}.attn_norm, blocks.{i}.attn.{q_proj,k_proj,v_proj,o_proj},
    blocks.{i}.mlp_norm, blocks.{i}.mlp.{fc,proj} (gpt2) | {gate_proj,up_proj,down_proj} (llama),
    final_norm, lm_head

The forward pass is split into reusable pieces for pipeline stages: `embed`, `rotary`,
`Block.forward` and `head`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import GPTConfig
from .generate import DecodeEngine, SamplingParams
from .kernels import get_ops
from .kernels.reference import rope_cache

# --------------------------------------------------------------------------------------------------
# Norms: own small modules so the fused kernels get the same parameters.


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool, ops):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x, residual=None):
        """With `residual`, returns (norm(x + residual), x + residual)."""
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        """With `residual`, returns (norm(x + residual), x + residual)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual=residual)


def make_norm(config: GPTConfig, ops) -> nn.Module:
    if config.style == "gpt2":
        return LayerNorm(config.d_model, config.norm_eps, bool(config.bias), ops)
    return RMSNorm(config.d_model, config.norm_eps, ops)


# --------------------------------------------------------------------------------------------------
# Key/value cache for incremental decoding.


class KVCache:
    """Keys and values of every layer, each allocated once at full length (max_len).

    All rows of the batch share one write offset `length`: prompts of different lengths are left
    padded, so the cache stays rectangular and padding is hidden by the attention mask.

    The cache protocol of `GPT.forward`: `layer(i).update(k, v)` stores a layer's new keys and
    returns the keys/values to attend over, `advance(T)` ends the step. A cache with per-row
    lengths (`model.generate.SlotKVCache`) also has `plan(T)`, which supplies the step's positions
    and attention mask, and its layers may set `sdpa_enable_gqa` (SDPA takes grouped kv heads with
    that mask on this device, so they are not repeated)."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=None):
        self.shape = (batch_size, n_kv_head, max_len, head_dim)
        self.device, self.dtype = device, dtype
        # Allocated on first write unless dtype is given, so the cache takes the dtype of the keys
        # actually computed (e.g. bf16 under autocast with float32 weights).
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.max_len = max_len
        self.length = 0

    def layer(self, i: int) -> LayerKVCache:
        return LayerKVCache(self, i)

    def advance(self, n: int) -> None:
        self.length += n


class LayerKVCache:
    """The view of a `KVCache` that one attention layer writes to."""

    def __init__(self, cache: KVCache, index: int):
        self.cache = cache
        self.index = index

    def update(self, k, v):
        """Store k, v [B, Hkv, T, D] after the cached positions; return all keys/values so far."""
        c, start, i = self.cache, self.cache.length, self.index
        end = start + k.shape[2]
        if end > c.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > cache size {c.max_len}")
        if c.k[i] is None:
            dtype, device = c.dtype or k.dtype, c.device or k.device
            c.k[i] = torch.zeros(c.shape, dtype=dtype, device=device)
            c.v[i] = torch.zeros(c.shape, dtype=dtype, device=device)
        c.k[i][:, :, start:end] = k
        c.v[i][:, :, start:end] = v
        return c.k[i][:, :, :end], c.v[i][:, :, :end]


# --------------------------------------------------------------------------------------------------
# Transformer block.


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.ops = ops
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        d, hd = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=config.bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * hd, bias=config.bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * hd, bias=config.bias)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=config.bias)

    def forward(self, x, cos=None, sin=None, attn_mask=None, kv_cache: LayerKVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cos is not None:
            if cos.dtype != q.dtype:  # autocast: tables in the activations' dtype, as under bf16 weights
                cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            q, k = self.ops.rope(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        dropout_p = self.dropout if self.training else 0.0
        grouped = self.n_kv_head != self.n_head
        if attn_mask is None:
            # Plain causal attention (training): lets SDPA pick flash attention, GQA included.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                               enable_gqa=grouped)
        else:
            gqa = grouped and getattr(kv_cache, "sdpa_enable_gqa", False)
            if grouped and not gqa:
                # Explicit repeat: the memory-efficient kernel (used with masks) has no GQA support.
                rep = self.n_head // self.n_kv_head
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class GeluMLP(nn.Module):
    """GPT-2 MLP: proj(gelu_tanh(fc(x)))."""

    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.ops = ops
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x):
        if not isinstance(self.fc, nn.Linear):
            # fc wrapped by another module (e.g. a LoRA layer, agents.lora): only its own forward
            # knows its output, bias included.
            return self.proj(self.ops.bias_gelu(self.fc(x), None))
        # The bias add is left to the op so a fused kernel does bias + GELU in one pass.
        h, bias = F.linear(x, self.fc.weight), self.fc.bias
        if bias is not None and bias.dtype != h.dtype and torch.is_autocast_enabled(h.device.type):
            bias = bias.to(h.dtype)  # what nn.Linear does with its bias under autocast
        return self.proj(self.ops.bias_gelu(h, bias))


class SwiGLUMLP(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.ops = ops
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x):
        return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.attn_norm = make_norm(config, ops)
        self.attn = Attention(config, ops)
        self.mlp_norm = make_norm(config, ops)
        self.mlp = GeluMLP(config, ops) if config.style == "gpt2" else SwiGLUMLP(config, ops)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cos=None, sin=None, attn_mask=None, kv_cache: LayerKVCache | None = None):
        a = self.drop(self.attn(self.attn_norm(x), cos, sin, attn_mask, kv_cache))
        # Fused residual add + norm: h = x + a, y = norm(h).
        y, h = self.mlp_norm(a, residual=x)
        return h + self.drop(self.mlp(y))


# --------------------------------------------------------------------------------------------------
# The model.


def build_attn_mask(attention_mask, q_len: int, past: int, device):
    """Boolean SDPA mask [B or 1, 1, q_len, past+q_len] (True = attend), or None for plain causal.

    `attention_mask` [B, past+q_len] marks real (1) and padding (0) key positions."""
    if attention_mask is None and past == 0:
        return None
    k_len = past + q_len
    q_idx = torch.arange(past, k_len, device=device)[:, None]
    k_idx = torch.arange(k_len, device=device)[None, :]
    mask = (k_idx <= q_idx)[None, None]
    if attention_mask is not None:
        if attention_mask.shape[-1] != k_len:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {k_len}")
        mask = mask & attention_mask.bool()[:, None, None, :]
        # A padding query would attend to nothing (softmax NaN, which then leaks through 0 * NaN
        # in later layers): let every query see itself.
        mask = mask | (k_idx == q_idx)
    return mask


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, init: bool = True):
        """`init=False` skips the random init (for loading weights into a meta-device model)."""
        super().__init__()
        if config.style not in ("gpt2", "llama"):
            raise ValueError(f"unknown model style {config.style!r}; allowed: gpt2, llama")
        self.config = config
        self.ops = get_ops(config.kernels)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.style == "gpt2":
            self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, self.ops) for _ in range(config.n_layer))
        self.final_norm = make_norm(config, self.ops)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.tie_weights()
        if config.style == "llama":
            # Non-persistent: not in the state dict; rebuilt by reset_buffers() after meta init.
            cos, sin = rope_cache(config.max_seq_len, config.head_dim, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if init:
            self.init_weights()

    # ---- setup helpers -------------------------------------------------------------------------

    def tie_weights(self) -> None:
        """Make lm_head.weight the very tensor tok_emb.weight (again after assign-loading)."""
        self.lm_head.weight = self.tok_emb.weight

    def reset_buffers(self, device=None) -> None:
        """Recompute the RoPE tables (e.g. on a real device after building on meta)."""
        if self.config.style != "llama":
            return
        if device is None:
            device = self.tok_emb.weight.device
        cos, sin = rope_cache(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta,
                              device=device)
        self.rope_cos, self.rope_sin = cos, sin

    def set_kernels(self, mode: str) -> None:
        """Switch every op of the model to another kernel mode (same parameters)."""
        from .kernels import set_kernels

        set_kernels(self, mode)
        self.config.kernels = mode

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, unit norms; residual output projections
        scaled by 1/sqrt(2 * n_layer) so the residual stream variance does not grow with depth."""
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name == "lm_head" and self.config.tie_embeddings:
                    continue  # it is tok_emb.weight
                last = name.rsplit(".", 1)[-1]
                is_resid = last in ("o_proj", "down_proj") or (last == "proj" and ".mlp" in name)
                nn.init.normal_(m.weight, 0.0, resid_std if is_resid else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, (LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # ---- accounting ----------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, tied ones counted once. `exclude_embeddings` drops the lookup
        tables tok_emb and pos_emb (a tied lm_head goes with tok_emb)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if hasattr(self, "pos_emb"):
                n -= self.pos_emb.weight.numel()
        return n

    def matmul_weights(self) -> int:
        """Number of weights that enter matrix multiplications: every `nn.Linear` weight, the output
        head included even when it is the tied token embedding. Embedding lookups, biases and norm
        weights are elementwise work and are not counted."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward, no recomputation), for MFU:
        6 * N + 12 * L * d * T. N = `matmul_weights()` (forward 2N, backward 4N: the gradients of
        the inputs and of the weights); the second term is the attention score (q k^T) and value
        (p v) matmuls over the whole T x T matrix, 4 * d * T per layer forward, three times that
        with the backward. That is the PaLM/nanoGPT convention, and what
        `torch.utils.flop_counter.FlopCounterMode` counts (tested exactly): causal masking is not
        discounted, although a causal kernel needs only about half of those attention FLOPs (a
        causal-only count would be 6 * L * d * T lower; 2.9% of the total for gpt-tiny at T=128).
        Elementwise work (norms, activations, softmax, cross-entropy) is not counted."""
        c = self.config
        return 6 * self.matmul_weights() + 12 * c.n_layer * c.d_model * seq_len

    # ---- forward pieces (pipeline stages reuse these) ------------------------------------------

    def embed(self, input_ids, positions=None):
        """Token (+ learned position) embeddings. positions: [T] or [B, T]; default 0..T-1."""
        x = self.tok_emb(input_ids)
        if self.config.style == "gpt2":
            if positions is None:
                positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
            x = x + self.pos_emb(positions)
        return self.drop(x)

    def rotary(self, positions=None, seq_len: int | None = None, offset: int = 0, dtype=None):
        """RoPE (cos, sin) for `positions` ([T] or [B, T]), else for offset..offset+seq_len-1.
        Returns (None, None) for the gpt2 style. Shapes: [T, D] or [B, 1, T, D]."""
        if self.config.style != "llama":
            return None, None
        if positions is None:
            cos = self.rope_cos[offset:offset + seq_len]
            sin = self.rope_sin[offset:offset + seq_len]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            if positions.dim() == 2:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        if dtype is not None:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def head(self, x):
        """Final norm + output projection -> logits in the model dtype."""
        return self.lm_head(self.final_norm(x))

    def hidden_states(self, input_ids, positions=None, attention_mask=None, kv_cache: KVCache | None = None):
        B, T = input_ids.shape
        plan = getattr(kv_cache, "plan", None)
        if plan is not None:
            # Rows of different lengths (model.generate's slot cache): the cache knows each row's
            # positions and which keys it may see.
            if positions is not None or attention_mask is not None:
                raise ValueError("this kv_cache supplies the positions and the attention mask itself")
            positions, mask = plan(T)
        else:
            past = kv_cache.length if kv_cache is not None else 0
            if positions is None:
                if past + T > self.config.max_seq_len:
                    raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
                positions = torch.arange(past, past + T, device=input_ids.device) if past else None
            mask = build_attn_mask(attention_mask, T, past, input_ids.device)
        x = self.embed(input_ids, positions)
        cos, sin = self.rotary(positions, T, dtype=x.dtype)
        use_ckpt = (self.config.activation_checkpointing and self.training and kv_cache is None
                    and torch.is_grad_enabled())
        for i, block in enumerate(self.blocks):
            layer_cache = kv_cache.layer(i) if kv_cache is not None else None
            if use_ckpt:
                x = checkpoint(block, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, layer_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return x

    def forward(self, input_ids, targets=None, positions=None, attention_mask=None,
                kv_cache: KVCache | None = None, ignore_index: int = -100):
        """input_ids [B, T] -> float logits [B, T, V]; with `targets`, the mean loss instead (so a
        wrapper such as a DeepSpeed engine can run the loss inside its forward).

        positions [T] or [B, T] (default: after the cached ones); attention_mask [B, past + T] with
        0 at padding; kv_cache: a `KVCache` to read and extend (see `new_kv_cache`), or another
        object of the same protocol (see `KVCache`)."""
        logits = self.head(self.hidden_states(input_ids, positions, attention_mask, kv_cache))
        if targets is not None:
            # Logits stay in the model dtype: the op upcasts, which lets a fused kernel avoid
            # materialising float32 logits.
            return self.ops.cross_entropy(logits, targets, ignore_index=ignore_index)
        return logits.float()

    def loss(self, input_ids, targets, ignore_index: int = -100):
        """Mean cross-entropy over targets != ignore_index."""
        return self(input_ids, targets, ignore_index=ignore_index)

    # ---- generation ----------------------------------------------------------------------------

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        c = self.config
        # The kv heads the attention modules hold (a model split over processes holds fewer).
        n_kv_head = self.blocks[0].attn.n_kv_head if len(self.blocks) else c.n_kv_head
        return KVCache(c.n_layer, batch_size, n_kv_head, max_len or c.max_seq_len, c.head_dim,
                       device=self.tok_emb.weight.device)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, attention_mask=None,
                 generator: torch.Generator | None = None):
        """Sample up to `max_new_tokens` tokens after each prompt, with a key/value cache.

        input_ids: [B, T] left-padded tensor (with `attention_mask`, 0 at padding), a 1-D tensor,
        or a list of token lists of any lengths. temperature 0 = greedy; top_k and top_p (nucleus)
        filter before sampling (`model.generate.sample_next`). A sequence stops at `eos_id`; generation stops when
        all sequences have finished. `generator` (default: torch's) draws the whole batch with one
        multinomial call per step, rows that already finished included, so a seeded call gives the
        tokens of the static batch decoder this method used to be.

        Returns a tensor [B, T + n_generated] (prompt + generated, still left padded, finished rows
        padded with eos) for tensor input, or a list of token lists (prompt + generated up to the
        first eos, no padding) for list input. Runs on `model.generate.DecodeEngine`, each row at
        its own positions without padding."""
        as_list = isinstance(input_ids, (list, tuple))
        device = self.tok_emb.weight.device
        if as_list:
            if attention_mask is not None:
                raise ValueError("attention_mask is only accepted with a tensor input_ids")
            if len(input_ids) == 0:
                raise ValueError("empty batch of prompts")
            prompts = [[int(t) for t in p] for p in input_ids]
            T = max(len(p) for p in prompts)
            if min(len(p) for p in prompts) == 0:
                raise ValueError("generate needs non-empty prompts")
        else:
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
                attention_mask = attention_mask[None] if attention_mask is not None else None
            input_ids = input_ids.to(device)
            B, T = input_ids.shape
            if T == 0:
                raise ValueError("generate needs non-empty prompts")
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        if not as_list:
            if max_new_tokens <= 0:
                return input_ids
            if attention_mask is None:
                attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {(B, T)}")
            if not attention_mask[:, -1].all() or (attention_mask[:, 1:].int() < attention_mask[:, :-1].int()).any():
                raise ValueError("generate needs left padding: attention_mask must be 0...0 1...1 per row")
            prompts = [row[m].tolist() for row, m in zip(input_ids, attention_mask)]
        elif max_new_tokens <= 0:
            return prompts

        B = len(prompts)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                max_new_tokens=max_new_tokens)
        engine = DecodeEngine(self, max_slots=B, max_len=max(T + max_new_tokens, 2))
        slots = list(range(B))
        gen: list[list[int]] = [[] for _ in slots]
        done = [False] * B
        released: set[int] = set()
        outs = engine.prefill(prompts, slots, params)
        for step in range(max_new_tokens):
            for o in outs:
                if not done[o.slot]:
                    gen[o.slot].append(o.token)
                    done[o.slot] = o.token == eos_id
            if step == max_new_tokens - 1 or all(done):
                break
            if temperature == 0:  # finished rows drop out; sampled ones keep their place in the draw
                for s in slots:
                    if done[s] and s not in released:
                        engine.release(s)
                        released.add(s)
                outs = engine.decode([s for s in slots if not done[s]])
            else:
                outs = engine.decode(slots)
        if as_list:
            return [p + g for p, g in zip(prompts, gen)]
        n = max(len(g) for g in gen)
        pad = eos_id if eos_id is not None else 0  # without eos every row has n tokens
        new = torch.tensor([g + [pad] * (n - len(g)) for g in gen], dtype=torch.long, device=device)
        return torch.cat([input_ids, new], dim=1)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, device=None):
    """List of token lists -> (ids [B, T], attention_mask [B, T] bool), padded on the left."""
    if len(seqs) == 0:
        raise ValueError("empty batch of prompts")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long, device=device)
            mask[i, T - len(s):] = True
    return ids, mask
