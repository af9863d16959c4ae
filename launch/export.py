"""Export a trained run (`make export RUN=runs/<name> OUT=<dir> [FORMAT=hf|onnx|onnx-int8]`): a Hugging
Face folder (default), or an ONNX Runtime folder with the KV cache as explicit inputs
(`launch.onnx_export`), its weights optionally quantised to int8."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer.consolidate import consolidated_state_dict
from trainer.errors import UsageError


def export_run(run_dir: str, out_dir: str, checkpoint: str | None = None, fmt: str = "hf") -> dict:
    from launch.onnx_export import FORMATS

    if fmt not in FORMATS:
        raise UsageError(f"FORMAT={fmt}: unknown export format; allowed: {', '.join(FORMATS)}")
    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"RUN={run_dir}: no such run directory")
    folder = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run / "checkpoints")
    if folder is None:
        raise UsageError(f"RUN={run_dir} has no finished checkpoint to export (checkpoints/latest is missing)")
    meta = ckpt.verify(folder)
    if "agent_model_configs" in meta:  # a multi-agent run: one folder per agent, its own weights
        return export_agents(run, folder, meta, out_dir, fmt)
    state, note = export_state_dict(folder, meta)
    tok_path = run / "tokenizer.json"
    params = _write(meta["model_config"], state, tok_path, folder, out_dir, fmt)
    return {"checkpoint": str(folder), "out_dir": out_dir, "params": params, "note": note}


def export_agents(run: Path, folder: Path, meta: dict, out_dir: str, fmt: str = "hf") -> dict:
    """`out_dir/<agent>/` for every trained agent of a multi-agent run (agents.train): its weights and
    the tokenizer it was trained with, in format `fmt`."""
    params = 0
    names = []
    from agents.value import strip_value_heads  # a PPO agent's value head is not part of its policy

    for agent, config in meta["agent_model_configs"].items():
        state = strip_value_heads(consolidated_state_dict(folder, meta, f"agent_{agent}"))
        params += _write(config, state, run / "tokenizers" / f"{agent}.json", folder, str(Path(out_dir) / agent), fmt)
        names.append(agent)
    for component, lora in meta.get("lora", {}).items():
        # LoRA agents over one base: each folder holds the base with that agent's adapter merged
        from agents.lora import add_adapters, merged_state_dict
        from model import GPT, GPTConfig

        model = GPT(GPTConfig(**{**lora["config"], "kernels": "torch"}), init=False)
        add_adapters(model, lora["adapters"])
        model.load_state_dict(strip_value_heads(consolidated_state_dict(folder, meta, component)))
        for agent in lora["adapters"]:
            params += _write(lora["config"], merged_state_dict(model, agent), run / "tokenizers" / f"{agent}.json",
                             folder, str(Path(out_dir) / agent), fmt)
            names.append(agent)
    return {"checkpoint": str(folder), "out_dir": out_dir, "params": params,
            "note": f"one {'Hugging Face' if fmt == 'hf' else fmt} folder per agent: {', '.join(names)}"}


def _write(config: dict, state: dict, tok_path: Path, folder: Path, out_dir: str, fmt: str) -> int:
    from model import GPT, GPTConfig

    cfg = GPTConfig(**dict(config))
    cfg.kernels = "torch"
    with torch.device("meta"):
        model = GPT(cfg, init=False)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ckpt.CheckpointError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
    model.reset_buffers("cpu")
    if fmt == "hf":
        from tokenizers import Tokenizer

        from model.hf import save_hf

        save_hf(model, out_dir, tokenizer=Tokenizer.from_file(str(tok_path)) if tok_path.exists() else None)
    else:
        from launch.onnx_export import write_onnx_folder

        write_onnx_folder(model.eval(), out_dir, tok_path, int8=fmt == "onnx-int8")
    return sum(p.numel() for p in model.parameters())


def export_state_dict(folder: Path, meta: dict) -> tuple[dict[str, torch.Tensor], str]:
    """The weights to export and a line saying what they are. A run whose replicas hold their own
    weights (a sync strategy) exports their consensus: the n_i/n-weighted average of the replicas
    (n_i: each replica's training samples, as FedAvg weighs them)."""
    names = meta.get("components", ["model"])
    if len(names) == 1:
        return consolidated_state_dict(folder, meta, names[0]), ""
    from agents.sync.average import fedavg

    counts = meta.get("replica_samples") or [1] * len(names)
    weights = meta["config"].get("sync", {}).get("weights", "samples")
    if weights == "equal":
        counts = [1] * len(names)
    avg = fedavg([consolidated_state_dict(folder, meta, n) for n in names], counts)
    return avg, (f"the consensus of {len(names)} replicas: their average weighted by "
                 + ("training samples n_i/n " + str(counts) if weights != "equal" else "equal shares"))
