"""Supervised fine-tuning of one agent's engine on its selected responses: cross-entropy of the response
tokens only (the prompt is context), `sft_epochs` passes in batches of `sft_batch` rows, in an order
drawn from the agent's own generator (so agents started from one base diverge by their data order too).
"""

from __future__ import annotations

import torch

from agents.policy import build_inputs, token_logprobs

__all__ = ["response_loss", "sft_batches", "sft_step"]


def sft_batches(rows: list, epochs: int, batch: int, gen: torch.Generator) -> list[list]:
    """The agent's batches: each epoch a permutation of its rows from `gen`, cut into `batch` rows (the
    last batch of an epoch may be short)."""
    out = []
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        out += [[rows[i] for i in order[j:j + batch]] for j in range(0, len(order), batch)]
    return out


def response_loss(module, rows: list) -> torch.Tensor:
    """Mean negative log-likelihood per response token of rows [(prompt ids, response ids)]."""
    ids, targets = build_inputs([r[0] for r in rows], [r[1] for r in rows])
    ids, targets = ids.to(next(module.parameters()).device), targets.to(next(module.parameters()).device)
    out = token_logprobs(module, ids, targets)
    mask = out.mask.to(out.logprobs.dtype)
    return -(out.logprobs * mask).sum() / mask.sum().clamp(min=1)


def sft_step(learner, rows: list) -> float | None:
    """One optimizer step of the learner's engine on `rows`; the loss (None when the step was skipped)."""
    learner.stepper.loss_fn = lambda engine, batch: response_loss(engine.module, batch)
    with learner.replica.component.rng.active():
        result = learner.stepper.run([rows])
    return float(result.loss) if result.finite else None
