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

`game_tokenizer(game)`: a from-scratch policy (init_from null) gets a `tokenizers` WordLevel vocabulary
(<|endoftext|>, the printable characters, one token per action name, then the game's own words) written
into the run directory by the loop. Its words are what the game's information-state strings are made of:
a bracketed field name with its colon ("[Private:", "[Round1:", "[Money:") and a number ("99", "14") are
one token each, everything else one character. Why words and not characters: Leduc's strings are
~105 characters, and a 2-layer, width-64 GPT reading them character by character could not learn to
tell its cards apart within the 15-minute budget (distilled for 150 s toward a fixed CFR+ table of
NashConv 0.05, it reached 3.19, at 0.24 s a step); the same GPT reading the same strings as ~48 words
reached 0.15 at 0.09 s a step (docs/games.md). Kuhn poker's and the matrix games' strings have no
such words ("0pb", "Current player: 0..."), so their tokenization is characters, as before.
"""

from __future__ import annotations

import re
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


# One token: a bracketed field name (with its colon, if any), a number, or else any single character.
GAME_WORD = r"\[[A-Za-z][A-Za-z0-9]*:?|[0-9]+|[\s\S]"


def game_words(game) -> list[str]:
    """The multi-character words (GAME_WORD) of every information-state string of the game, in order of
    first appearance in OpenSpiel's enumeration (TabularPolicy)."""
    from open_spiel.python import policy as os_policy

    words: dict[str, None] = {}
    for s in os_policy.TabularPolicy(game).state_lookup:
        words.update((w, None) for w in re.findall(GAME_WORD, s) if len(w) > 1)
    return list(words)


def game_tokenizer(game):
    """A word-level `tokenizers.Tokenizer` of the game's strings, one token per action name (module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0}
    for c in CHARSET:
        vocab.setdefault(c, len(vocab))
    for name in action_names(game):
        vocab.setdefault(name, len(vocab))
    for word in game_words(game):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(GAME_WORD), behavior="isolated")
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
