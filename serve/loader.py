"""Load a trained run for serving: every model name it answers to, each with the module that generates
it, its LoRA adapter in that module (if any) and its tokenizer.

- A single-model run (`runs/<name>` from `make train`): one model named after the run directory, with the
  weights `make export` would write (`launch.export.export_state_dict`: the model, or the consensus of a
  run's replicas) and `<run>/tokenizer.json`.
- A multi-agent run (agents/train.py): one model per agent. An agent with its own weights (checkpoint
  component `agent_<name>`) gets its own module; the LoRA agents of one shared base (component `lora_<i>`)
  share one module holding every adapter, so their requests batch together, each row with its own adapter.
  An agent acting with another's policy (`policy_of`) is served by that policy under its own name. Frozen
  full-weight agents are not in the checkpoint and are not served (as `make export` does not write them).
  Tokenizers: `<run>/tokenizers/<agent>.json`.

The weights are read exactly as `launch/export.py` reads them (latest finished checkpoint, verified
manifest, consolidated shards, PPO value heads stripped) and loaded into `model.GPT` with the plain torch
kernels: serving runs on whatever machine the run is copied to, without building fused kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from launch.export import export_state_dict
from model import GPT, GPTConfig
from trainer import checkpoint as ckpt
from trainer.consolidate import consolidated_state_dict
from trainer.data import EOS_TOKEN
from trainer.errors import UsageError

__all__ = ["LoadedRun", "ServedModel", "build_module", "load_run"]


@dataclass(frozen=True)
class ServedModel:
    """One name of the OpenAI `model` field."""

    name: str
    module_key: str  # which loaded module (one DecodeEngine each) generates it
    adapter: str | None  # its LoRA adapter inside that module (None: the module's own weights)
    tokenizer: object  # a `tokenizers.Tokenizer`
    style: str  # the model style (gpt2 | llama): picks the chat template
    context: int  # max_seq_len: prompt + completion tokens must fit in it
    eos_id: int | None  # <|endoftext|>, which ends a completion (None: the tokenizer has none)


@dataclass
class LoadedRun:
    run_dir: Path
    checkpoint: Path
    modules: dict[str, torch.nn.Module]
    models: dict[str, ServedModel]


def build_module(config: dict, state: dict[str, torch.Tensor], adapters: dict | None = None) -> torch.nn.Module:
    """A GPT (plain torch kernels, eval mode, no gradients) with `state` loaded; with `adapters` (LoRA specs
    by agent name) the adapters are added first, as the checkpoint holds them."""
    cfg = GPTConfig(**{**dict(config), "kernels": "torch"})
    model = GPT(cfg, init=False)
    if adapters:
        from agents.lora import add_adapters

        add_adapters(model, adapters)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if cfg.tie_embeddings:  # the tied head may be saved under either name or both
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ckpt.CheckpointError(f"the checkpoint does not match the model: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
    return model.eval().requires_grad_(False)


def _tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise UsageError(f"{path}: no tokenizer file (the run is incomplete)")
    return Tokenizer.from_file(str(path))


def _served(name: str, key: str, adapter: str | None, tok_path: Path, config: dict) -> ServedModel:
    tok = _tokenizer(tok_path)
    return ServedModel(name, key, adapter, tok, config["style"], int(config["max_seq_len"]), tok.token_to_id(EOS_TOKEN))


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> LoadedRun:
    """The run's latest finished checkpoint (or `checkpoint`), every model it serves. UsageError (one line)
    when the directory is not a finished run."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"RUN={run_dir}: no such run directory")
    folder = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run / "checkpoints")
    if folder is None:
        raise UsageError(f"RUN={run_dir} has no finished checkpoint to serve (checkpoints/latest is missing)")
    meta = ckpt.verify(folder)
    if "agent_model_configs" in meta:
        modules, models = _load_agents(run, folder, meta)
    else:
        state, _ = export_state_dict(folder, meta)
        config = meta["model_config"]
        modules = {"model": build_module(config, state)}
        models = {run.name: _served(run.name, "model", None, run / "tokenizer.json", config)}
    return LoadedRun(run, folder, modules, models)


def _load_agents(run: Path, folder: Path, meta: dict):
    from agents.value import strip_value_heads  # a PPO agent's value head is not part of its policy

    modules: dict[str, torch.nn.Module] = {}
    models: dict[str, ServedModel] = {}
    tokenizers = run / "tokenizers"
    for agent, config in meta["agent_model_configs"].items():
        key = f"agent_{agent}"
        modules[key] = build_module(config, strip_value_heads(consolidated_state_dict(folder, meta, key)))
        models[agent] = _served(agent, key, None, tokenizers / f"{agent}.json", config)
    for key, lora in meta.get("lora", {}).items():
        state = strip_value_heads(consolidated_state_dict(folder, meta, key))
        modules[key] = build_module(lora["config"], state, lora["adapters"])
        for agent in lora["adapters"]:
            models[agent] = _served(agent, key, agent, tokenizers / f"{agent}.json", lora["config"])
    for agent, settings in (meta.get("config", {}).get("agents") or {}).items():
        owner = (settings or {}).get("policy_of")
        if owner is not None and owner in models:
            models[agent] = replace(models[owner], name=agent)
    if not models:
        raise UsageError(f"RUN={run}: the checkpoint holds no trained agent to serve")
    return modules, dict(sorted(models.items()))
