"""Apply the recipe's parallel layout to the model, from outside it, in one order:

    1. build the full model on every rank with the same seed (or load it from Hugging Face),
    2. pipeline parallelism: keep only this rank's stage (DeepSpeed PipelineModule),
    3. tensor parallelism: split attention heads, MLP and vocabulary over the tp group,
    4. the DeepSpeed engine: ZeRO and data parallelism over the data-parallel group.

Ranks are laid out by DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model: the
tensor-parallel ranks of a group are consecutive, so they share a node's fast links).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .schema import Recipe


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    topology: object | None = None
    grid: object | None = None  # PipelineParallelGrid: the process groups DeepSpeed expects (mpu)

    @property
    def is_pipeline(self) -> bool:
        return self.pp > 1

    def tp_group(self):
        return self.grid.get_slice_parallel_group() if self.grid is not None and self.tp > 1 else None

    def dp_group(self):
        return self.grid.get_data_parallel_group() if self.grid is not None else None

    def describe(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp}"


def make_layout(recipe: Recipe, rank: int, world_size: int) -> Layout:
    tp, pp = recipe.parallel.tp, recipe.parallel.pp
    dp = recipe.dp_degree(world_size)
    if tp == 1 and pp == 1:
        return Layout(1, 1, dp, 0, 0, rank)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    c = topo.get_coord(rank)
    return Layout(tp, pp, dp, c.model, c.pipe, c.data, topology=topo)


def build_parallel_model(recipe: Recipe, layout: Layout, full_model: torch.nn.Module):
    """Turn the full model into this rank's part. Returns the module to hand to DeepSpeed."""
    module = full_model
    if layout.is_pipeline:
        from model.pipeline import build_pipeline_module, load_gpt_state_dict_into_pipeline

        cfg = full_model.config
        module = build_pipeline_module(cfg, num_stages=layout.pp, topology=layout.topology,
                                       partition_method=recipe.parallel.pp_partition, init=False)
        load_gpt_state_dict_into_pipeline(module, full_model.state_dict())
        layout.grid = module._grid
    elif layout.tp > 1:
        from deepspeed.runtime.pipe.topology import PipelineParallelGrid

        layout.grid = PipelineParallelGrid(topology=layout.topology)
    if layout.tp > 1:
        from model.tensor_parallel import apply_tensor_parallel

        # DeepSpeed marked the last stage's copy of a tied embedding `ds_pipe_replicated`; tensor
        # parallelism replaces that parameter by its slice, so carry the mark over by name.
        pipe_copies = {n for n, p in module.named_parameters() if getattr(p, "ds_pipe_replicated", False)}
        module = apply_tensor_parallel(module, layout.tp_group(), sequence_parallel=recipe.parallel.sequence_parallel)
        for n, p in module.named_parameters():
            if n in pipe_copies:
                p.ds_pipe_replicated = True
    if layout.tp > 1 or layout.is_pipeline:
        mark_for_grad_norm(module, layout)
    return module


def mark_for_grad_norm(module, layout: Layout) -> None:
    """DeepSpeed's global gradient norm (clipping, ZeRO) sums each parameter's squares over the
    model-parallel group on the ranks where `is_model_parallel_parameter(p)` holds, and sums
    everything on that group's rank 0. Count each distinct tensor exactly once: tensor-parallel
    slices on every tp rank, tp-replicated tensors on tp rank 0, and a tied embedding that both the
    first and the last pipeline stage hold only on the first."""
    for p in module.parameters():
        sharded = getattr(p, "tp_sharded", False)
        pipe_copy = getattr(p, "ds_pipe_replicated", False)
        counted = (sharded or layout.tp_rank == 0) and (not pipe_copy or layout.pp_rank == 0)
        p.model_parallel = counted
        p.tensor_model_parallel = counted


def gather_full_state_dict(module, layout: Layout) -> dict[str, torch.Tensor]:
    """Collective over the whole world: the full single-process GPT state dict (float32, CPU) on
    every rank, whatever the layout (used for samples and layout-neutral checkpoints).
    Pipeline stages (or ZeRO-3 partitions, within each data-parallel group) are gathered first,
    then the tensor-parallel shards are merged."""
    if layout.is_pipeline:
        from model.pipeline import gather_gpt_state_dict

        sd = {k: v.detach().float().cpu() for k, v in gather_gpt_state_dict(module).items()}
    else:
        with gathered_zero3_params(module):
            sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    if layout.tp > 1:
        from model.tensor_parallel import merge_state_dicts

        shards: list = [None] * layout.tp
        tdist.all_gather_object(shards, sd, group=layout.tp_group())
        sd = merge_state_dicts(shards, module.config)
    return sd


def gathered_zero3_params(module):
    """Context in which ZeRO-3's partitioned parameters of `module` are whole (collective over
    each parameter's partition group: the data-parallel group); a no-op without ZeRO-3."""
    import contextlib

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
