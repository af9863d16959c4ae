"""Knowledge distillation: the student (the recipe's model) learns a trained teacher's token distributions.

    distill:
      teacher: recipe:gpt-tiny      # or a run directory; `recipe:` runs are trained first when missing
      alpha: 1.0                    # loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE
      temperature: 1.0

The KL term is Hinton et al.'s: both models' logits divided by T, the teacher's softmax as the target
distribution, the mean over every token of the batch, scaled by T^2 so its gradients keep their size
as T changes. The teacher is frozen (eval mode, no gradients), loaded on every rank from its run's
latest checkpoint (whatever layout wrote it) and never saved: a resumed run reloads the same
weights, so resume stays exact. Student and teacher must share the tokenizer (checked by sha256).
Validation reports the student's plain next-token loss, so runs with and without distillation
compare directly; the summary adds the teacher's loss on the same sample and both models' decode
tokens/s measured side by side (`compare`).
"""

from __future__ import annotations

import functools
import hashlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .errors import UsageError


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_teacher(teacher: str, tokenizer_path: str | Path, device: torch.device, kernels: str = "torch",
                 dtype: torch.dtype | None = None):
    """The frozen teacher GPT of run directory `teacher` (with the student's `kernels`, so speed
    comparisons are like for like); one line when it is unusable."""
    from model import GPT, GPTConfig

    from .consolidate import consolidated_state_dict

    run = Path(teacher)
    key = f"distill.teacher={teacher}"
    if not (run / "checkpoints").is_dir():
        raise UsageError(f"{key}: not a run directory of ours (no checkpoints/); give a run directory or recipe:<name>")
    folder = ckpt.latest_checkpoint(run / "checkpoints")
    if folder is None:
        raise UsageError(f"{key}: the run has no finished checkpoint")
    meta = ckpt.verify(folder)
    if len(meta.get("components", ["model"])) != 1:
        raise UsageError(f"{key}: the run holds several models; distil from a single-model run")
    tok = run / "tokenizer.json"
    if not tok.is_file() or _sha256(tok) != _sha256(Path(tokenizer_path)):
        raise UsageError(f"{key}: the teacher was trained with another tokenizer than this run's data "
                         f"({tokenizer_path}); leave data.tokenizer unset (it defaults to the teacher's)")
    model = GPT(GPTConfig(**{**meta["model_config"], "kernels": kernels}), init=False)
    model.load_state_dict(consolidated_state_dict(folder, meta))
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def distill_loss(engine, micro_batch, device, teacher, alpha: float, temperature: float):
    """The student's loss on one micro-batch (input ids, targets): see the module docstring."""
    x, y = micro_batch
    x, y = x.to(device), y.to(device)
    student = engine(x).float()
    with torch.no_grad():
        target = F.log_softmax(teacher(x).float() / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    kl = (target.exp() * (target - log_q)).sum(-1).mean() * temperature ** 2
    if alpha == 1.0:
        return kl
    ce = F.cross_entropy(student.reshape(-1, student.shape[-1]), y.reshape(-1))
    return alpha * kl + (1.0 - alpha) * ce


def loss_fn(recipe, teacher, device):
    return functools.partial(distill_loss, device=device, teacher=teacher, alpha=recipe.distill.alpha,
                             temperature=recipe.distill.temperature)


@torch.no_grad()
def decode_tokens_per_s(models: dict[str, torch.nn.Module], vocab: int, batch: int = 8, prompt: int = 16,
                        new: int = 32, rounds: int = 3) -> dict[str, float]:
    """Greedy decoding tokens/s of each model on the same prompts, rounds interleaved (median)."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (batch, prompt), generator=g).tolist()
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        names = list(models)
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            models[name].generate(prompts, max_new_tokens=new, temperature=0)
            times[name].append(time.perf_counter() - t)
    return {name: batch * new / statistics.median(ts) for name, ts in times.items()}


def compare(teacher, student, summary: dict, val_blocks, recipe, dims, device) -> dict:
    """The summary's teacher figures: its loss on the whole validation split (the student's is
    `val_loss_full`), the perplexity ratio, and both models' decode tokens/s side by side (not
    under ZeRO-3, where this rank holds a shard of the student)."""
    import math

    from .evaluation import evaluate

    loss, _ = evaluate(teacher, val_blocks, recipe.parallel.micro_batch, None, dims.dp_rank, dims.dp, device,
                       group=dims.dp_group)
    out = {"teacher": recipe.distill.teacher, "teacher_params": sum(p.numel() for p in teacher.parameters()),
           "teacher_val_loss_full": loss,
           "ppl_ratio_student_teacher": math.exp(summary["val_loss_full"] - loss),
           "decode_tokens_per_s": None, "speedup_student_teacher": None}
    # One request at a time (per-layer overhead dominates, so depth counts fully) and a batch of 8
    # (the shared embedding and output head weigh more): both, not a chosen one.
    if recipe.parallel.zero_stage == 3:
        print("distill: decode tokens/s not measured under ZeRO-3 (each rank holds a shard of the student)",
              flush=True)
        return out
    was_training = student.training
    student.eval()
    tps = {f"batch{b}": decode_tokens_per_s({"student": student, "teacher": teacher}, teacher.config.vocab_size,
                                             batch=b) for b in (1, 8)}
    student.train(was_training)
    out["decode_tokens_per_s"] = tps
    out["speedup_student_teacher"] = {b: t["student"] / t["teacher"] for b, t in tps.items()}
    return out
