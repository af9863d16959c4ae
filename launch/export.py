"""Export a trained run as a Hugging Face folder (`make export RUN=runs/<name> OUT=<dir>`)."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer.loop import UsageError


def consolidated_state_dict(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Full (unsharded) float32 model weights of a checkpoint, whatever layout wrote it:
    ZeRO-3 partitions are gathered with DeepSpeed's zero_to_fp32, pipeline layer files are mapped
    back to GPT names, and tensor-parallel shards are merged."""
    from model import GPTConfig

    cfg = GPTConfig(**meta["model_config"])
    tp, pp = meta.get("tp", 1), meta.get("pp", 1)
    if meta.get("zero_stage", 0) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    shards = []
    for t in range(tp):
        if pp > 1:
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
