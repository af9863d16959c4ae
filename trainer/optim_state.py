"""Adam state in a layout-independent form, so a run can change its layout (ZeRO stage,
data-parallel degree, tensor- or pipeline-parallel degree) without losing its optimizer moments.

Saved with every checkpoint: the full exp_avg / exp_avg_sq of every parameter of the
single-process GPT, by its parameter name (`GPT.named_parameters()`: a tied embedding once, as
`tok_emb.weight`), and Adam's step count. Each rank reads the moments of its own parameters:
DeepSpeed's fragment API (`safe_get/set_full_optimizer_state`) assembles and scatters the
ZeRO-1/2/3 partitions (and the bf16 pipeline optimizer's), ZeRO-0 keeps torch's per-parameter
state. They are then consolidated exactly as the weights are (`parallel.gather_full_state_dict`):
the pipeline stages of each tensor-parallel rank first (`model.pipeline`: layer names -> GPT
names; the last stage's copy of a tied embedding is left out), then the tensor-parallel shards
(`model.tensor_parallel.merge_state_dicts`). Only data-parallel rank 0 of each model-parallel
group takes part, with one `gather_object` over its pipeline group and one over its
tensor-parallel group, towards global rank 0, which writes the file. `restore` is the inverse:
`shard_state_dict` for this tensor-parallel rank, `gpt_to_pipeline_state_dict` for this stage
(its copy of a tied embedding included).

One exception: ZeRO-0 in bf16 without pipeline parallelism, whose wrapper (DeepSpeed's
FP16_Optimizer in bf16 mode) keeps the moments on its own flat fp32 master copies, out of reach of
the fragment API: such checkpoints carry no Adam state, and such a layout cannot take it either.

Costs 8 bytes per parameter on disk and a gather of the moments at each save.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

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


def _fragmented(param) -> bool:
    """The optimizer holds this parameter's fp32 state in (ZeRO or bf16-optimizer) fragments."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def reachable(engine, module, zero_stage: int) -> bool:
    """Whether this engine's Adam moments can be read and written by parameter (the same answer on
    every rank of a run): not with ZeRO-0 in bf16 without pipeline parallelism (see above)."""
    if zero_stage > 0:
        return True
    params = list(module.parameters())
    if any(_fragmented(p) for p in params):
        return True
    owned = {id(p) for group in base_optimizer(engine).param_groups for p in group["params"]}
    return any(id(p) in owned for p in params)


def _is_pipeline(module) -> bool:
    return hasattr(module, "forward_funcs") and hasattr(module, "_local_start")


def _gather_to_first(obj, group) -> list | None:
    """`obj` of every rank of `group` on the group's rank 0 (in group-rank order), else None."""
    if tdist.get_world_size(group) == 1:
        return [obj]
    first = tdist.get_rank(group) == 0
    out = [None] * tdist.get_world_size(group) if first else None
    tdist.gather_object(obj, out, dst=tdist.get_global_rank(group, 0), group=group)
    return out


def _gpt_param_names(config) -> list[str]:
    from model import GPT

    with torch.device("meta"):
        return [n for n, _ in GPT(config, init=False).named_parameters()]


