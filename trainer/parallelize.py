"""`parallelize`: the one place where a full model becomes this rank's DeepSpeed engine.

The order, applied from outside the model (the model knows nothing of it):

    0. the caller builds the full single-process model on every rank of the replica with the same
       seed (or loads it from Hugging Face, or from a consolidated checkpoint);
    1. activation checkpointing: the recipe's choice is set on the model config (the GPT blocks
       and the pipeline layers read it);
    2. pipeline parallelism: keep only this rank's stage (DeepSpeed PipelineModule) over the
       dims' pipeline grid;
    3. tensor parallelism: split attention heads, MLP and vocabulary over `dims.tp_group`;
    4. marks for DeepSpeed's global gradient norm (each distinct tensor counted once);
    5. device: the module moves to this rank's device (the pipeline engine places its own stage);
    6. torch.compile (in place: parameter names and checkpoints unchanged);
    7. the DeepSpeed engine: ZeRO and data parallelism over `dims.dp_group`, with `dims.grid` as its
       mpu (always, so no reduction reaches past the replica), bound to the engine (`bind_mpu`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as tdist

from .dims import ParallelDims
from .ds_config import deepspeed_config, lr_lambda
from .schema import Recipe


def parallelize(model: torch.nn.Module, dims: ParallelDims, recipe: Recipe, device: torch.device,
                params=None):
    """Turn the full `model` into this rank's engine (see the module docstring for the order).

    `params`: the optimizer's parameter groups, as a function of the final module (default: weight
    decay on matrices only, `model_setup.param_groups`). Returns the DeepSpeed engine; its `.module`
    is the local (pipeline stage / tensor slice of the) model."""
    import deepspeed

    from .model_setup import param_groups

    model.config.activation_checkpointing = recipe.parallel.activation_checkpointing  # 1
    module = model
    if dims.is_pipeline:  # 2
        module = _pipeline_stage(model, dims, recipe)
    if dims.tp > 1:  # 3
        from model.tensor_parallel import apply_tensor_parallel

        # DeepSpeed marked the last stage's copy of a tied embedding `ds_pipe_replicated`; tensor
        # parallelism replaces that parameter by its slice, so carry the mark over by name.
        pipe_copies = {n for n, p in module.named_parameters() if getattr(p, "ds_pipe_replicated", False)}
        module = apply_tensor_parallel(module, dims.tp_group, sequence_parallel=recipe.parallel.sequence_parallel)
        for n, p in module.named_parameters():
            if n in pipe_copies:
                p.ds_pipe_replicated = True
    if dims.tp > 1 or dims.is_pipeline:  # 4
        mark_for_grad_norm(module, dims)
    if not dims.is_pipeline:  # 5
        module.to(device)
    if recipe.train.compile:  # 6
        # In place (nn.Module.compile): the same module, parameters and state_dict keys, so
        # checkpoints load with or without compile; only the module's call goes through dynamo.
        module.compile()
    schedule = lr_lambda(recipe)  # 7
    groups = params(module) if params is not None else param_groups(module, recipe.optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=groups, config=engine_config(recipe, dims, device),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        mpu=None if dims.is_pipeline else dims.grid,  # a pipeline engine takes the module's grid
    )
    bind_mpu(engine, dims)
    return engine


def batch_world(recipe: Recipe, dims: ParallelDims) -> int:
    """The ranks the recipe's batch is spread over: the whole job when its replicas synchronise
    (`sync.strategy` other than allreduce: parallel.global_batch is the job's), else one replica's
    (a replica that trains on its own is a run of its own)."""
    return dims.world_size if recipe.sync.strategy != "allreduce" else dims.replica_size


def engine_config(recipe: Recipe, dims: ParallelDims, device: torch.device) -> dict:
    """The DeepSpeed config of one replica: its share of the batch, over its own ranks."""
    world = batch_world(recipe, dims)
    cfg = deepspeed_config(recipe, world, device.type)
    cfg["train_batch_size"] //= world // dims.replica_size
    return cfg


def _pipeline_stage(model, dims: ParallelDims, recipe: Recipe):
    """This rank's pipeline stage of `model`, built over `dims.grid` (not a grid of its own)."""
    import deepspeed.runtime.pipe.module as ds_pipe_module

    from model.pipeline import build_pipeline_module, load_gpt_state_dict_into_pipeline

    grid = dims.grid
    original = ds_pipe_module.PipelineParallelGrid
    # PipelineModule.__init__ creates a PipelineParallelGrid (new process groups on every call);
    # hand it the one ParallelDims made, so the job's groups exist once.
    ds_pipe_module.PipelineParallelGrid = lambda *a, **k: grid
    try:
        stage = build_pipeline_module(model.config, num_stages=dims.pp, topology=grid._topo,
                                      partition_method=recipe.parallel.pp_partition, init=False)
    finally:
        ds_pipe_module.PipelineParallelGrid = original
    load_gpt_state_dict_into_pipeline(stage, model.state_dict())
    return stage


_ENGINE_CALLS = ("forward", "backward", "step", "train_batch", "eval_batch", "save_checkpoint", "load_checkpoint")
_CHECKPOINT_CALLS = ("save_checkpoint", "load_checkpoint")


def bind_mpu(engine, dims: ParallelDims) -> None:
    """Make each call into `engine` see its own groups, not those of another engine in the job.

    DeepSpeed 0.19.8 stores the mpu of the engine it initialised last in a module global
    (`deepspeed.utils.groups.mpu`) and reads it after initialisation (ZeRO-0's gradient all-reduce,
    fp32 gradient clipping, which rank writes a checkpoint): two engines over different groups in
    one process (agents, actor and critic) would reduce over each other's groups. Each public call
    restores this engine's mpu for its duration (and the previous one after it).

    Its checkpoint save and load also call `deepspeed.comm.barrier()` over the whole world, which
    would make every replica of a job wait for the others' checkpoints; for their duration the
    barrier is this replica's (the tag check that all-reduces over the world is off in the config,
    `ds_config.deepspeed_config`; our manifest checks the files)."""
    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups

    mpu, group = dims.grid, dims.replica_group

    def replica_barrier(group_=None, *args, **kwargs):
        return tdist.barrier(group=group_ if group_ is not None else group)

    for name in _ENGINE_CALLS:
        original = getattr(engine, name, None)
        if original is None:
            continue
        checkpoint = name in _CHECKPOINT_CALLS

        @functools.wraps(original)
        def call(*args, __original=original, __checkpoint=checkpoint, **kwargs):
            saved, saved_barrier = groups.mpu, ds_comm.barrier
            groups.mpu = mpu
            if __checkpoint:
                ds_comm.barrier = replica_barrier
            try:
                return __original(*args, **kwargs)
            finally:
                groups.mpu, ds_comm.barrier = saved, saved_barrier

        setattr(engine, name, call)


def mark_for_grad_norm(module, dims: ParallelDims) -> None:
    """DeepSpeed's global gradient norm (clipping, ZeRO) sums each parameter's squares over the
    model-parallel group on the ranks where `is_model_parallel_parameter(p)` holds, and sums
    everything on that group's rank 0. Count each distinct tensor exactly once: tensor-parallel
    slices on every tp rank, tp-replicated tensors on tp rank 0, and a tied embedding that both the
    first and the last pipeline stage hold only on the first."""
    for p in module.parameters():
        sharded = getattr(p, "tp_sharded", False)
        pipe_copy = getattr(p, "ds_pipe_replicated", False)
        counted = (sharded or dims.tp_rank == 0) and (not pipe_copy or dims.pp_rank == 0)
        p.model_parallel = counted
        p.tensor_model_parallel = counted


def gather_full_state_dict(module, dims: ParallelDims) -> dict[str, torch.Tensor]:
    """Collective over the replica: the full single-process state dict (float32, CPU) on every
    rank, whatever the layout (used for samples). Pipeline stages (or ZeRO-3 partitions, within each
    data-parallel group) are gathered first, then the tensor-parallel shards are merged."""
    if dims.is_pipeline:
        from model.pipeline import gather_gpt_state_dict

        sd = {k: v.detach().float().cpu() for k, v in gather_gpt_state_dict(module).items()}
    else:
        with gathered_zero3_params(module):
            sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    if dims.tp > 1:
        from model.tensor_parallel import merge_state_dicts

        shards: list = [None] * dims.tp
        tdist.all_gather_object(shards, sd, group=dims.tp_group)
        sd = merge_state_dicts(shards, module.config)
    return sd


def gathered_zero3_params(module):
    """Context in which ZeRO-3's partitioned parameters of `module` are whole (collective over
    each parameter's partition group: the data-parallel group); a no-op without ZeRO-3."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
