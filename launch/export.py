"""Export a trained run as a Hugging Face folder (`make export RUN=runs/<name> OUT=<dir>`)."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer.errors import UsageError


def consolidated_state_dict(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Full (unsharded) float32 model weights of a checkpoint, whatever layout wrote it:
    ZeRO-3 partitions are gathered with DeepSpeed's zero_to_fp32 (per tensor-parallel rank when
    tp > 1), pipeline layer files are mapped back to GPT names, and tensor-parallel shards are
    merged."""
    from model import GPTConfig

    cfg = GPTConfig(**meta["model_config"])
    tp, pp = meta.get("tp", 1), meta.get("pp", 1)
    if meta.get("zero_stage", 0) == 3 and tp == 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    shards = []
    for t in range(tp):
        if meta.get("zero_stage", 0) == 3:
            shards.append(_zero3_tp_rank_state_dict(folder, t))
        elif pp > 1:
            from model.pipeline import pipeline_to_gpt_state_dict

            # DeepSpeed names layer files layer_XX-model_YY-model_states.pt (YY: the tp rank) when
            # the topology has a model axis, as ours always does.
            files = sorted(folder.glob(f"layer_*-model_{t:02d}-model_states.pt"))
            if not files:
                raise ckpt.CheckpointError(f"checkpoint {folder} holds no pipeline layer files for tp rank {t}")
            layers = {int(f.name.split("-")[0][len("layer_"):]): torch.load(f, map_location="cpu", weights_only=True)
                      for f in files}
            shards.append(pipeline_to_gpt_state_dict(layers, cfg))
        else:
            f = folder / f"mp_rank_{t:02d}_model_states.pt"
            if not f.exists():
                raise ckpt.CheckpointError(f"checkpoint {folder} holds no model states ({f.name})")
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


def export_run(run_dir: str, out_dir: str, checkpoint: str | None = None) -> dict:
    from tokenizers import Tokenizer

    from model import GPT, GPTConfig
    from model.hf import save_hf

    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"RUN={run_dir}: no such run directory")
    folder = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run / "checkpoints")
    if folder is None:
        raise UsageError(f"RUN={run_dir} has no finished checkpoint to export (checkpoints/latest is missing)")
    meta = ckpt.verify(folder)
    cfg = GPTConfig(**{k: v for k, v in meta["model_config"].items()})
    cfg.kernels = "torch"
    with torch.device("meta"):
        model = GPT(cfg, init=False)
    state = consolidated_state_dict(folder, meta)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ckpt.CheckpointError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
    model.reset_buffers("cpu")
    tok_path = run / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tok_path)) if tok_path.exists() else None
    save_hf(model, out_dir, tokenizer=tokenizer)
    return {"checkpoint": str(folder), "out_dir": out_dir, "params": sum(p.numel() for p in model.parameters())}
