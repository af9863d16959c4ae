r"""One agent's view of a language model: how its observations become prompts, how its actions are
sampled, and the exact log-probabilities and entropies of what it generated, under autograd.

    policy = AgentPolicy("speaker", tokenizer, role="describe the object", temperature=1.0,
                         top_p=None, max_new_tokens=16)
    prompt = policy.prompt_ids("Object: kite")                    # template, then left truncation
    params = policy.sampling_params(seed=7)                        # for model.generate.DecodeEngine
    text = policy.action_text(completion.tokens)                   # what the env receives
    out = policy.logprobs(model, [prompt], [completion.tokens])    # PolicyTokens, [N, L] tensors

Prompts. `template` is a `str.format` string over {agent} (the agent's name), {role} and
{observation} (required); the default is DEFAULT_TEMPLATE. The formatted text is encoded with the
tokenizer and, when longer than the limit (`max_prompt_tokens`, and whatever the caller passes,
e.g. the room the model's context leaves after max_new_tokens), cut on the LEFT: the newest part of
the observation and the final cue stay.

Tokenizers: a `tokenizers.Tokenizer`, a `transformers` tokenizer, or any object with
`encode(text)` (a list of ids, or an object with `.ids`) and `decode(ids) -> str`.

Sampling. temperature (0 = greedy), top_k, top_p, max_new_tokens, and two ways an action ends early:
the EOS token (`eos_id`, default the tokenizer's "<|endoftext|>" when it has one) and, with
`stop_at_newline` (default), any token whose text contains a line break (`stop_ids`: every such id
of the vocabulary, found once by decoding each id). Both tokens are kept as the action's last token
(their log-probability is part of the action's); `action_text` drops an EOS and cuts the text at its
first line break.

Log-probabilities and entropies (`token_logprobs`, `sequence_logprobs`, `AgentPolicy.logprobs`).
For each row n, the sequence prompt_n + generated_n is run through the model in one right-padded
causal forward (padding only follows real tokens, so it changes nothing before it), and at every
generated position l the full next-token distribution p = softmax(z / T) over the whole vocabulary
gives

    logprobs[n, l] = log p(generated_n[l] | prompt_n, generated_n[:l])
    entropy[n, l]  = -sum_v p_v log p_v                              (exact, not a sampled estimate)

with gradients to the model's parameters, and mask[n, l] = 1 on the generated positions, 0 on
padding (where both values are 0). T is the policy's temperature (1 for a greedy policy); top-k /
top-p filters are not applied (the filtered distribution is not differentiable in the tokens it
drops), so with a filter the engine's reported log-probability of a token (under the renormalised
filtered distribution) is higher than this one. With T = 1 and no filter they are the same number,
up to float32 rounding (tests/test_policy.py). With `adapter` (an agent's LoRA adapter over a shared
base, `agents.lora`) the values are those of the base with that adapter (`agents.lora.use_adapter`),
and the rollout generates the agent's actions with it. The output head is evaluated at the generated
positions only, and the per-token values come from the model's kernel namespace
(`model.ops.token_logprob_and_entropy`). The model should be in eval mode (or have no dropout) for the
values to be those the rollout sampled from.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model.generate import SamplingParams
from model.kernels import reference

__all__ = ["DEFAULT_TEMPLATE", "IGNORE_INDEX", "AgentPolicy", "PolicyTokens", "build_inputs", "sequence_logprobs",
           "token_logprobs", "unwrap_model"]

DEFAULT_TEMPLATE = "{agent} ({role})\n{observation}\n{agent}:"
IGNORE_INDEX = -100
_FIELDS = ("agent", "role", "observation")


def unwrap_model(model):
    """The GPT inside a wrapper that keeps it as `.module` (a DeepSpeed engine, DDP), else `model`."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def _encode(tokenizer, text: str) -> list[int]:
    out = tokenizer.encode(text)
    return [int(i) for i in getattr(out, "ids", out)]


def _vocab_size(tokenizer) -> int:
    for name in ("get_vocab_size", "__len__"):
        fn = getattr(tokenizer, name, None)
        if callable(fn):
            try:
                return int(fn())
            except TypeError:
                continue
    n = getattr(tokenizer, "vocab_size", None)
    if isinstance(n, int):
        return n
    raise ValueError("AgentPolicy: cannot tell the tokenizer's vocabulary size (no get_vocab_size(), len() or "
                     "vocab_size); pass stop_ids explicitly or stop_at_newline=False")


