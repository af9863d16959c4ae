r"""How an LLM agent's policy becomes a distribution over a game's legal actions.

The agent's prompt is its `AgentPolicy` template around the information-state string; every action
of the game is ONE token of the agent's vocabulary (its name, `state.action_to_string`: "Pass",
"Bet", "Fold", "Call", "Raise", "Rock", ...). At the prompt's last position the model gives logits z
over the vocabulary; the action distribution is the softmax of z restricted to the legal actions'
tokens (illegal actions get 0, the legal ones renormalised):

    pi(a | I) = exp(z[tok(a)]) / sum_{b legal} exp(z[tok(b)])

which is the model's next-token distribution conditioned on the next token being a legal action.
Its entropy H(pi(. | I)) is the entropy term of the objective (over the legal actions, not the
whole vocabulary: a one-token action over a game's 2-3 choices).

`game_tokenizer(game)`: a from-scratch policy (init_from null) reads its prompts character by
character and has one token per action name (a `tokenizers` WordLevel vocabulary: the printable
characters, the action names, <|endoftext|>), written into the run directory by the loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from agents.envs.base import CHARSET
from agents.policy import unwrap_model

__all__ = ["action_names", "action_token_ids", "game_tokenizer", "legal_logprobs"]


def action_names(game) -> list[str]:
    """Every action's name, indexed by OpenSpiel action id (the names of a state where it is legal)."""
    names: dict[int, str] = {}

    def walk(state):
        if state.is_terminal() or len(names) == game.num_distinct_actions():
            return
        if state.is_chance_node():
            for a, _ in state.chance_outcomes():
                walk(state.child(a))
            return
        p = state.current_player()
        for a in state.legal_actions():
            names.setdefault(a, state.action_to_string(p, a))
            walk(state.child(a))

    walk(game.new_initial_state())
    missing = [a for a in range(game.num_distinct_actions()) if a not in names]
    if missing:
        raise ValueError(f"openspiel: actions {missing} of {game} are never legal; cannot name them")
    return [names[a] for a in range(game.num_distinct_actions())]


def game_tokenizer(game):
    """A character-level `tokenizers.Tokenizer` with one token per action name (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0}
    for c in CHARSET:
        vocab.setdefault(c, len(vocab))
    for name in action_names(game):
        vocab.setdefault(name, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def action_token_ids(tokenizer, names: Sequence[str]) -> list[int]:
    """The token of each action name; ValueError when a name is not one token of the vocabulary."""
    ids = []
    for name in names:
        i = tokenizer.token_to_id(name) if hasattr(tokenizer, "token_to_id") else None
        if i is None:
            raise ValueError(f"action {name!r} is not one token of the agent's tokenizer; a game policy needs one "
                             "token per action (start from init_from: null, whose tokenizer has them)")
        ids.append(int(i))
    if len(set(ids)) != len(ids):
        raise ValueError(f"actions {list(names)} share tokens {ids}")
    return ids


def _right_padded(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    ids = torch.zeros((len(prompts), int(lengths.max())), dtype=torch.long)
    for n, p in enumerate(prompts):
        ids[n, :len(p)] = torch.tensor(p, dtype=torch.long)
    return ids.to(device), lengths.to(device)


def legal_logprobs(model, prompts: Sequence[Sequence[int]], legal: torch.Tensor, action_tokens: Sequence[int]
                   ) -> torch.Tensor:
    """[N, A] float32 log pi(a | prompt n) over the game's A actions (-inf on illegal ones), under
    autograd. legal: [N, A] bool. One right-padded causal forward (padding only follows real
    tokens, so it changes nothing before it); the output head at each row's last prompt token only."""
    gpt = unwrap_model(model)
    dev = gpt.tok_emb.weight.device
    ids, lengths = _right_padded(prompts, dev)
    h = gpt.hidden_states(ids)
    last = h[torch.arange(len(prompts), device=dev), lengths - 1]
    logits = gpt.head(last).float()[:, torch.as_tensor(list(action_tokens), device=dev)]
    logits = logits.masked_fill(~legal.to(dev), float("-inf"))
    return torch.log_softmax(logits, dim=-1)
