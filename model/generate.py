"""Batched decoding over a slot-based key/value cache: continuous batching for RL rollouts and serving.

    engine = DecodeEngine(model, max_slots=8)                # max_len defaults to max_seq_len
    outs = engine.prefill([[5, 17, 33], [11]], slots=[0, 1],
                          params=[SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_new_tokens=32),
                                  SamplingParams(temperature=0, max_new_tokens=4, eos_ids=(2,))])
    outs = engine.decode([0, 1])                             # one more token for each of these slots
    engine.release(1)                                        # slot 1 is free for the next request

    completions = engine.generate(prompts, params)          # or the whole loop, continuously batched

The cache holds `max_slots` rows of `max_len` positions per layer ([S, n_kv_head, max_len,
head_dim], allocated on the first write in the dtype of the computed keys) and a length per row.
A request lives in one slot from `prefill` to `release`; rows join and leave between steps, and
each row keeps its own positions 0..len-1 (no padding inside the cache), so a request's logits are
those of that request decoded alone, whatever shares the batch.

Sampling (`SamplingParams`, per row): temperature 0 is greedy (argmax); otherwise the token is
drawn from softmax(logits / temperature) restricted to the top-k tokens and then to the nucleus of
mass top_p, renormalised (the filters of `sample_next`). `StepOutput.logprob` (log-probability of
the emitted token) and `StepOutput.entropy` (exact: -sum p log p over the whole vocabulary, in
float32 from float32 logits) refer to that sampled distribution; for greedy rows they refer to
softmax(logits) at temperature 1 with no filter. Logits are the model's float32 logits.

Random numbers: a row with `seed` gets its own CPU `torch.Generator` and draws by inversion (one
uniform number per token), so its tokens do not depend on which other rows share a step, nor on
the device. Rows given one `generator` object (or neither, meaning torch's default generator) draw
together: one `torch.multinomial` call per step over those rows in the order of the slots passed,
the draws of a static batch decoder (`GPT.generate` relies on it).

Adapters (per request): `prefill(..., adapters=)`, `stream`/`generate(..., adapters=)` take one
name (or None) per prompt, kept with the request in its slot. A forward whose rows name at least one
adapter runs inside `row_context(names of its rows, in batch order)`, a context manager the model
supplies as `model.row_adapter_context` (agents.lora.add_adapters sets it) or the caller passes as
`row_context=`: the model then applies each row's own adapter in the one batched forward (None: the
base). A forward whose rows name none runs as without adapters, so a request without one gets
whatever the model computes by itself (the base, or the adapter of an enclosing
`agents.lora.use_adapter`). The engine imports nothing of the adapters.

Prefix cache (`prefix_cache=True`: a budget of max_slots * max_len tokens, or a number of tokens;
off by default): the keys and values of whole blocks of `prefix_block` tokens of earlier sequences
(prompts at prefill, prompt + generated tokens at release) are kept in a `PrefixCache`, keyed by the
block's tokens, everything before them and the row's adapter name. A prompt that starts with cached
blocks gets them copied into its slot and prefills only the rest (at least its last token), in a
second forward after the prompts without a hit, so those run exactly as with the cache off. A hit's
logits equal a cold prefill's within float32 rounding (its new tokens attend through a mask, not
the causal kernel), not bit for bit, which is why the cache is off unless asked for (serving turns
it on; RL rollouts and `GPT.generate` keep it off). Keys are only valid for the weights that made
them: a change of any parameter or buffer (its version counter or storage) clears the cache. A row's
adapter is its name in `adapters=`: a caller that switches adapters around the engine (an enclosing
`agents.lora.use_adapter`) must keep the cache off.

Tensor parallelism: the engine gathers the vocabulary-sharded logits with `gather_logits` (by
default the head's own `lm_head.gather_logits` when it has one), so every rank samples from the
full distribution and, with the same seeds, emits the same tokens. The kv heads per layer are the
ones the attention modules hold (fewer per rank). Sequence parallelism cannot split steps of one
token and is refused.
"""

from __future__ import annotations

import contextlib
import operator
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .prefix_cache import PrefixCache

__all__ = ["Completion", "DecodeEngine", "SamplingParams", "SlotKVCache", "StepOutput", "filter_logits",
           "sample_next", "sample_tokens"]


# --------------------------------------------------------------------------------------------------
# Sampling.


def filter_logits(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """float32 logits / temperature with the tokens outside top-k, then outside the nucleus of mass
    top_p, set to -inf; softmax of the result is the distribution sampled from. temperature > 0."""
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the top one always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None):
    """Next token ids [B] from logits [B, V]: argmax for temperature 0, else one multinomial draw
    per row from softmax(filter_logits(...))."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class SamplingParams:
    """How one request is decoded.

    temperature: 0 = greedy, else > 0. top_k: keep the k most likely tokens (None or 0: all).
    top_p: keep the smallest head of the sorted distribution whose mass reaches top_p (None or 1:
    all), in (0, 1]. seed: the row's own torch.Generator; generator: an explicit generator (rows
    sharing one draw in one call); neither: torch's default generator. max_new_tokens: at most
    that many generated tokens (>= 1). eos_ids / stop_ids: tokens that end the request (kept as
    its last token) with finish reason "eos" / "stop"."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    max_new_tokens: int = 16
    eos_ids: Sequence[int] = ()
    stop_ids: Sequence[int] = ()
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: no limit), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and self.generator is not None:
            raise ValueError("give a seed or a generator, not both")
        self.eos_ids = (self.eos_ids,) if isinstance(self.eos_ids, int) else tuple(self.eos_ids)
        self.stop_ids = (self.stop_ids,) if isinstance(self.stop_ids, int) else tuple(self.stop_ids)