def _eos_of(tokenizer) -> int | None:
    fn = getattr(tokenizer, "token_to_id", None)
    if callable(fn):
        i = fn("<|endoftext|>")
        if i is not None:
            return int(i)
    i = getattr(tokenizer, "eos_token_id", None)
    return int(i) if isinstance(i, int) else None


@dataclass
class PolicyTokens:
    """Per-token values of a batch of actions: logprobs, entropy (float32, with autograd) and mask
    (bool), all [N, L] (generated layout, `sequence_logprobs`) or [N, T] (sequence layout,
    `token_logprobs`)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor
    values: torch.Tensor | None = None  # [N] V(s) of each row's state, when a value head was given


class AgentPolicy:
    """Prompt formatting, sampling settings and log-probabilities of one agent (see the module
    docstring). Settings:

        name             the agent's name (as the env calls it)
        tokenizer        see the module docstring
        role             free text for the template's {role} (default: the name)
        template         str.format over {agent}, {role}, {observation} (required)
        max_prompt_tokens  keep at most this many prompt tokens (the last ones); None: no limit here
        temperature      >= 0 (0: greedy); top_k >= 0 or None; top_p in (0, 1] or None
        max_new_tokens   >= 1
        eos_id           token that ends an action (default: the tokenizer's <|endoftext|>, if any)
        stop_at_newline  end an action at a token containing a line break (default True)
        stop_ids         the ids that end an action besides eos (default: found from the tokenizer
                         when stop_at_newline, else none)
        adapter          the name of the agent's LoRA adapter in its model (agents.lora), or None
                         (default): the model's own weights
    """

    def __init__(self, name: str, tokenizer: Any, *, role: str | None = None, template: str = DEFAULT_TEMPLATE,
                 max_prompt_tokens: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, max_new_tokens: int = 32, eos_id: int | None = None,
                 stop_at_newline: bool = True, stop_ids: Sequence[int] | None = None, adapter: str | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"AgentPolicy: name must be a non-empty string, got {name!r}")
        where = f"AgentPolicy {name!r}"
        if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
            raise ValueError(f"{where}: tokenizer must have encode(text) and decode(ids), got {type(tokenizer).__name__}")
        if not isinstance(template, str):
            raise ValueError(f"{where}: template must be a string, got {template!r}")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as e:
            raise ValueError(f"{where}: template is not a valid format string ({e})") from None
        for f in fields:
            if f not in _FIELDS:
                raise ValueError(f"{where}: template field {{{f}}} is not allowed; allowed: "
                                 + ", ".join("{" + x + "}" for x in _FIELDS))
        if "observation" not in fields:
            raise ValueError(f"{where}: template must contain {{observation}}, got {template!r}")
        if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool) or not isinstance(
                max_prompt_tokens, int) or max_prompt_tokens < 1):
            raise ValueError(f"{where}: max_prompt_tokens must be an integer >= 1 or None, got {max_prompt_tokens!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"{where}: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
            raise ValueError(f"{where}: temperature must be a number >= 0 (0: greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"{where}: top_k must be an integer >= 0 or None, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"{where}: top_p must be in (0, 1] or None, got {top_p!r}")
        if adapter is not None and not (isinstance(adapter, str) and adapter):
            raise ValueError(f"{where}: adapter must be a non-empty string (a LoRA adapter's name) or None, got {adapter!r}")
        self.name = name
        self.tokenizer = tokenizer
        self.role = name if role is None else str(role)
        self.template = template
        self.max_prompt_tokens = max_prompt_tokens
        self.temperature = float(temperature)
        self.top_k, self.top_p = top_k, top_p
        self.max_new_tokens = max_new_tokens
        self.eos_id = _eos_of(tokenizer) if eos_id is None else int(eos_id)
        self.stop_at_newline = bool(stop_at_newline)
        self._stop_ids = None if stop_ids is None else tuple(int(i) for i in stop_ids)
        self.adapter = adapter

    def __repr__(self) -> str:
        return (f"AgentPolicy({self.name!r}, role={self.role!r}, temperature={self.temperature}, top_k={self.top_k}, "
                f"top_p={self.top_p}, max_new_tokens={self.max_new_tokens}"
                + (f", adapter={self.adapter!r})" if self.adapter is not None else ")"))

    # ---- prompts ---------------------------------------------------------------------------------

    def prompt_text(self, observation: str) -> str:
        """The template filled in for this agent and observation."""
        return self.template.format(agent=self.name, role=self.role, observation=observation)

    def prompt_ids(self, observation: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of `prompt_text(observation)`, cut on the left to the last
        min(max_prompt_tokens, max_tokens) tokens."""
        ids = _encode(self.tokenizer, self.prompt_text(observation))
        limits = [n for n in (self.max_prompt_tokens, max_tokens) if n is not None]
        if limits:
            limit = min(limits)
            if limit < 1:
                raise ValueError(f"AgentPolicy {self.name!r}: no room for a prompt (limit {limit} tokens); "
                                 "lower max_new_tokens or use a model with a longer context")
            ids = ids[-limit:]
        if not ids:
            raise ValueError(f"AgentPolicy {self.name!r}: the prompt for observation {observation!r} encodes to no "
                             "token; use a template with text around {observation}")
        return ids

    # ---- sampling --------------------------------------------------------------------------------

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids besides eos that end an action (every token whose text has a line break, by default)."""
        if self._stop_ids is None:
            if not self.stop_at_newline:
                self._stop_ids = ()
            else:
                n = _vocab_size(self.tokenizer)
                self._stop_ids = tuple(i for i in range(n) if i != self.eos_id
                                       and "\n" in self.tokenizer.decode([i]))
        return self._stop_ids

    def sampling_params(self, seed: int | None = None, generator: torch.Generator | None = None) -> SamplingParams:
        """SamplingParams for one action of this agent (seed: the request's own generator)."""
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed,
                              generator=generator, max_new_tokens=self.max_new_tokens,
                              eos_ids=() if self.eos_id is None else (self.eos_id,), stop_ids=self.stop_ids)

    def action_text(self, tokens: Sequence[int]) -> str:
        """The env's action for generated `tokens`: decoded without a final eos, cut at the first line
        break (with stop_at_newline), without surrounding whitespace (the space a model writes after
        the prompt's "name:" is layout: the env, and the transcripts a base was trained on
        (agents.corpus), read "kite", not " kite")."""
        tokens = [int(t) for t in tokens]
        if tokens and self.eos_id is not None and tokens[-1] == self.eos_id:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens) if tokens else ""
        if self.stop_at_newline:
            text = text.split("\n", 1)[0]
        return text.strip()

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the distribution `logprobs` reports: the policy's, 1 for a greedy one."""
        return self.temperature if self.temperature > 0 else 1.0

    # ---- log-probabilities -------------------------------------------------------------------------

    def logprobs(self, model, prompts: Sequence[Sequence[int]], generated: Sequence[Sequence[int]]) -> PolicyTokens:
        """`sequence_logprobs` at this policy's temperature, under its adapter."""
        return sequence_logprobs(model, prompts, generated, temperature=self.logprob_temperature, adapter=self.adapter)


