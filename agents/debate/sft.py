"""Supervised fine-tuning of one agent's engine on its selected responses: cross-entropy of the response
tokens only (the prompt is context), `sft_epochs` passes in batches of `sft_batch` rows, in an order
drawn from the agent's own generator (so agents started from one base diverge by their data order too).

`debate.kl_base` > 0 adds beta * KL(agent || reference) at the same tokens, over the whole vocabulary
(exact, from both models' logits), the reference being the agent's starting weights, frozen. Fine-tuning
on the answers the majority agreed on sharpens each agent's distribution towards them; with all agents
started from one base, their disagreement is mostly that distribution's spread, so the anchor is what
keeps it (the RLHF reference penalty, here on supervised steps).

`debate.sft_tempered` fits softmax(logits / T), T the learner's sampling temperature, instead of T = 1. The
responses were drawn from the tempered distribution, so fitting that distribution to its own unfiltered
samples is a no-op in expectation (the gradient E[onehot(y) - p_T] / T is 0) and only the majority filter
moves the agent; plain cross-entropy at T = 1 on samples drawn at T < 1 also pulls p_1 towards p_T, i.e.
lowers the agent's effective temperature every iteration, whatever the labels say.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agents.policy import IGNORE_INDEX, build_inputs, token_logprobs, unwrap_model

__all__ = ["response_loss", "sft_batches", "sft_step"]


def sft_batches(rows: list, epochs: int, batch: int, gen: torch.Generator) -> list[list]:
    """The agent's batches: each epoch a permutation of its rows from `gen`, cut into `batch` rows (the
    last batch of an epoch may be short)."""
    out = []
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        out += [[rows[i] for i in order[j:j + batch]] for j in range(0, len(order), batch)]
    return out


def _response_logits(module, ids: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """[M, V] logits / temperature at the masked positions (the head only there)."""
    gpt = unwrap_model(module)
    return gpt.head(gpt.hidden_states(ids)[mask]).float() / temperature


def response_loss(module, rows: list, reference: torch.nn.Module | None = None, kl: float = 0.0,
                  temperature: float = 1.0) -> torch.Tensor:
    """Mean negative log-likelihood per response token of rows [(prompt ids, response ids)], plus `kl` times
    the mean KL(module || reference) per response token when `kl` > 0; both of softmax(logits / temperature)."""
    ids, targets = build_inputs([r[0] for r in rows], [r[1] for r in rows])
    device = next(module.parameters()).device
    ids, targets = ids.to(device), targets.to(device)
    if kl > 0:
        if reference is None:
            raise ValueError("kl > 0 needs the reference model")
        mask = targets != IGNORE_INDEX
        logp = F.log_softmax(_response_logits(module, ids, mask, temperature), dim=-1)
        with torch.no_grad():
            logq = F.log_softmax(_response_logits(reference, ids, mask, temperature), dim=-1)
        nll = -logp.gather(1, targets[mask][:, None]).squeeze(1)
        kld = (logp.exp() * (logp - logq)).sum(-1)
        return (nll + kl * kld).mean() if nll.numel() else logp.sum() * 0
    out = token_logprobs(module, ids, targets, temperature=temperature)
    mask = out.mask.to(out.logprobs.dtype)
    return -(out.logprobs * mask).sum() / mask.sum().clamp(min=1)


def sft_step(learner, rows: list, reference: torch.nn.Module | None = None, kl: float = 0.0,
             temperature: float = 1.0) -> float | None:
    """One optimizer step of the learner's engine on `rows`; the loss (None when the step was skipped)."""
    learner.stepper.loss_fn = lambda engine, batch: response_loss(engine.module, batch, reference, kl, temperature)
    with learner.replica.component.rng.active():
        result = learner.stepper.run([rows])
    return float(result.loss) if result.finite else None
