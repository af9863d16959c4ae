"""Export a trained run (`make export RUN=runs/<name> OUT=<dir> [FORMAT=hf|onnx|onnx-int8]`): a Hugging
Face folder (default), or an ONNX Runtime folder with the KV cache as explicit inputs
(`launch.onnx_export`), its weights optionally quantised to int8.

A Hugging Face export also writes `export.json`: the OpenAI model name each folder is served as (the names
`python -m serve RUN` gives: the run directory's name, or each agent's), which `--engine vllm`
(serve/vllm_engine.py) reads. The LoRA agents of a llama-style shared base also get that base alone
(`OUT/<component>.base/`) and each its PEFT adapter (`OUT/<agent>/adapter/`), so that vLLM can serve them all
from one process; each agent's own folder keeps the adapter merged in, as before."""

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
    if fmt == "hf":
        _write_manifest(out_dir, {run.name: {"folder": "."}})
    return {"checkpoint": str(folder), "out_dir": out_dir, "params": params, "note": note}


def export_agents(run: Path, folder: Path, meta: dict, out_dir: str, fmt: str = "hf") -> dict:
    """`out_dir/<agent>/` for every trained agent of a multi-agent run (agents.train): its weights and
    the tokenizer it was trained with, in format `fmt`."""
    params = 0
    names = []
    served: dict[str, dict] = {}  # export.json: model name -> its folder (and its LoRA adapter, if written)
    from agents.value import strip_value_heads  # a PPO agent's value head is not part of its policy

    for agent, config in meta["agent_model_configs"].items():
        state = strip_value_heads(consolidated_state_dict(folder, meta, f"agent_{agent}"))
        params += _write(config, state, run / "tokenizers" / f"{agent}.json", folder, str(Path(out_dir) / agent), fmt)
        names.append(agent)
        served[agent] = {"folder": agent}
    for component, lora in meta.get("lora", {}).items():
        # LoRA agents over one base: each folder holds the base with that agent's adapter merged
        from agents.lora import adapter_state_dict, add_adapters, base_state_dict, merged_state_dict
        from model import GPT, GPTConfig
        from model.hf import save_lora_adapter

        cfg = GPTConfig(**{**lora["config"], "kernels": "torch"})
        model = GPT(cfg, init=False)
        add_adapters(model, lora["adapters"])
        model.load_state_dict(strip_value_heads(consolidated_state_dict(folder, meta, component)))
        # vLLM serves PEFT adapters over an unmerged base, for the architectures that take LoRA: Llama yes,
        # GPT-2 no (serve/vllm_engine.py), so only a llama-style base gets its base and adapter folders.
        base = f"{component}.base"
        with_adapters = fmt == "hf" and cfg.style == "llama"
        if with_adapters:
            first = next(iter(lora["adapters"]))  # the LoRA agents share the base's vocabulary
            _write(lora["config"], base_state_dict(model), run / "tokenizers" / f"{first}.json", folder,
                   str(Path(out_dir) / base), fmt)
        for agent in lora["adapters"]:
            params += _write(lora["config"], merged_state_dict(model, agent), run / "tokenizers" / f"{agent}.json",
                             folder, str(Path(out_dir) / agent), fmt)
            names.append(agent)
            served[agent] = {"folder": agent}
            if with_adapters:
                spec = model._lora_hub.specs[agent]
                save_lora_adapter(adapter_state_dict(model, agent), cfg, spec["rank"], spec["alpha"],
                                  Path(out_dir) / agent / "adapter", f"../../{base}")
                served[agent].update(lora_base=base, adapter=f"{agent}/adapter")
    for agent, settings in (meta.get("config", {}).get("agents") or {}).items():
        owner = (settings or {}).get("policy_of")  # served by its owner's policy under its own name (serve.loader)
        if owner is not None and owner in served and agent not in served:
            served[agent] = {**served[owner], "policy_of": owner}
    if fmt == "hf":
        _write_manifest(out_dir, dict(sorted(served.items())))
    return {"checkpoint": str(folder), "out_dir": out_dir, "params": params,
            "note": f"one {'Hugging Face' if fmt == 'hf' else fmt} folder per agent: {', '.join(names)}"}


MANIFEST = "export.json"


def _write_manifest(out_dir: str, models: dict[str, dict]) -> None:
    import json

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / MANIFEST).write_text(json.dumps({"format": "hf", "models": models}, indent=1) + "\n")


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