def sample_tokens(logits, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]):
    """One token per row of logits [B, V] under params[i], drawing with generators[i].

    A row whose params have a seed draws by inversion: one uniform number from its own (CPU)
    generator, looked up in the row's cumulative distribution (float64), so a draw costs one random
    number and depends on nothing else in the batch. The other sampled rows draw with
    `torch.multinomial`, one call per distinct generator (None: torch's default) over its rows in
    batch order, exactly as a static batch decoder calling `sample_next` would.

    Returns (tokens [B] long, logprobs [B], entropies [B]) on the logits' device, the last two
    float32, under the distribution each row was sampled from (see the module docstring)."""
    logits = logits.float()
    B, V = logits.shape
    dev = logits.device
    filters: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        key = (0.0, None, None) if p.temperature == 0 else (float(p.temperature), p.top_k, p.top_p)
        filters.setdefault(key, []).append(i)

    def select(idx):  # None for the whole batch: its ops are then exactly those of one sample_next call
        return None if len(idx) == B else torch.tensor(idx, device=dev)

    def put(dst, sel, value, fill):
        if sel is None:
            return value
        if dst is None:
            dst = torch.full((B,) + value.shape[1:], fill, dtype=value.dtype, device=dev)
        dst[sel] = value
        return dst

    dist = probs = None  # dist: logits of the reported distributions; probs: of the sampled rows
    for key, idx in filters.items():
        sel = select(idx)
        sub = logits if sel is None else logits[sel]
        filtered = sub if key[0] == 0 else filter_logits(sub, *key)
        if key[0] != 0:
            probs = put(probs, sel, filtered.softmax(dim=-1), 0.0)
        dist = put(dist, sel, filtered, 0.0)
    # A greedy row's dist is its raw logits: its token is the (first) maximum found here.
    peak, tokens = dist.max(dim=-1, keepdim=True)
    tokens = tokens.squeeze(1)

    inversion: list[int] = []
    shared: dict[int, tuple[torch.Generator | None, list[int]]] = {}
    for i, p in enumerate(params):
        if p.temperature == 0:
            continue
        if p.seed is not None:
            inversion.append(i)
        else:
            g = generators[i]
            shared.setdefault(id(g), (g, []))[1].append(i)
    if inversion:
        sel = select(inversion)
        u = torch.tensor([float(torch.rand((), generator=generators[i])) for i in inversion],
                         dtype=torch.float64, device=dev)
        cdf = (probs if sel is None else probs[sel]).double().cumsum(dim=-1)
        # right=True: the first token whose cumulative mass exceeds u * total, never one of mass 0.
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp_(max=V - 1)
        tokens = put(tokens, sel, pick, 0)
    for g, idx in shared.values():
        sel = select(idx)
        draw = torch.multinomial(probs if sel is None else probs[sel], 1, generator=g).squeeze(-1)
        tokens = put(tokens, sel, draw, 0)

    # One pass of exp: with z = dist - max and s = sum(exp z), log p = z - log s and the entropy
    # -sum p log p = log s - sum(exp(z) z) / s. z is clamped at -87, where exp(z) is still a
    # normal float: denormal results slow exp down several times, and filtered tokens (-inf) then
    # weigh ~1e-38 instead of 0, far below float32 resolution.
    z = (dist - peak).clamp_(min=-87.0)
    e = z.exp()
    s = e.sum(dim=-1)
    log_s = s.log()
    token_logp = z.gather(1, tokens[:, None]).squeeze(1) - log_s
    entropy = log_s - torch.linalg.vecdot(e, z) / s
    return tokens, token_logp, entropy


# --------------------------------------------------------------------------------------------------
# The cache.


_SDPA_GQA: dict[tuple, bool] = {}


def _sdpa_gqa_with_mask(k: torch.Tensor) -> bool:
    """Whether a fused SDPA kernel takes grouped kv heads together with a boolean mask for keys
    like `k` (CPU flash attention does; CUDA's memory-efficient kernel, the one masks get, does
    not, and the math fallback would repeat the heads anyway, only slower)."""
    key = (k.device.type, k.dtype, k.shape[-1])
    if key not in _SDPA_GQA:
        try:
            q = torch.zeros(1, 2, 1, k.shape[-1], device=k.device, dtype=k.dtype)
            kv = torch.zeros(1, 1, 2, k.shape[-1], device=k.device, dtype=k.dtype)
            mask = torch.ones(1, 1, 1, 2, device=k.device, dtype=torch.bool)
            choice = torch._fused_sdp_choice(q, kv, kv, mask, 0.0, False, enable_gqa=True)
            _SDPA_GQA[key] = int(choice) != int(torch.nn.attention.SDPBackend.MATH)
        except Exception:  # a private API: without it, trust the CPU kernel only
            _SDPA_GQA[key] = k.device.type == "cpu"
    return _SDPA_GQA[key]


