"""The static-batch decoder that `GPT.generate` was before `model.generate.DecodeEngine` (commit
7db8a91, `git show 7db8a91:model/gpt.py`), kept verbatim as a function of the model (`self`
renamed `model`): the baseline of bench/bench_generate.py, and the reference of the test that
`GPT.generate` still gives its tokens. Prompts are left padded into one rectangular `KVCache`;
every row decodes until the last one finishes (or max_new_tokens), with one `sample_next` call
per step over the whole batch.

    static_generate(model, prompts, max_new_tokens, temperature=0, ...)   # as GPT.generate was
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["left_pad", "sample_next", "static_generate"]


@torch.no_grad()
def static_generate(model, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | None = None, attention_mask=None,
                    generator: torch.Generator | None = None):
    """Sample up to `max_new_tokens` tokens after each prompt, with a key/value cache.

    input_ids: [B, T] left-padded tensor (with `attention_mask`, 0 at padding), a 1-D tensor,
    or a list of token lists of any lengths (padded here). temperature 0 = greedy; top_k and
    top_p (nucleus) filter before sampling. A sequence stops at `eos_id` and is padded with
    eos after it; generation stops when all sequences have finished.

    Returns a tensor [B, T + n_generated] (prompt + generated, still left padded) for tensor
    input, or a list of token lists (prompt + generated, no padding) for list input."""
    as_list = isinstance(input_ids, (list, tuple))
    device = model.tok_emb.weight.device
    if as_list:
        if attention_mask is not None:
            raise ValueError("attention_mask is only accepted with a tensor input_ids")
        input_ids, attention_mask = left_pad(input_ids, pad_id=eos_id or 0, device=device)
    elif input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    if T == 0:
        raise ValueError("generate needs non-empty prompts")
    if T + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_seq_len={model.config.max_seq_len}")
    if max_new_tokens <= 0:
        return _unpad(input_ids, attention_mask) if as_list else input_ids
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {(B, T)}")
    if not attention_mask[:, -1].all() or (attention_mask[:, 1:].int() < attention_mask[:, :-1].int()).any():
        raise ValueError("generate needs left padding: attention_mask must be 0...0 1...1 per row")

    total = T + max_new_tokens
    # Mask and positions over the whole run; generated tokens are always real.
    mask = torch.ones(B, total, dtype=torch.bool, device=device)
    mask[:, :T] = attention_mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)

    # Tensor parallelism: the head makes logits sharded over the vocabulary; sample from all.
    gather = getattr(model.lm_head, "gather_logits", lambda logits: logits)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(B, total)
        logits = gather(model(input_ids, positions=positions[:, :T], attention_mask=mask[:, :T],
                             kv_cache=cache)[:, -1])
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        out = [input_ids]
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            out.append(nxt[:, None])
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                break
            cur = T + step
            logits = gather(model(nxt[:, None], positions=positions[:, cur:cur + 1],
                                 attention_mask=mask[:, :cur + 1], kv_cache=cache)[:, -1])
    finally:
        model.train(was_training)
    tokens = torch.cat(out, dim=1)
    if not as_list:
        return tokens
    full_mask = torch.cat([attention_mask, torch.ones_like(tokens[:, T:], dtype=torch.bool)], dim=1)
    seqs = _unpad(tokens, full_mask)
    if eos_id is not None:  # drop the eos padding after the first generated eos
        seqs = [_cut_after_eos(s, n_prompt=int(m.sum()), eos_id=eos_id)
                for s, m in zip(seqs, attention_mask)]
    return seqs


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


def _unpad(tokens, mask) -> list[list[int]]:
    return [t[m].tolist() for t, m in zip(tokens, mask.bool())]


def _cut_after_eos(seq: list[int], n_prompt: int, eos_id: int) -> list[int]:
    gen = seq[n_prompt:]
    if eos_id in gen:
        gen = gen[:gen.index(eos_id) + 1]
    return seq[:n_prompt] + gen


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None):
    """Next token ids [B] from logits [B, V]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
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
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
