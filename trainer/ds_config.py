"""Generate the DeepSpeed JSON config from the recipe (the one source of truth).

Nothing DeepSpeed-specific is written by hand in recipes: batch sizes, precision, ZeRO, the
optimizer all derive from the validated `Recipe`. The learning-rate schedule is ours
(`lr_lambda` below, handed to DeepSpeed as a client scheduler) because DeepSpeed's WarmupCosineLR
spends its first two steps at lr=0.
"""

from __future__ import annotations

from .schema import Recipe


def resolve_precision(recipe: Recipe, device_type: str) -> str:
    p = recipe.train.precision
    if p == "auto":
        import torch

        return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return p


def deepspeed_config(recipe: Recipe, world_size: int, device_type: str) -> dict:
    par, opt = recipe.parallel, recipe.optim
    gas = recipe.grad_accum_steps(world_size)
    precision = resolve_precision(recipe, device_type)
    zero: dict = {"stage": par.zero_stage}
    if par.zero_stage > 0:
        zero.update(
            overlap_comm=par.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=par.bucket_size,
            allgather_bucket_size=par.bucket_size,
        )

        if par.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
        if par.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=par.bucket_size,
                        stage3_param_persistence_threshold=0,
                        stage3_gather_16bit_weights_on_model_save=False)
            if par.offload_params:
                zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    # DeepSpeed picks FusedAdam on GPUs and DeepSpeedCPUAdam with optimizer offload; on a CPU-only
    # run without offload torch's AdamW avoids a JIT build and is bit-reproducible.
    optimizer_params = {
        "lr": opt.lr,
        "betas": [opt.beta1, opt.beta2],
        "eps": opt.eps,
        "weight_decay": opt.weight_decay,
    }
    if device_type == "cpu" and not par.offload_optimizer:
        optimizer_params["torch_adam"] = True
    if opt.optimizer == "sgd":  # torch.optim.SGD (DeepSpeed builds any torch.optim class by name)
        optimizer_params = {"lr": opt.lr, "weight_decay": opt.weight_decay}
    cfg = {
        "train_batch_size": recipe.global_batch(world_size),
        "train_micro_batch_size_per_gpu": par.micro_batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": opt.grad_clip,
        "optimizer": {"type": "SGD" if opt.optimizer == "sgd" else "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # the loop reports progress itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # DeepSpeed's tag check all-reduces over the whole world at every save, which would tie
        # replicas of one job together; our checkpoints carry a sha256 manifest instead.
        "checkpoint": {"tag_validation": "Ignore"},
    }
    return cfg


def lr_lambda(recipe: Recipe):
    """Multiplier of optim.lr for optimizer step `step` (0-based): linear warm-up from
    1/warmup to 1, then cosine (or constant) down to optim.min_lr_ratio at train.max_steps."""
    import math

    opt, total = recipe.optim, recipe.train.max_steps
    warmup = min(opt.warmup_steps, total)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if opt.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
