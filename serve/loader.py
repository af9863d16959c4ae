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

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from launch.export import export_state_dict
from model import GPT, GPTConfig
from model.tensor_parallel import shard_state_dict
from trainer import checkpoint as ckpt
from trainer.consolidate import consolidated_state_dict
from trainer.data import EOS_TOKEN
from trainer.errors import UsageError

__all__ = ["LoadedRun", "ServedModel", "Shard", "build_module", "load_run", "module_configs"]


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


@dataclass(frozen=True)
class Shard:
    """Load 1/size of every model (tensor-parallel serving, serve.tp): `convert` turns a meta-device GPT
    into this rank's tensor-parallel module in place (`model.tensor_parallel.apply_tensor_parallel` over
    the group); its parameters are then made on `device` and filled with this rank's slices."""

    size: int
    rank: int
    convert: Callable[[torch.nn.Module], object]
    device: torch.device = torch.device("cpu")


def build_module(config: dict, state: dict[str, torch.Tensor], adapters: dict | None = None,
                 shard: Shard | None = None) -> torch.nn.Module:
    """A GPT (plain torch kernels, eval mode, no gradients) with `state` loaded; with `adapters` (LoRA specs
    by agent name) the adapters are added first, as the checkpoint holds them. With `shard`, only this
    rank's slices of `state` are copied, adapters included (the full model is never built)."""
    cfg = GPTConfig(**{**dict(config), "kernels": "torch"})
    if shard is not None:
        with torch.device("meta"):
            model = GPT(cfg, init=False)
        shard.convert(model)
        if adapters:  # this rank's shards of the adapters over the split layers (agents.lora, Megatron's split)
            from agents.lora import add_adapters

            with torch.device("meta"):
                add_adapters(model, adapters, tensor_parallel=True)
        model.to_empty(device=shard.device)  # new tensors: ties and the RoPE tables are made again
        if adapters:
            from agents.lora import rebind_adapter_parameters

            rebind_adapter_parameters(model)
        if cfg.tie_embeddings:
            model.tie_weights()
        model.reset_buffers()
        missing, unexpected = _load_slices(model, state, cfg, shard, bool(adapters))
    else:
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


def _load_slices(model: torch.nn.Module, state: dict[str, torch.Tensor], cfg: GPTConfig, shard: Shard,
                 adapters: bool = False):
    """This rank's slice of each tensor of `state` into the converted model, one tensor at a time (slicing the
    whole dict first would hold a second copy of the shard); (missing, unexpected) keys as load_state_dict.
    With adapters: the LoRA model's keys, sliced by agents.lora.shard_adapter_state_dict."""
    slices = shard_state_dict
    if adapters:
        from agents.lora import shard_adapter_state_dict as slices
    unexpected = []
    for key, tensor in state.items():
        unexpected += model.load_state_dict(slices({key: tensor}, cfg, shard.size, shard.rank),
                                            strict=False).unexpected_keys
    return sorted(set(model.state_dict()) - set(state)), unexpected


def _tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise UsageError(f"{path}: no tokenizer file (the run is incomplete)")
    return Tokenizer.from_file(str(path))


def _served(name: str, key: str, adapter: str | None, tok_path: Path, config: dict) -> ServedModel:
    tok = _tokenizer(tok_path)
    return ServedModel(name, key, adapter, tok, config["style"], int(config["max_seq_len"]), tok.token_to_id(EOS_TOKEN))


def _checkpoint(run_dir: str | Path, checkpoint: str | Path | None) -> tuple[Path, Path, dict]:
    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"RUN={run_dir}: no such run directory")
    folder = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run / "checkpoints")
    if folder is None:
        raise UsageError(f"RUN={run_dir} has no finished checkpoint to serve (checkpoints/latest is missing)")
    return run, folder, ckpt.verify(folder)


def module_configs(run_dir: str | Path, checkpoint: str | Path | None = None) -> dict[str, tuple[GPTConfig, bool]]:
    """What `load_run` would build, without reading any weights: module key -> (its GPTConfig, whether it
    carries LoRA adapters). The same UsageError as load_run for a directory that is not a finished run."""
    _, _, meta = _checkpoint(run_dir, checkpoint)
    if "agent_model_configs" not in meta:
        return {"model": (GPTConfig(**meta["model_config"]), False)}
    out = {f"agent_{a}": (GPTConfig(**c), False) for a, c in meta["agent_model_configs"].items()}
    out.update({key: (GPTConfig(**lora["config"]), True) for key, lora in meta.get("lora", {}).items()})
    return out


@contextmanager
def _mapped_loads():
    """torch.load memory-maps the checkpoint files: a rank that keeps only its slices of the weights copies
    just those (a float32 checkpoint written whole is never read into memory of its own; checkpoints that
    need merging, ZeRO-3, or a replicas' average, are still put together in memory)."""
    from torch.utils.serialization import config

    old = config.load.mmap
    config.load.mmap = True
    try:
        yield
    finally:
        config.load.mmap = old


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, shard: Shard | None = None) -> LoadedRun:
    """The run's latest finished checkpoint (or `checkpoint`), every model it serves (with `shard`: this
    tensor-parallel rank's part of each). UsageError (one line) when the directory is not a finished run."""
    run, folder, meta = _checkpoint(run_dir, checkpoint)
    with _mapped_loads() if shard is not None else nullcontext():
        if "agent_model_configs" in meta:
            modules, models = _load_agents(run, folder, meta, shard)
        else:
            config = meta["model_config"]
            models = {run.name: _served(run.name, "model", None, run / "tokenizer.json", config)}
            state, _ = export_state_dict(folder, meta)
            modules = {"model": build_module(config, state, shard=shard)}
    return LoadedRun(run, folder, modules, models)


def _load_agents(run: Path, folder: Path, meta: dict, shard: Shard | None = None):
    from agents.value import strip_value_heads  # a PPO agent's value head is not part of its policy

    modules: dict[str, torch.nn.Module] = {}
    models: dict[str, ServedModel] = {}
    tokenizers = run / "tokenizers"
    for agent, config in meta["agent_model_configs"].items():
        key = f"agent_{agent}"
        modules[key] = build_module(config, strip_value_heads(consolidated_state_dict(folder, meta, key)), shard=shard)
        models[agent] = _served(agent, key, None, tokenizers / f"{agent}.json", config)
    for key, lora in meta.get("lora", {}).items():
        state = strip_value_heads(consolidated_state_dict(folder, meta, key))
        modules[key] = build_module(lora["config"], state, lora["adapters"], shard=shard)
        for agent in lora["adapters"]:
            models[agent] = _served(agent, key, agent, tokenizers / f"{agent}.json", lora["config"])
    for agent, settings in (meta.get("config", {}).get("agents") or {}).items():
        owner = (settings or {}).get("policy_of")
        if owner is not None and owner in models:
            models[agent] = replace(models[owner], name=agent)
    if not models:
        raise UsageError(f"RUN={run}: the checkpoint holds no trained agent to serve")
    return modules, dict(sorted(models.items()))