# --------------------------------------------------------------------------------------------------
# Log-probabilities and entropies under autograd.


def build_inputs(prompts: Sequence[Sequence[int]], generated: Sequence[Sequence[int]], pad_id: int = 0,
                 ignore_index: int = IGNORE_INDEX, device=None):
    """Right-padded sequence layout of a batch of actions: (input_ids [N, T], targets [N, T]) with
    input_ids[n] = prompt_n + generated_n + padding and targets[n, t] = input_ids[n, t + 1] where
    that token was generated, else ignore_index (so the logits at position t are scored against
    targets[n, t]). T = the longest prompt + generated minus nothing (at least 1)."""
    if len(prompts) != len(generated):
        raise ValueError(f"{len(prompts)} prompts but {len(generated)} generated sequences; give one of each per action")
    rows = []
    for i, (p, g) in enumerate(zip(prompts, generated)):
        p, g = [int(t) for t in p], [int(t) for t in g]
        if not p:
            raise ValueError(f"action {i} has an empty prompt; every action needs at least one prompt token")
        rows.append((p, g))
    T = max([len(p) + len(g) for p, g in rows], default=1)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), ignore_index, dtype=torch.long)
    for n, (p, g) in enumerate(rows):
        seq = p + g
        ids[n, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        if g:
            targets[n, len(p) - 1:len(seq) - 1] = torch.tensor(g, dtype=torch.long)
    return ids.to(device), targets.to(device)


def _device_of(model):
    gpt = unwrap_model(model)
    emb = getattr(gpt, "tok_emb", None)
    if emb is not None:
        return emb.weight.device
    return next(gpt.parameters()).device


def token_logprobs(model, input_ids, targets, *, temperature: float = 1.0,
                   ignore_index: int = IGNORE_INDEX, adapter: str | None = None,
                   value_head: torch.nn.Module | None = None) -> PolicyTokens:
    """Sequence layout: logprobs[n, t] = log p(targets[n, t] | input_ids[n, :t + 1]) and the exact
    entropy of that next-token distribution, p = softmax(logits / temperature), at the positions
    where targets != ignore_index (mask); 0 elsewhere. input_ids [N, T] right-padded (padding only
    after real tokens). Differentiable w.r.t. the model's parameters. A model with `hidden_states`
    and `head` (model.GPT, also inside a DeepSpeed engine as `.module`) evaluates its head at the
    masked positions only; any other model is called as model(input_ids) -> logits [N, T, V].
    adapter: evaluate under that LoRA adapter of the model (`agents.lora.use_adapter`).
    value_head: also V(s) = value_head(h) at each row's last prompt token (`agents.value`), from the
    same forward, in `values` [N] (float32)."""
    if adapter is not None:
        from .lora import use_adapter  # peft only where adapters are used

        with use_adapter(model, adapter):
            return token_logprobs(model, input_ids, targets, temperature=temperature, ignore_index=ignore_index,
                                  value_head=value_head)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0 for log-probabilities (use 1 for a greedy policy), got {temperature!r}")
    gpt = unwrap_model(model)
    dev = _device_of(model)
    input_ids, targets = input_ids.to(dev), targets.to(dev)
    if input_ids.shape != targets.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and targets must both be [N, T], got {tuple(input_ids.shape)} and "
                         f"{tuple(targets.shape)}")
    mask = targets != ignore_index
    if input_ids.shape[0] == 0:
        empty = torch.zeros(mask.shape, dtype=torch.float32, device=dev)
        values = torch.zeros(0, dtype=torch.float32, device=dev) if value_head is not None else None
        return PolicyTokens(empty, empty.clone(), mask, values)
    ops = getattr(gpt, "ops", None)
    per_token = getattr(ops, "token_logprob_and_entropy", reference.token_logprob_and_entropy)
    values = None
    if hasattr(gpt, "hidden_states") and hasattr(gpt, "head"):
        h = gpt.hidden_states(input_ids)
        logits = gpt.head(h[mask])  # [M, V]: the head only where a generated token is scored
        if value_head is not None:
            from .value import state_positions

            rows = torch.arange(h.shape[0], device=dev)
            values = value_head(gpt.final_norm(h[rows, state_positions(mask)])).squeeze(-1).float()
    elif value_head is not None:
        raise ValueError("a value head needs a model with hidden_states and head (model.GPT)")
    else:
        logits = model(input_ids)[mask]
    logits = logits.float()
    if temperature != 1:
        logits = logits / temperature
    lp, ent = per_token(logits, targets[mask])
    zeros = torch.zeros(mask.shape, dtype=lp.dtype, device=dev)
    return PolicyTokens(zeros.masked_scatter(mask, lp), zeros.masked_scatter(mask, ent), mask, values)


