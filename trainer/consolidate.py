"""Consolidation: one full, single-process state dict from a checkpoint of any layout.

Used by export (`launch export`), by a resume in another layout and by the layout tests. The files
of every rank are read by one process only (`consolidate_once`), which then shares the result.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .distributed import broadcast_state_dict


def load_run_model(run: str | Path, kernels: str = "torch"):
    """(model, meta): the single model of run directory `run` at its latest checkpoint, consolidated
    from whatever layout wrote it, on the CPU in eval mode, with the checkpoint's meta."""
    from model import GPT, GPTConfig

    folder = ckpt.latest_checkpoint(Path(run) / "checkpoints")
    if folder is None:
        raise ckpt.CheckpointError(f"{run} has no finished checkpoint")
    meta = ckpt.verify(folder)
    model = GPT(GPTConfig(**{**meta["model_config"], "kernels": kernels})).eval()
    model.load_state_dict(consolidated_state_dict(folder, meta))
    return model, meta


def consolidate_once(checkpoint: Path, meta: dict, dims, component: str = "model") -> dict[str, torch.Tensor]:
    """Collective over the replica: the replica's first rank consolidates, every rank receives the
    tensors by broadcast (instead of every rank reading and merging every shard itself)."""
    sd = consolidated_state_dict(checkpoint, meta, component) if dims.is_replica_main else None
    return broadcast_state_dict(sd, src=dims.replica_ranks[0], group=dims.replica_group)


def consolidated_state_dict(checkpoint: Path, meta: dict, component: str = "model") -> dict[str, torch.Tensor]:
    """Full (unsharded) float32 weights of one component of a checkpoint, whatever layout wrote
    it: ZeRO-3 partitions are gathered with DeepSpeed's zero_to_fp32 (per tensor-parallel rank when
    tp > 1), pipeline layer files are mapped back to GPT names, and tensor-parallel shards are
    merged. Reads every rank's files: call it on one rank (`consolidate_once`)."""
    from model import GPTConfig

    folder = ckpt.component_files(checkpoint, meta, component)
    cfg = GPTConfig(**meta["model_config"])
    tp, pp = meta.get("tp", 1), meta.get("pp", 1)
    if meta.get("zero_stage", 0) == 3 and tp == 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        if cfg.tie_embeddings and "lm_head.weight" not in sd:
            # DeepSpeed records the tie on global rank 0 only: another replica's files lack it.
            sd["lm_head.weight"] = sd["tok_emb.weight"]
        return sd
    shards = []
    for t in range(tp):
        if meta.get("zero_stage", 0) == 3:
            shards.append(_zero3_tp_rank_state_dict(folder, t))
        elif pp > 1:
            from model.pipeline import pipeline_to_gpt_state_dict, read_pipeline_checkpoint_layers

            # DeepSpeed names layer files layer_XX-model_YY-model_states.pt (YY: the tp rank) when
            # the topology has a model axis, as ours always does.
            try:
                layers = read_pipeline_checkpoint_layers(folder, tp_rank=t)
            except FileNotFoundError as e:
                raise ckpt.CheckpointError(f"checkpoint {checkpoint}: {e}") from None
            shards.append(pipeline_to_gpt_state_dict(layers, cfg))
        else:
            f = folder / f"mp_rank_{t:02d}_model_states.pt"
            if not f.exists():
                raise ckpt.CheckpointError(f"checkpoint {checkpoint} holds no model states ({f.name})")
            shards.append(torch.load(f, map_location="cpu", weights_only=False)["module"])
    if tp > 1:
        from model.tensor_parallel import merge_state_dicts

        sd = merge_state_dicts(shards, cfg)
    else:
        sd = shards[0]
    return {k: v.float() for k, v in sd.items()}


def _zero3_tp_rank_state_dict(folder: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """Tensor-parallel rank `tp_rank`'s full shard from a ZeRO-3 checkpoint: its data-parallel
    partitions (files `*zero_pp_rank_<dp>_mp_rank_<tp>_*`) put together with zero_to_fp32's
    ZeRO-3 merge, which DeepSpeed itself only runs over a whole folder of one tp rank."""
    from deepspeed.utils import zero_to_fp32 as z

    model_files = sorted(folder.glob(f"zero_pp_rank_*_mp_rank_{tp_rank:02d}_model_states.pt"),
                         key=lambda f: z.natural_keys(f.name))
    optim_files = sorted(folder.glob(f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt"),
                         key=lambda f: z.natural_keys(f.name))
    if not model_files or len(model_files) != len(optim_files):
        raise ckpt.CheckpointError(f"checkpoint {folder} holds {len(model_files)} ZeRO-3 model and "
                                   f"{len(optim_files)} optimizer files for tp rank {tp_rank}")
    model_states = z.parse_model_states([str(f) for f in model_files])
    stage, dp, flat_groups, _ = z.parse_optim_states([str(f) for f in optim_files], str(folder))
    if stage != 3 or dp != len(model_files):
        raise ckpt.CheckpointError(f"checkpoint {folder}: tp rank {tp_rank} has ZeRO stage {stage} over {dp} "
                                   f"partitions, {len(model_files)} files")
    # DeepSpeed records the tied-parameter names (lm_head.weight -> tok_emb.weight) on global rank
    # 0 only (engine._get_shared_params); every tp rank's module ties the same names.
    first = folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    model_states[0].shared_params = z.parse_model_states([str(first)])[0].shared_params
    sd = z._get_fp32_state_dict_from_zero3_checkpoint(dp, flat_groups, model_states, exclude_frozen_parameters=False)
    return z.to_torch_tensor(sd)
