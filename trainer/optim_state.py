"""Adam state in a layout-independent form, so a run can change its ZeRO stage or data-parallel
degree without losing its optimizer moments.

Saved with every checkpoint of a layout without tensor or pipeline parallelism (except ZeRO-0
in bf16, whose wrapper hides its fp32 master copies): the full
exp_avg / exp_avg_sq of every parameter, by parameter name, and Adam's step count. DeepSpeed's
fragment API (`safe_get/set_full_optimizer_state`) assembles and scatters the ZeRO-1/2/3
partitions; ZeRO-0 keeps torch's per-parameter state. Costs 8 bytes per parameter on disk and a
gather of the moments at each save, which is why it is limited to the layouts that need it.
"""

from __future__ import annotations

import torch

FILE = "adam_full.pt"


def base_optimizer(engine):
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _relink(engine) -> None:
    """DeepSpeed's ZeRO-1/2 links each parameter to its optimizer-state fragments lazily, after the
    first step() of the first param group only, so later groups stay unlinked (0.19.8); link again
    now that every group's state exists."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _ensure_states(engine, base, step: int) -> None:
    """Create Adam state (as torch's AdamW would at its first step) so it can be overwritten. ZeRO-3
    hands its flat fp32 partitions to the torch optimizer only inside step(), so take them from
    the ZeRO optimizer itself."""
    params = [p for group in base.param_groups for p in group["params"]]
    params += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    for p in params:
        st = base.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(float(step))
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _step_count(base) -> int | None:
    for st in base.state.values():
        if "step" in st:
            return int(st["step"])
    return None


def gather(engine, module, zero_stage: int) -> dict | None:
    """Collective over the data-parallel ranks: {"step": n, "moments": {name: (exp_avg, exp_avg_sq)}}
    on CPU, or None before the first optimizer step."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = base_optimizer(engine)
    step = _step_count(base)
    if step is None:
        return None
    _relink(engine)
    moments = {}
    for name, p in module.named_parameters():
        shape = getattr(p, "ds_shape", p.shape)
        if zero_stage == 0:
            st = base.state.get(p, {})
            if "exp_avg" not in st:
                # ZeRO-0 with bf16: DeepSpeed's wrapper keeps the moments on its own fp32 master
                # copies, out of reach of the fragment API; such checkpoints carry no Adam state.
                return None
            ea, eas = st["exp_avg"], st["exp_avg_sq"]
        else:
            ea = safe_get_full_optimizer_state(p, "exp_avg")
            eas = safe_get_full_optimizer_state(p, "exp_avg_sq")
        moments[name] = (ea.detach().float().cpu().reshape(shape), eas.detach().float().cpu().reshape(shape))
    return {"step": step, "moments": moments}


def restore(engine, module, zero_stage: int, saved: dict) -> None:
    """Collective: put saved moments into this engine's (possibly differently partitioned) state."""
    from deepspeed.utils import safe_set_full_optimizer_state

    base = base_optimizer(engine)
    if zero_stage > 0:
        _ensure_states(engine, base, saved["step"])
        _relink(engine)
    for name, p in module.named_parameters():
        ea, eas = saved["moments"][name]
        if zero_stage == 0:
            base.state[p] = {"step": torch.tensor(float(saved["step"])), "exp_avg": ea.to(p.device, p.dtype).clone(),
                             "exp_avg_sq": eas.to(p.device, p.dtype).clone()}
        else:
            device = p.device if p.numel() else torch.device("cpu")
            safe_set_full_optimizer_state(p, ea.to(device), "exp_avg")
            safe_set_full_optimizer_state(p, eas.to(device), "exp_avg_sq")
    for st in base.state.values():
        if "step" in st:
            st["step"] = (torch.tensor(float(saved["step"]), dtype=st["step"].dtype, device=st["step"].device)
                          if torch.is_tensor(st["step"]) else saved["step"])