def sequence_logprobs(model, prompts: Sequence[Sequence[int]], generated: Sequence[Sequence[int]], *,
                      temperature: float = 1.0, pad_id: int = 0, adapter: str | None = None) -> PolicyTokens:
    """Generated layout: [N, L] (L = the longest generated sequence) log-probabilities and exact
    entropies of each row's generated tokens given its prompt and the tokens before, mask 1 on
    generated positions (see the module docstring); adapter as in `token_logprobs`."""
    ids, targets = build_inputs(prompts, generated, pad_id=pad_id)
    full = token_logprobs(model, ids, targets, temperature=temperature, adapter=adapter)
    dev = full.logprobs.device
    P = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)
    G = torch.tensor([len(g) for g in generated], dtype=torch.long, device=dev)
    L = max(int(G.max()) if len(generated) else 0, 1)
    cols = torch.arange(L, device=dev)
    mask = cols[None, :] < G[:, None]
    idx = (P[:, None] - 1 + cols[None, :]).clamp(max=ids.shape[1] - 1)
    zero = torch.zeros((), dtype=full.logprobs.dtype, device=dev)
    lp = torch.where(mask, full.logprobs.gather(1, idx), zero)
    ent = torch.where(mask, full.entropy.gather(1, idx), zero)
    return PolicyTokens(lp, ent, mask)
