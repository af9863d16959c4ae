"""Value heads of PPO agents: V(s), one linear layer on the policy's final hidden state.

A PPO agent's critic shares the policy's trunk, as TRL's and OpenRLHF's LLM value heads do: V(s) is
`value_heads[agent](h)` where h is the model's final hidden state (after the last norm) at the last
prompt token, the position from which the action's first token is sampled. The heads live in one
`nn.ModuleDict` named `value_heads` that the agents layer adds to the GPT from outside
(`add_value_heads`), so they are trained, checkpointed and resumed with the agent's engine like any
other weight; the model itself knows nothing of them, and `strip_value_heads` drops them where a
plain GPT is wanted (export). A LoRA agent's head sits beside its adapter on the shared base and
reads the hidden state computed under that adapter.

Heads start at zero (V = 0 before training): no random draw, so adding them leaves the run's random
stream and the policy's initial weights unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PREFIX", "add_value_heads", "state_positions", "strip_value_heads", "value_head", "value_parameters"]

PREFIX = "value_heads."


def _gpt(model):
    from .policy import unwrap_model

    return unwrap_model(model)


def add_value_heads(model, names) -> nn.Module:
    """Add a zero-initialised value head for each agent in `names` to the GPT `model` (in place);
    returns the model. Heads are trainable even where the base is frozen (LoRA)."""
    gpt = _gpt(model)
    heads = getattr(gpt, "value_heads", None)
    if heads is None:
        heads = gpt.value_heads = nn.ModuleDict()
    d = gpt.config.d_model
    ref = next(gpt.parameters())
    for name in names:
        if name in heads:
            raise ValueError(f"agent {name!r} already has a value head")
        head = torch.nn.utils.skip_init(nn.Linear, d, 1, device=ref.device, dtype=ref.dtype)  # no random draw
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        heads[name] = head
    return model


def value_head(model, name: str) -> nn.Module:
    heads = getattr(_gpt(model), "value_heads", None)
    if heads is None or name not in heads:
        raise ValueError(f"agent {name!r} has no value head (agents.{name}.algorithm must be ppo)")
    return heads[name]


def value_parameters(model, name: str) -> list[nn.Parameter]:
    return list(value_head(model, name).parameters())


def strip_value_heads(state: dict) -> dict:
    """A state dict without the value heads (what a plain GPT loads)."""
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}


def state_positions(mask: torch.Tensor) -> torch.Tensor:
    """[N] the position of each row's last prompt token in the sequence layout of
    `policy.token_logprobs` (mask = targets != ignore: position t predicts targets[t], so the first
    masked position is the last prompt token, whose hidden state samples the action's first token)."""
    if mask.dim() != 2 or not mask.any(dim=1).all():
        raise ValueError("every row needs at least one generated token to read its state's value")
    return mask.to(torch.int8).argmax(dim=1)