def _trainable(module) -> list[tuple[str, torch.nn.Parameter]]:
    # Frozen parameters (a LoRA adapter's base) have no optimizer state to carry.
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def gather(engine, module, zero_stage: int, dims) -> dict | None:
    """Collective over the replica (`dims`): {"step": n, "moments": {parameter name: (exp_avg,
    exp_avg_sq)}} (float32, CPU) on the replica's first rank; None on the other ranks, before the
    first optimizer step, or where the moments are out of reach (ZeRO-0 in bf16, see above).
    Names are the single-process model's (`GPT.named_parameters()`, plus any trainable parameter
    the GPT does not have, such as an adapter's, under its own name); frozen parameters are left
    out."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = base_optimizer(engine)
    step = _step_count(base)
    if step is None or not reachable(engine, module, zero_stage):
        return None
    pipeline = _is_pipeline(module)
    if pipeline:
        from model.pipeline import local_layer_param_names

        layer_names = local_layer_param_names(module)
    if zero_stage > 0:
        _relink(engine)
    ea_sd, eas_sd = {}, {}
    for name, p in _trainable(module):
        if pipeline and name not in layer_names:
            continue  # a copy of the tied embedding: its owner stage reports it
        shape = getattr(p, "ds_shape", p.shape)
        if _fragmented(p):  # collective over this parameter's data-parallel group
            ea = safe_get_full_optimizer_state(p, "exp_avg")
            eas = safe_get_full_optimizer_state(p, "exp_avg_sq")
        else:
            st = base.state.get(p, {})
            if "exp_avg" in st:
                ea, eas = st["exp_avg"], st["exp_avg_sq"]
            else:  # never updated (no gradient yet): Adam's initial zeros
                ea = eas = torch.zeros(shape)
        ea_sd[name] = ea.detach().float().cpu().reshape(shape)
        eas_sd[name] = eas.detach().float().cpu().reshape(shape)

    grid = dims.grid
    if dims.tp == dims.pp == 1:  # data parallelism only: the names are the single-process model's already
        return {"step": step, "moments": {n: (ea_sd[n], eas_sd[n]) for n in ea_sd}} if dims.is_replica_main else None
    if grid.get_data_parallel_rank() != 0:
        return None  # data-parallel ranks hold the same moments (assembled above)
    config = module.config
    if pipeline:
        # Pipeline stages first, as the weights (`pipeline.gather_gpt_state_dict`): layer dicts
        # of every stage of this tensor-parallel rank, on its first stage.
        from model.pipeline import pipeline_to_gpt_state_dict

        local = {}
        for name, (idx, sub) in layer_names.items():
            local.setdefault(idx, {})[sub] = (ea_sd[name], eas_sd[name])
        parts = _gather_to_first(local, grid.get_pipe_parallel_group())
        if parts is None:
            return None
        layers: dict[int, dict] = {}
        for part in parts:
            layers.update(part)
        ea_sd = pipeline_to_gpt_state_dict({i: {k: v[0] for k, v in d.items()} for i, d in layers.items()}, config)
        eas_sd = pipeline_to_gpt_state_dict({i: {k: v[1] for k, v in d.items()} for i, d in layers.items()}, config)
    names = [n for n in _gpt_param_names(config) if n in ea_sd]  # a tied lm_head.weight is tok_emb.weight: once
    ea_sd = {n: ea_sd[n] for n in names}
    eas_sd = {n: eas_sd[n] for n in names}
    tp = getattr(module, "tensor_parallel", None)
    if tp is not None and tp.size > 1:
        # Then the tensor-parallel shards, as `parallel.gather_full_state_dict`.
        from model.tensor_parallel import merge_state_dicts

        shards = _gather_to_first((ea_sd, eas_sd), tp.group)
        if shards is None:
            return None
        ea_sd = merge_state_dicts([s[0] for s in shards], config)
        eas_sd = merge_state_dicts([s[1] for s in shards], config)
    if not dims.is_replica_main:
        return None
    return {"step": step, "moments": {n: (ea_sd[n], eas_sd[n]) for n in names}}


def local_moments(module, saved: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The saved full moments of this rank's parameters, by their name in `module`: the tensor
    slices `shard_state_dict` gives this tensor-parallel rank, then this pipeline stage's layers
    (and its copy of a tied embedding) as `gpt_to_pipeline_state_dict` names them."""
    full = saved["moments"]
    ea_sd = {n: v[0] for n, v in full.items()}
    eas_sd = {n: v[1] for n, v in full.items()}
    tp = getattr(module, "tensor_parallel", None)
    config = getattr(module, "config", None)
    if tp is not None and tp.size > 1:
        from model.tensor_parallel import shard_state_dict

        ea_sd = shard_state_dict(ea_sd, config, tp.size, tp.rank)
        eas_sd = shard_state_dict(eas_sd, config, tp.size, tp.rank)
    if _is_pipeline(module):
        from model.pipeline import gpt_to_pipeline_state_dict

        ea_sd = gpt_to_pipeline_state_dict(ea_sd, config, flat=True)
        eas_sd = gpt_to_pipeline_state_dict(eas_sd, config, flat=True)
    return {name: (ea_sd[name], eas_sd[name]) for name, _ in _trainable(module)}


def restore(engine, module, zero_stage: int, saved: dict) -> bool:
    """Collective: put saved full moments (by GPT name, see `gather`) into this engine's state,
    whatever its layout. Returns False (changing nothing) where this layout's moments are out of
    reach (ZeRO-0 in bf16, see above)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    if not reachable(engine, module, zero_stage):
        return False
    base = base_optimizer(engine)
    moments = local_moments(module, saved)
    params = _trainable(module)
    if any(_fragmented(p) for _, p in params):
        _ensure_states(engine, base, saved["step"])
        _relink(engine)
    for name, p in params:
        ea, eas = moments[name]
        if _fragmented(p):
            device = p.device if p.numel() else torch.device("cpu")
            safe_set_full_optimizer_state(p, ea.to(device), "exp_avg")
            safe_set_full_optimizer_state(p, eas.to(device), "exp_avg_sq")
        else:
            base.state[p] = {"step": torch.tensor(float(saved["step"])), "exp_avg": ea.to(p.device, p.dtype).clone(),
                             "exp_avg_sq": eas.to(p.device, p.dtype).clone()}
    for st in base.state.values():
        if "step" in st:
            st["step"] = (torch.tensor(float(saved["step"]), dtype=st["step"].dtype, device=st["step"].device)
                          if torch.is_tensor(st["step"]) else saved["step"])
    return True
