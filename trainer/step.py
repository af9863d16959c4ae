"""One optimizer step on the DeepSpeed engine, for every layout, with the non-finite-loss veto.

`StepRunner.run` consumes `gas` micro-batches from the sampler: the pipeline engine runs its 1F1B
schedule over them in `train_batch` (and steps itself); every other layout runs forward/backward
per micro-batch and `engine.step()` after each (DeepSpeed applies the update on the last one).
The returned loss is the step's mean over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import optim_state
from .distributed import all_true


class StepSkipper:
    """Lets the loop veto one optimizer update (non-finite loss) under any ZeRO stage.

    DeepSpeed wraps the torch optimizer (ZeRO, bf16); every wrapper ends in the base optimizer's
    step(), so skipping there leaves weights and Adam moments untouched while DeepSpeed's own
    bookkeeping (gradient reset, micro-step counters) proceeds as usual.

    With `check_grads` (the pipeline engine, which steps before the loop sees the loss) the
    decision is made inside step(): skip when any rank holds a non-finite gradient.
    `poison_next` is the test suite's fault injection for that path (gradients set to NaN)."""

    def __init__(self, engine, check_grads: bool = False):
        opt = self.base = optim_state.base_optimizer(engine)
        self.skip_next = False
        self.poison_next = False
        self.last_skipped = False
        original = opt.step

        # functools.wraps keeps the marker torch's LR scheduler put on step(), so it does not warn.
        @functools.wraps(original)
        def step(*args, **kwargs):
            skip = self.skip_next
            if check_grads:
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                if self.poison_next and grads:
                    grads[0].fill_(float("nan"))
                local_ok = all(bool(torch.isfinite(g).all()) for g in grads)
                skip = skip or not all_true(local_ok)
            self.skip_next = self.poison_next = False
            self.last_skipped = skip
            if skip:
                return None
            return original(*args, **kwargs)

        opt.step = step


@dataclass
class StepResult:
    loss: torch.Tensor  # float64 scalar on the CPU: the step's mean loss (meaningless when not finite)
    finite: bool  # on every rank; False means the update was skipped
    grad_norm: float | None  # measured here only for ZeRO-0 fp32 (see StepRunner); else None


class StepRunner:
    """Runs optimizer steps for one engine and layout (see the module docstring)."""

    def __init__(self, engine, layout, train_blocks, sampler, gas: int, device, plain_grads: bool):
        self.engine, self.layout = engine, layout
        self.blocks, self.sampler, self.gas, self.device = train_blocks, sampler, gas, device
        # ZeRO-0 in fp32 keeps no norm of the gradients it clips; it is measured on request. With
        # every other setting DeepSpeed reports the global norm (engine.get_global_grad_norm()).
        self.plain_grads = plain_grads
        # The pipeline engine steps inside train_batch, before the loop sees the loss: there the
        # skipper checks the gradients themselves.
        self.skipper = StepSkipper(engine, check_grads=layout.is_pipeline)

    def run(self, poison: bool = False, want_grad_norm: bool = False) -> StepResult:
        """One step. `poison`: fault injection, the step's loss (or gradients) become NaN."""
        if self.layout.is_pipeline:
            return self._pipeline_step(poison)
        engine, gas = self.engine, self.gas
        loss_sum = torch.zeros((), dtype=torch.float64)
        finite, grad_norm = True, None
        for micro in range(gas):
            x, y = self.blocks.get(self.sampler.next_indices())
            x, y = x.to(self.device), y.to(self.device)
            loss = engine(x, targets=y)
            if poison:
                loss = loss * float("nan")
            finite &= bool(torch.isfinite(loss.detach()).item())
            engine.backward(loss)
            if micro == gas - 1:
                finite = all_true(finite)
                self.skipper.skip_next = not finite
                if self.plain_grads and finite and want_grad_norm:
                    grad_norm = torch.nn.utils.get_total_norm(
                        [p.grad for p in engine.module.parameters() if p.grad is not None]).item()
            engine.step()
            loss_sum += loss.detach().double().cpu()
        step_loss = loss_sum / gas
        dp_world = self.layout.dp
        if dp_world > 1 and finite:
            t = step_loss.to(self.device)
            torch.distributed.all_reduce(t, group=self.layout.dp_group())
            step_loss = t.cpu() / dp_world
        return StepResult(step_loss, finite, grad_norm)

    def _pipeline_step(self, poison: bool) -> StepResult:
        # DeepSpeed's pipeline engine runs the 1F1B schedule over `gas` micro-batches and steps the
        # optimizer itself; its loss is already averaged over data-parallel ranks.
        batches = [self.blocks.get(self.sampler.next_indices()) for _ in range(self.gas)]
        self.skipper.poison_next = poison
        step_loss = self.engine.train_batch(iter(batches)).detach().double().cpu()
        finite = not self.skipper.last_skipped and bool(torch.isfinite(step_loss).item())
        return StepResult(step_loss, finite, None)
