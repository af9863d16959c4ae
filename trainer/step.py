"""One optimizer step of one engine, for every layout, with the non-finite-loss veto and hooks.

`Stepper.run(micro_batches)` takes the step's micro-batches (the caller draws them): the pipeline
engine runs its 1F1B schedule over them in `train_batch` (and steps itself, with the module's own
loss); every other layout runs `loss_fn(engine, micro_batch)` and backward per micro-batch and
`engine.step()` after each (DeepSpeed applies the update on the last one). Hooks run after the last
backward (gradients complete, before the update: where a strategy exchanges gradients) and after
the optimizer step (where a strategy averages weights). The veto and the step's mean loss are
collectives over the engine's own groups (`ParallelDims`), never over other replicas.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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

    def __init__(self, engine, check_grads: bool = False, group=None):
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
                skip = skip or not all_true(local_ok, group)
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


def lm_loss(engine, micro_batch, device):
    """The language-model loss of one micro-batch (input ids, targets) through the engine."""
    x, y = micro_batch
    return engine(x.to(device), targets=y.to(device))


@dataclass
class Stepper:
    """Runs optimizer steps for one engine (see the module docstring).

    `loss_fn(engine, micro_batch) -> scalar loss` (default: `lm_loss`); `plain_grads`: ZeRO-0 in
    fp32 keeps no norm of the gradients it clips, so it is measured here on request (with every other
    setting DeepSpeed reports it: `engine.get_global_grad_norm()`). `after_backward(stepper)` and
    `after_step(stepper, result)` hooks run on every rank of the engine."""

    engine: object
    dims: object  # ParallelDims
    device: object
    plain_grads: bool = False
    loss_fn: Callable | None = None
    after_backward: list[Callable] = field(default_factory=list)
    after_step: list[Callable] = field(default_factory=list)
    # Where the non-finite veto is agreed: the replica (default), or the world (None) when
    # replicas exchange gradients and must all skip a step together.
    veto_group: object | None = field(default="replica")

    def __post_init__(self):
        if self.veto_group == "replica":
            self.veto_group = self.dims.replica_group
        # The pipeline engine steps inside train_batch, before the loop sees the loss: there the
        # skipper checks the gradients themselves.
        self.skipper = StepSkipper(self.engine, check_grads=self.dims.is_pipeline, group=self.veto_group)
        if self.loss_fn is None:
            self.loss_fn = functools.partial(lm_loss, device=self.device)

    def run(self, micro_batches: Sequence, poison: bool = False, want_grad_norm: bool = False) -> StepResult:
        """One step over `micro_batches` (gradient accumulation over them). `poison`: fault
        injection, the step's loss (or gradients) become NaN."""
        result = self._pipeline_step(micro_batches, poison) if self.dims.is_pipeline else \
            self._step(micro_batches, poison, want_grad_norm)
        for hook in self.after_step:
            hook(self, result)
        return result

    def _step(self, micro_batches, poison: bool, want_grad_norm: bool) -> StepResult:
        engine, gas = self.engine, len(micro_batches)
        loss_sum = torch.zeros((), dtype=torch.float64)
        finite, grad_norm = True, None
        for micro, batch in enumerate(micro_batches):
            loss = self.loss_fn(engine, batch)
            if poison:
                loss = loss * float("nan")
            finite &= bool(torch.isfinite(loss.detach()).item())
            engine.backward(loss)
            if micro == gas - 1:
                finite = all_true(finite, self.veto_group)
                self.skipper.skip_next = not finite
                for hook in self.after_backward:
                    hook(self)
                if self.plain_grads and finite and want_grad_norm:
                    grad_norm = torch.nn.utils.get_total_norm(
                        [p.grad for p in engine.module.parameters() if p.grad is not None]).item()
            engine.step()
            loss_sum += loss.detach().double().cpu()
        step_loss = loss_sum / gas
        if self.dims.dp > 1 and finite:
            t = step_loss.to(self.device)
            torch.distributed.all_reduce(t, group=self.dims.dp_group)
            step_loss = t.cpu() / self.dims.dp
        return StepResult(step_loss, finite, grad_norm)

    def _pipeline_step(self, micro_batches, poison: bool) -> StepResult:
        # DeepSpeed's pipeline engine runs the 1F1B schedule over the micro-batches and steps the
        # optimizer itself; its loss is already averaged over data-parallel ranks.
        self.skipper.poison_next = poison
        step_loss = self.engine.train_batch(iter(micro_batches)).detach().double().cpu()
        finite = not self.skipper.last_skipped and bool(torch.isfinite(step_loss).item())
        return StepResult(step_loss, finite, None)