class SlotKVCache:
    """Keys and values of `n_slots` rows x `max_len` positions per layer, with a length per row.

    The model's cache protocol (see `GPT.hidden_states`): before a forward the owner calls
    `select(rows, new_lengths, prefill)`; the model then calls `plan(T)` for the positions and the
    attention mask of the step, `layer(i).update(k, v)` in every layer and `advance(T)` at the end,
    which commits the new lengths.  A prefill step of fresh rows (length 0) writes right-padded
    prompts and attends causally over its own keys only (padding comes after every real query, so
    no mask is needed); a prefill step of rows that already hold a prefix (copied in from a
    `PrefixCache`) writes each row's new tokens after its prefix, at positions length.., and
    attends with a mask [B, 1, T, L] (query t of row b sees keys 0..length_b + t); a decode step
    adds one token per row at that row's length and attends over keys 0..length with a key-padding
    mask [B, 1, 1, L]."""

    def __init__(self, n_layer: int, n_slots: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=None):
        self.shape = (n_slots, n_kv_head, max_len, head_dim)
        self.device, self.dtype = device, dtype
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.lengths = [0] * n_slots
        self.sdpa_enable_gqa = False
        self._layers = [_SlotLayer(self, i) for i in range(n_layer)]
        self._rows: list[int] = []
        self._new: list[int] = []

    def select(self, rows: Sequence[int], new_lengths: Sequence[int], prefill: bool) -> None:
        """Rows (in batch order) and their lengths after the next forward. A prefill continues each
        row from its current length: 0 for a fresh row, the length of a cached prefix copied into it
        (`extend`: then its new tokens see the row's earlier keys)."""
        rows, dev = list(rows), self.device
        self._rows, self._new, self._prefill = rows, list(new_lengths), prefill
        # A contiguous block of rows is read (and written) through views of the cache instead of
        # gathered copies and index writes.
        first, n = rows[0], len(rows)
        self._block = slice(first, first + n) if rows == list(range(first, first + n)) else None
        self._rows_t = torch.tensor(rows, device=dev) if self._block is None else None
        self._extend = None
        if prefill:
            starts = [self.lengths[r] for r in rows]
            if any(starts):
                self._extend = starts
                self._L = max(self._new)
            return
        starts = [self.lengths[r] for r in rows]
        self._starts = torch.tensor(starts, device=dev)
        self._L = max(starts) + 1
        # Rows of one length in a block: the new keys form one slice of the cache.
        self._column = starts[0] if self._block is not None and min(starts) == self._L - 1 else None
        if self._column is None:
            # Where each row's new key goes in a layer's cache seen as [S * Hkv * max_len, D]: whole
            # head_dim rows copied by index_copy_ (an elementwise index_put_ was slower).
            S, H, L, D = self.shape
            rows_t = self._rows_t if self._rows_t is not None else torch.arange(first, first + n, device=dev)
            heads = torch.arange(H, device=dev)
            self._flat = ((rows_t[:, None] * H + heads) * L + self._starts[:, None]).reshape(-1)

    def plan(self, T: int):
        """(positions, attention mask) of the selected step: (None, None) for a prefill (positions
        0..T-1, causal), else ([B, 1] lengths, [B, 1, 1, L] keys 0..length)."""
        if self._prefill:
            if self._extend is None:
                return None, None
            # Row b's query t is position starts[b] + t and sees keys 0..that position. Queries past
            # a row's prompt (right padding) are discarded; their positions are clamped into the
            # tables and they see at most the L keys returned.
            pos = torch.tensor(self._extend, device=self.device)[:, None] + torch.arange(T, device=self.device)
            mask = torch.arange(self._L, device=self.device)[None, None, :] <= pos[:, :, None]
            return pos.clamp(max=self.max_len - 1), mask[:, None]
        if T != 1:
            raise ValueError(f"a decode step takes one token per row, got {T}")
        mask = torch.arange(self._L, device=self.device)[None, :] <= self._starts[:, None]
        return self._starts[:, None], mask[:, None, None, :]

    def layer(self, i: int) -> _SlotLayer:
        return self._layers[i]

    def advance(self, T: int) -> None:
        for r, n in zip(self._rows, self._new):
            self.lengths[r] = n

    def move(self, src: int, dst: int) -> None:
        """Copy row src to row dst (and its length); src becomes empty."""
        n = self.lengths[src]
        for K, V in zip(self.k, self.v):
            if K is not None:
                K[dst, :, :n] = K[src, :, :n]
                V[dst, :, :n] = V[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def _update(self, i: int, k, v):
        if self.k[i] is None:
            dtype, device = self.dtype or k.dtype, self.device or k.device
            self.k[i] = torch.zeros(self.shape, dtype=dtype, device=device)
            self.v[i] = torch.zeros(self.shape, dtype=dtype, device=device)
            self.sdpa_enable_gqa = _sdpa_gqa_with_mask(self.k[i])
        K, V = self.k[i], self.v[i]
        if self._prefill and self._extend is not None:
            # Each row's new keys go after its cached prefix (their own lengths: no padding stored).
            for b, (r, start, end) in enumerate(zip(self._rows, self._extend, self._new)):
                K[r, :, start:end] = k[b, :, :end - start]
                V[r, :, start:end] = v[b, :, :end - start]
            L = self._L
            if self._block is not None:
                return K[self._block, :, :L], V[self._block, :, :L]
            return K[:, :, :L].index_select(0, self._rows_t), V[:, :, :L].index_select(0, self._rows_t)
        if self._prefill:
            T = k.shape[2]
            if self._block is not None:
                K[self._block, :, :T] = k
                V[self._block, :, :T] = v
            else:
                K[self._rows_t, :, :T] = k
                V[self._rows_t, :, :T] = v
            return k, v
        if self._column is not None:
            c = self._column
            K[self._block, :, c:c + 1] = k
            V[self._block, :, c:c + 1] = v
        else:
            D = self.shape[-1]
            K.view(-1, D).index_copy_(0, self._flat, k[:, :, 0].reshape(-1, D).to(K.dtype))
            V.view(-1, D).index_copy_(0, self._flat, v[:, :, 0].reshape(-1, D).to(V.dtype))
        L = self._L
        if self._block is not None:
            return K[self._block, :, :L], V[self._block, :, :L]
        return K[:, :, :L].index_select(0, self._rows_t), V[:, :, :L].index_select(0, self._rows_t)


class _SlotLayer:
    """One layer's view of a `SlotKVCache` (what `Attention` receives)."""

    def __init__(self, cache: SlotKVCache, index: int):
        self.cache, self.index = cache, index

    @property
    def sdpa_enable_gqa(self) -> bool:
        return self.cache.sdpa_enable_gqa

    def update(self, k, v):
        """Store this step's k, v [B, Hkv, T, D]; return the keys and values to attend over."""
        return self.cache._update(self.index, k, v)


# --------------------------------------------------------------------------------------------------
# The engine.


@dataclass
class StepOutput:
    """One new token of the request in `slot`: its log-probability and the entropy of the
    distribution it came from (see the module docstring); `finished` with `finish_reason` "eos",
    "stop" or "length" (max_new_tokens reached, or the sequence fills max_len)."""

    slot: int
    token: int
    logprob: float
    entropy: float
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class Completion:
    """A finished request of `DecodeEngine.generate`: the generated tokens (a final eos/stop token
    included) with their log-probabilities and entropies, and why it ended."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    entropies: list[float]
    finish_reason: str


@dataclass
class _Request:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_len: int
    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)  # prompt + generated: what the prefix cache keeps
    prefilling: bool = False  # admitted, prompt not fully computed (chunked prefill)
    last: int = -1  # sampled, not yet in the cache
    n_generated: int = 0
    finished: bool = False
    finish_reason: str | None = None


class _Inference:
    """Eval mode and no gradients for one engine call; the caller's training mode comes back."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        if self.was_training:
            self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        if self.was_training:
            self.model.train()


class DecodeEngine:
    """Continuous-batching decoder of a `GPT` over a `SlotKVCache` of `max_slots` requests.

    max_len: positions per slot (default and maximum: the model's max_seq_len); a request's
    prompt plus generated tokens never exceed it. gather_logits: maps this process's logits
    [B, V_local] to full-vocabulary logits [B, V] (default: `model.lm_head.gather_logits` when the
    head has one, else identity). row_context: names -> context manager in which the model applies
    one adapter per row (default: `model.row_adapter_context` when it has one; see the module
    docstring). The model is run in eval mode and without gradients; its training mode is restored
    after every call.

    Steps: `prefill(prompts, slots, params)` starts requests in free slots and returns their first
    tokens; `decode(slots)` adds one token to each given running slot; `release(slot)` frees a
    slot (a finished request stays in its slot until then). Loops: `stream(prompts, params)`
    yields (prompt index, StepOutput) with continuous batching; `generate(prompts, params)` returns
    Completions. State: `free_slots()`, `running_slots()`, `length(slot)`. Bad input (an empty or
    too long prompt, a token outside the vocabulary, an unknown, busy, free or finished slot, no
    free slot) raises ValueError before anything changes.

    prefix_cache: False (default), True (a budget of max_slots * max_len tokens) or a budget in
    tokens; prefix_block: tokens per cached block (see the module docstring). `prefix_stats()`
    reports its counters.

    Chunked prefill: `admit(prompts, slots, params)` takes slots without a forward (only the prefix
    cache's copies); `prefill_step(max_tokens)` then computes at most max_tokens of the admitted
    prompts' remaining tokens in one forward (oldest first) and returns the first tokens of the
    prompts it completed; between such steps the running rows keep decoding. A chunk continues a row
    from its length like a prefix-cache hit (masked, float32 rounding from a whole prefill).
    `stream`/`generate(..., prefill_chunk=N)` run the loop that way.

    Attention: a prefill runs its prompts right-padded in one causal forward (padding never precedes
    a real token, so no mask is needed); a decode step attends over each row's keys 0..length
    with a key-padding mask [B, 1, 1, L], L the longest row, and the grouped kv heads go to SDPA
    as they are (enable_gqa) where a fused kernel takes them with a mask."""

    def __init__(self, model, max_slots: int, max_len: int | None = None,
                 gather_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 row_context: Callable[[list[str | None]], Any] | None = None,
                 prefix_cache: bool | int = False, prefix_block: int = 16):
        cfg = model.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if not 2 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be in [2, max_seq_len={cfg.max_seq_len}], got {max_len}")
        tp = getattr(model.lm_head, "tp", None)
        if getattr(tp, "sequence_parallel", False):
            raise ValueError("decoding needs sequence_parallel=False: its steps of sequence length 1 cannot "
                             "be split over the tensor-parallel ranks")
        self.model = model
        self.max_slots, self.max_len = max_slots, max_len
        self.vocab_size = cfg.vocab_size
        self.gather_logits = gather_logits or getattr(model.lm_head, "gather_logits", None) or (lambda x: x)
        self.row_context = row_context or getattr(model, "row_adapter_context", None)
        self.device = model.tok_emb.weight.device
        attn = model.blocks[0].attn  # the kv heads this process holds (fewer per tensor-parallel rank)
        self.cache = SlotKVCache(len(model.blocks), max_slots, attn.n_kv_head, max_len, attn.head_dim,
                                 device=self.device)
        self._requests: list[_Request | None] = [None] * max_slots
        # Slots are the caller's ids; rows are cache rows, kept packed in 0..n-1 (release moves the
        # last row into the hole) so that a step over every busy slot reads one view of the cache.
        self._row_of: dict[int, int] = {}
        self._slot_of: list[int] = []
        if isinstance(prefix_cache, bool):
            capacity = max_slots * max_len if prefix_cache else 0
        elif isinstance(prefix_cache, int) and prefix_cache >= 0:
            capacity = prefix_cache
        else:
            raise ValueError(f"prefix_cache is True, False or a number of tokens >= 0, got {prefix_cache!r}")
        self.prefix = PrefixCache(len(model.blocks), capacity, prefix_block) if capacity else None
        self._weights_stamp: tuple | None = None
        self._prefilling: list[int] = []  # admitted slots whose prompt is not computed yet, oldest first
        self._watched: list[torch.Tensor] | None = None

    # ---- state ---------------------------------------------------------------------------------

    def free_slots(self) -> list[int]:
        """Slots that hold no request, in increasing order."""
        return [s for s, r in enumerate(self._requests) if r is None]

    def running_slots(self) -> list[int]:
        """Slots whose request has not finished, in increasing order."""
        return [s for s, r in enumerate(self._requests) if r is not None and not r.finished and not r.prefilling]

    def length(self, slot: int) -> int:
        """Tokens of the slot's sequence so far (prompt + generated)."""
        r = self._request(slot)
        return r.prompt_len + r.n_generated

    def prefix_stats(self) -> dict | None:
        """The prefix cache's counters (`PrefixStats.as_dict`) and blocks held / budget; None when off."""
        if self.prefix is None:
            return None
        return {**self.prefix.stats.as_dict(), "blocks": len(self.prefix), "capacity_blocks": self.prefix.n_blocks,
                "block_size": self.prefix.block_size}

    def release(self, slot: int) -> None:
        """Free the slot (finished or not) for another request; with the prefix cache on, the whole
        blocks of its sequence so far (prompt and generated tokens in the cache) are kept first."""
        r = self._request(slot)
        if self.prefix is not None:
            row = self._row_of[slot]
            self.prefix.store(self.cache, row, r.tokens[:self.cache.lengths[row]], r.adapter)
        if r.prefilling:
            self._prefilling.remove(slot)
        row, last = self._row_of.pop(slot), len(self._slot_of) - 1
        moved = self._slot_of.pop()
        if row != last:
            self.cache.move(last, row)
            self._slot_of[row] = moved
            self._row_of[moved] = row
        else:
            self.cache.lengths[row] = 0
        self._requests[slot] = None

    # ---- steps ---------------------------------------------------------------------------------

    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int] | None = None,
                params: SamplingParams | Sequence[SamplingParams] | None = None,
                adapters: Sequence[str | None] | None = None) -> list[StepOutput]:
        """Start requests: each prompt (a non-empty token list shorter than max_len) into a free
        slot (default: the lowest free ones); params: one for all or one per prompt (default:
        `SamplingParams()`); adapters: one adapter name (or None) per prompt, kept for the request's
        whole life (default: none). Runs the prompts as one right-padded batch and returns each one's
        first token, in the order given."""
        n = len(prompts)
        if n == 0:
            return []
        prompts, slots, params, adapters = self._claim(prompts, slots, params, adapters)
        reuse = self._lookup(prompts, adapters)
        # Prompts without a cached prefix run first, as one plain causal forward (exactly as with the
        # cache off), then those with one, as one forward over their new tokens; rows stay packed.
        cold = [i for i in range(n) if not reuse[i][1]]
        warm = [i for i in range(n) if reuse[i][1]]
        base = len(self._slot_of)
        row_of = {i: base + k for k, i in enumerate(cold + warm)}
        logits: list[torch.Tensor | None] = [None] * n
        try:
            with _Inference(self.model):
                for group in (cold, warm):
                    if group:
                        out = self._prefill_rows([prompts[i] for i in group], [row_of[i] for i in group],
                                                 [reuse[i] for i in group], [adapters[i] for i in group])
                        for k, i in enumerate(group):
                            logits[i] = out[k]
        except BaseException:
            for row in row_of.values():  # the engine takes a slot only once every forward succeeded
                self.cache.lengths[row] = 0
            raise
        logits = logits[0][None] if n == 1 else torch.stack(logits)
        for i, (s, p, prompt, a) in enumerate(zip(slots, params, prompts, adapters)):
            gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else p.generator
            self._requests[s] = _Request(p, gen, len(prompt), a, tokens=list(prompt))
            self._row_of[s] = row_of[i]
        self._slot_of.extend(slots[i] for i in cold + warm)
        if self.prefix is not None:
            for i in range(n):
                self.prefix.store(self.cache, row_of[i], prompts[i], adapters[i])
        return self._emit(slots, logits)

    def admit(self, prompts: Sequence[Sequence[int]], slots: Sequence[int] | None = None,
              params: SamplingParams | Sequence[SamplingParams] | None = None,
              adapters: Sequence[str | None] | None = None) -> list[int]:
        """Chunked prefill, first half: take slots for `prompts` (arguments as in `prefill`) without
        running anything but the prefix cache's copies; the prompts are then computed by
        `prefill_step` calls, a bounded number of tokens at a time, between decode steps of the
        running rows. Returns the slots, in the order given. A slot admitted but not yet prefilled is
        neither free nor running (`prefilling_slots()`); `release` frees it like any other."""
        if not prompts:
            return []
        prompts, slots, params, adapters = self._claim(prompts, slots, params, adapters)
        reuse = self._lookup(prompts, adapters)
        base = len(self._slot_of)
        for k, (s, p, prompt, a, (blocks, reused)) in enumerate(zip(slots, params, prompts, adapters, reuse)):
            row = base + k
            if reused:
                self.prefix.load(self.cache, row, blocks)
                self.cache.lengths[row] = reused
            gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else p.generator
            self._requests[s] = _Request(p, gen, len(prompt), a, tokens=list(prompt), prefilling=True)
            self._row_of[s] = row
            self._slot_of.append(s)
            self._prefilling.append(s)
        return slots

    def prefilling_slots(self) -> list[int]:
        """Slots admitted by `admit` whose prompt is not fully computed yet, in admission order."""
        return list(self._prefilling)

    def prefill_step(self, max_tokens: int | None = None) -> list[StepOutput]:
        """Chunked prefill, second half: one forward over at most `max_tokens` (None: all) of the
        admitted prompts' remaining tokens, oldest admission first (a prompt longer than the budget
        goes on where it stopped next time). Returns the first token of each prompt that this step
        completed, in admission order. If the forward fails, nothing advances (the rows can be
        released, or the step retried)."""
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (None: no limit), got {max_tokens}")
        budget = float("inf") if max_tokens is None else max_tokens
        chosen = []  # (slot, row, start, new tokens)
        for s in self._prefilling:
            if budget <= 0:
                break
            row = self._row_of[s]
            start = self.cache.lengths[row]
            n = int(min(self._requests[s].prompt_len - start, budget))
            budget -= n
            chosen.append((s, row, start, n))
        if not chosen:
            return []
        reqs = [self._requests[s] for s, _, _, _ in chosen]
        T = max(n for _, _, _, n in chosen)
        ids = torch.tensor([r.tokens[start:start + n] + [0] * (T - n) for r, (_, _, start, n) in zip(reqs, chosen)],
                           dtype=torch.long, device=self.device)
        done = [b for b, (r, (_, _, start, n)) in enumerate(zip(reqs, chosen)) if start + n == r.prompt_len]
        rows = [row for _, row, _, _ in chosen]
        try:
            with _Inference(self.model), self._rows_context([r.adapter for r in reqs]):
                self.cache.select(rows, [start + n for _, _, start, n in chosen], prefill=True)
                h = self.model.hidden_states(ids, kv_cache=self.cache)
                logits = None
                if done:
                    last = torch.tensor([chosen[b][3] - 1 for b in done], device=self.device)
                    logits = self._logits(h[torch.tensor(done, device=self.device), last][:, None])
        except BaseException:
            for _, row, start, _ in chosen:
                self.cache.lengths[row] = start
            raise
        slots = [chosen[b][0] for b in done]
        for s in slots:
            self._requests[s].prefilling = False
            self._prefilling.remove(s)
            if self.prefix is not None:
                r = self._requests[s]
                self.prefix.store(self.cache, self._row_of[s], r.tokens, r.adapter)
        return self._emit(slots, logits) if slots else []

    def _claim(self, prompts, slots, params, adapters):
        """Checked (prompts, slots, params, adapters) of new requests; ValueError before any change."""
        n = len(prompts)
        params = self._params(params, n)
        adapters = self._adapters(adapters, n)
        if slots is None:
            free = self.free_slots()
            if len(free) < n:
                raise ValueError(f"no free slot: {n} prompts, {len(free)} of {self.max_slots} slots free")
            slots = free[:n]
        slots = [self._slot_id(s) for s in slots]
        if len(slots) != n:
            raise ValueError(f"{n} prompts but {len(slots)} slots")
        if len(set(slots)) != n:
            raise ValueError(f"a slot is given twice: {slots}")
        for s in slots:
            if self._requests[s] is not None:
                raise ValueError(f"slot {s} is in use; release it first (free: {self.free_slots()})")
        prompts = [self._check_prompt(i, p) for i, p in enumerate(prompts)]
        return prompts, slots, params, adapters

    def _lookup(self, prompts, adapters) -> list[tuple[list[int], int]]:
        """Per prompt: (prefix-cache blocks to copy, prompt tokens they cover and need no forward).
        At least the last prompt token is always computed: its logits give the first token."""
        if self.prefix is None:
            return [([], 0)] * len(prompts)
        self._check_weights()
        out = []
        stats, bs = self.prefix.stats, self.prefix.block_size
        for prompt, adapter in zip(prompts, adapters):
            blocks = self.prefix.match(prompt, adapter)
            reused = min(len(blocks) * bs, len(prompt) - 1)
            out.append((blocks, reused) if reused > 0 else ([], 0))
            stats.lookups += 1
            stats.prompt_tokens += len(prompt)
            stats.hits += reused > 0
            stats.hit_tokens += max(reused, 0)
        return out

    def _check_weights(self) -> None:
        """Cached keys belong to the weights that computed them: any change to a parameter or buffer
        in place (an optimizer step, load_state_dict, copy_: its version counter) or of its storage
        clears the prefix cache. The tensors are listed once, at the first lookup (walking the modules
        costs ~1 ms a prefill): parameters added to the model later are not watched."""
        if self._watched is None:
            self._watched = [*self.model.parameters(), *self.model.buffers()]
        stamp = tuple((t._version, t.data_ptr()) for t in self._watched)
        if stamp != self._weights_stamp:
            if self._weights_stamp is not None and len(self.prefix):
                self.prefix.clear()
            self._weights_stamp = stamp

    def _prefill_rows(self, prompts, rows, reuse, adapters) -> torch.Tensor:
        """One forward of `prompts` into the fresh cache rows `rows` after their cached prefixes
        (reuse: (blocks, tokens) per prompt, copied in first); their last positions' logits [n, V]."""
        starts = [r for _, r in reuse]
        for row, (blocks, reused) in zip(rows, reuse):
            if reused:
                self.prefix.load(self.cache, row, blocks)
                self.cache.lengths[row] = reused
        lens = [len(p) for p in prompts]
        T = max(length - start for length, start in zip(lens, starts))
        ids = torch.tensor([p[start:] + [0] * (T - len(p) + start) for p, start in zip(prompts, starts)],
                           dtype=torch.long, device=self.device)
        with self._rows_context(adapters):
            self.cache.select(rows, lens, prefill=True)
            h = self.model.hidden_states(ids, kv_cache=self.cache)
            last = torch.tensor([length - start - 1 for length, start in zip(lens, starts)], device=self.device)
            return self._logits(h[torch.arange(len(prompts), device=self.device), last][:, None])

    def decode(self, slots: Sequence[int] | None = None) -> list[StepOutput]:
        """One token for each given running slot (default: every running slot), in the order given."""
        slots = self.running_slots() if slots is None else [self._slot_id(s) for s in slots]
        if not slots:
            return []
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot is given twice: {slots}")
        for s in slots:
            r = self._request(s)
            if r.finished:
                raise ValueError(f"slot {s} has finished ({r.finish_reason}); release it")
            if r.prefilling:
                raise ValueError(f"slot {s} is still prefilling its prompt (prefill_step)")
        order = sorted(range(len(slots)), key=lambda i: self._row_of[slots[i]])
        rows = [self._row_of[slots[i]] for i in order]
        reqs = [self._requests[slots[i]] for i in order]
        ids = torch.tensor([[r.last] for r in reqs], dtype=torch.long, device=self.device)
        with _Inference(self.model), self._rows_context([r.adapter for r in reqs]):
            self.cache.select(rows, [self.cache.lengths[row] + 1 for row in rows], prefill=False)
            logits = self._logits(self.model.hidden_states(ids, kv_cache=self.cache))
        if order != sorted(order):  # back to the caller's order, which also orders shared draws
            inverse = [0] * len(order)
            for pos, i in enumerate(order):
                inverse[i] = pos
            logits = logits[torch.tensor(inverse, device=logits.device)]
        return self._emit(slots, logits)

    # ---- continuous batching ---------------------------------------------------------------------

    def stream(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None,
               adapters: Sequence[str | None] | None = None,
               prefill_chunk: int | None = None) -> Iterator[tuple[int, StepOutput]]:
        """Decode all prompts with continuous batching over the free slots: every step admits
        waiting requests (in order) into the free slots with one prefill, then advances every
        running request by one token; finished requests are released at once. Yields
        (index of the prompt, StepOutput) as tokens come. adapters: as in `prefill`.
        prefill_chunk: chunked prefill, at most that many prompt tokens per step (`admit` +
        `prefill_step`), so running rows keep decoding while long prompts come in."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 token (None: whole prompts), got {prefill_chunk}")
        params = self._params(params, len(prompts))
        adapters = self._adapters(adapters, len(prompts))
        prompts = [self._check_prompt(i, p) for i, p in enumerate(prompts)]
        waiting = deque(range(len(prompts)))
        owner: dict[int, int] = {}
        while waiting or owner:
            free = self.free_slots()
            if waiting and not free and not owner:
                raise ValueError(f"no free slot: all {self.max_slots} slots hold other requests")
            if waiting and free:
                take = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                batch = ([prompts[i] for i in take], free[:len(take)], [params[i] for i in take],
                         [adapters[i] for i in take])
                if prefill_chunk is None:
                    outs = self.prefill(*batch)
                    owner.update((o.slot, i) for o, i in zip(outs, take))
                    yield from self._retire(outs, owner)
                else:
                    owner.update(zip(self.admit(*batch), take))
            running = [s for s in sorted(owner) if not self._requests[s].prefilling]
            if self._prefilling:
                yield from self._retire(self.prefill_step(prefill_chunk), owner)
            if running:
                yield from self._retire(self.decode(running), owner)

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapters: Sequence[str | None] | None = None,
                 prefill_chunk: int | None = None) -> list[Completion]:
        """`stream` run to the end: one Completion per prompt, in the order given."""
        done = [Completion(list(p), [], [], [], "") for p in prompts]
        for i, o in self.stream(prompts, params, adapters, prefill_chunk):
            c = done[i]
            c.tokens.append(o.token)
            c.logprobs.append(o.logprob)
            c.entropies.append(o.entropy)
            if o.finished:
                c.finish_reason = o.finish_reason
        return done

    # ---- internals -----------------------------------------------------------------------------

    def _retire(self, outs, owner):
        for o in outs:
            yield owner[o.slot], o
            if o.finished:
                self.release(o.slot)
                del owner[o.slot]

    def _logits(self, h):
        """Float32 full-vocabulary logits [B, V] of the last position of h [B, T, D]."""
        return self.gather_logits(self.model.head(h[:, -1:])[:, -1].float())

    def _emit(self, slots, logits) -> list[StepOutput]:
        reqs = [self._requests[s] for s in slots]
        tokens, logprobs, entropies = sample_tokens(logits, [r.params for r in reqs], [r.generator for r in reqs])
        outs = []
        for s, r, tok, lp, ent in zip(slots, reqs, tokens.tolist(), logprobs.tolist(), entropies.tolist()):
            r.last = tok
            r.tokens.append(tok)
            r.n_generated += 1
            p = r.params
            if tok in p.eos_ids:
                r.finish_reason = "eos"
            elif tok in p.stop_ids:
                r.finish_reason = "stop"
            elif r.n_generated >= p.max_new_tokens or r.prompt_len + r.n_generated >= self.max_len:
                r.finish_reason = "length"
            r.finished = r.finish_reason is not None
            outs.append(StepOutput(s, tok, lp, ent, r.finished, r.finish_reason))
        return outs

    def _params(self, params, n) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"{n} prompts but {len(params)} SamplingParams")
        return params

    def _adapters(self, adapters, n) -> list[str | None]:
        if adapters is None:
            return [None] * n
        if isinstance(adapters, str):
            raise ValueError(f"adapters takes one name (or None) per prompt, got the string {adapters!r}")
        adapters = list(adapters)
        if len(adapters) != n:
            raise ValueError(f"{n} prompts but {len(adapters)} adapters")
        bad = [a for a in adapters if a is not None and not isinstance(a, str)]
        if bad:
            raise ValueError(f"an adapter is a name or None, got {bad[0]!r}")
        if self.row_context is None and any(a is not None for a in adapters):
            raise ValueError("adapters given, but the model has no row_adapter_context (add adapters with "
                             "agents.lora.add_adapters) and no row_context was passed")
        if any(a is not None for a in adapters):
            with self.row_context(adapters):  # the context checks the names: unknown ones fail here, not mid-stream
                pass
        return adapters

    def _rows_context(self, names):
        """The model's per-row adapter context for a step whose rows (batch order) use `names`."""
        if any(a is not None for a in names):
            return self.row_context(names)
        return contextlib.nullcontext()

    def _slot_id(self, s) -> int:
        try:
            i = operator.index(s)
        except TypeError:
            i = -1
        if not 0 <= i < self.max_slots:
            raise ValueError(f"unknown slot {s!r}: slots are 0..{self.max_slots - 1}")
        return i

    def _request(self, slot) -> _Request:
        r = self._requests[self._slot_id(slot)]
        if r is None:
            raise ValueError(f"slot {slot} holds no request")
        return r

    def _check_prompt(self, i, prompt) -> list[int]:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; max_len={self.max_len} leaves room for "
                             f"at most {self.max_len - 1} (one position to generate)")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return prompt
