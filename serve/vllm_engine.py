"""`--engine vllm`: serve a `make export FORMAT=hf` folder through vLLM processes behind the router.

Nothing here imports vLLM: each process is vLLM's own OpenAI-compatible server, `vllm serve <hf folder>`,
started by serve.router.Workers on a loopback port and waited for on its `/health` (200 once the engine is
up); the router sends each request to a process that serves the request's `model` (serve.routing).

The plan (`plan`), from the export's `export.json` (launch/export.py; without one, an older export: the
folder's own name, or each subfolder's):
  - one process per distinct HF folder; agents that share a folder (`policy_of`) are extra
    `--served-model-name`s of it (vLLM answers to every name given there);
  - the LoRA agents over one llama-style base are one process: `vllm serve <component>.base --enable-lora
    --lora-modules name=path ...`, with `--max-loras` = its adapters (all may share a batch) and
    `--max-lora-rank` = the largest adapter rank, rounded up to a rank vLLM accepts. The base's own name
    (`<component>.base`) is not one the torch server serves, so the router does not route it. An agent
    whose tokenizer differs from the base's, and every GPT-2-style LoRA agent (vLLM's GPT2LMHeadModel does
    not implement SupportsLoRA), is served from its merged folder in a process of its own instead;
  - every process: `--host 127.0.0.1 --port P --max-model-len <context of the HF config>`, and a share of
    the GPU's memory (`--gpu-memory-utilization 0.9/N`: vLLM takes 0.9 of the GPU by default, so a second
    process on the same GPU would not fit). The processes start one at a time, so each measures the memory
    the ones before it left.

vLLM's interface as followed here (the flag names, `name=path` for --lora-modules, `/health`, the LoRA
names listed by /v1/models and accepted as `model`): docs.vllm.ai "LoRA Adapters" (features/lora.md,
"Serving LoRA Adapters"), "Engine Arguments" (serving/engine_args), "OpenAI-Compatible Server", and vLLM's
source for the accepted ranks (vllm/config/lora.py, MaxLoRARanks) and the health route
(vllm/entrypoints/serve/instrumentator/health.py). None of it has been run against a real vLLM here: this
machine has none (tests/test_serve_vllm.py runs the plumbing with a stand-in executable).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from launch.export import MANIFEST
from trainer.errors import UsageError

__all__ = ["VllmProcess", "commands", "missing_vllm", "plan"]

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks (vllm/config/lora.py)
GPU_MEMORY = 0.9  # vLLM's default --gpu-memory-utilization, shared out among our processes


@dataclass
class VllmProcess:
    """One `vllm serve` process: the HF folder it loads, the names it answers to, its LoRA adapters."""

    folder: Path
    names: list[str]  # --served-model-name: the model names of the folder itself
    loras: dict[str, Path] = field(default_factory=dict)  # --lora-modules name=path
    lora_ranks: list[int] = field(default_factory=list)
    max_model_len: int = 0
    routed: bool = True  # False: `names` is the LoRA base's own name, not a model of the run

    @property
    def models(self) -> frozenset[str]:
        """The model names the router sends here (the LoRA base's own name is not one)."""
        return frozenset(self.loras) | (frozenset(self.names) if self.routed else frozenset())

    def argv(self, port: int, gpu_memory: float | None = None) -> list[str]:
        cmd = ["vllm", "serve", str(self.folder), "--served-model-name", *self.names,
               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(self.max_model_len)]
        if gpu_memory is not None:
            cmd += ["--gpu-memory-utilization", f"{gpu_memory:.3f}"]
        if self.loras:
            rank = next((r for r in LORA_RANKS if r >= max(self.lora_ranks)), None)
            if rank is None:
                raise UsageError(f"{self.folder}: a LoRA rank of {max(self.lora_ranks)} is above vLLM's largest "
                                 f"--max-lora-rank ({LORA_RANKS[-1]})")
            cmd += ["--enable-lora", "--max-loras", str(len(self.loras)), "--max-lora-rank", str(rank),
                    "--lora-modules", *(_lora_module(n, p) for n, p in self.loras.items())]
        return cmd


def _lora_module(name: str, path: Path) -> str:
    """`name=path`, vLLM's key-value form; its JSON form where the path holds `=` or `,` (vLLM splits the
    key-value form on `=` and reads anything with a `,` as JSON)."""
    if "=" in f"{name}{path}" or "," in f"{name}{path}":
        return json.dumps({"name": name, "path": str(path)})
    return f"{name}={path}"


def missing_vllm() -> str | None:
    """None when the `vllm` executable is on PATH (what --engine vllm runs); else one sentence saying what
    is missing and how to get it."""
    if shutil.which("vllm") is not None:
        return None
    if importlib.util.find_spec("vllm") is not None:
        return ("--engine vllm runs vLLM's `vllm serve`, and the vllm package is importable but its `vllm` "
                "executable is not on PATH; add its environment's bin folder to PATH")
    return ("--engine vllm needs vLLM, which is not installed (no `vllm` executable on PATH, no vllm package); "
            "install it on a CUDA machine with `pip install vllm`, or serve with --engine torch")


def _hf_context(folder: Path) -> int:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise UsageError(f"{folder}: not a Hugging Face model folder (no readable config.json)") from None
    for key in ("max_position_embeddings", "n_positions"):  # Llama's, GPT-2's
        if isinstance(cfg.get(key), int):
            return cfg[key]
    raise UsageError(f"{folder}/config.json gives no context length (max_position_embeddings or n_positions)")


def _entries(root: Path) -> dict[str, dict]:
    """export.json's models; for an export without one, the torch server's names as far as the folders
    tell: a single model named after the folder, or one model per subfolder with a config.json."""
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            return dict(json.loads(manifest.read_text())["models"])
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{manifest}: unreadable (write the export again with `make export FORMAT=hf`)") from None
    if (root / "config.json").is_file():
        return {root.name: {"folder": "."}}
    subs = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file() and not p.name.endswith(".base"))
    return {name: {"folder": name} for name in subs}


def _same_tokenizer(a: Path, b: Path) -> bool:
    ta, tb = a / "tokenizer.json", b / "tokenizer.json"
    return ta.is_file() and tb.is_file() and ta.read_bytes() == tb.read_bytes()


def plan(run: str | Path) -> list[VllmProcess]:
    """The vLLM processes that serve export folder `run` (see the module docstring); UsageError (one line)
    when it is not a Hugging Face export."""
    root = Path(run).resolve()
    if not root.is_dir():
        raise UsageError(f"RUN={run}: no such folder (--engine vllm serves a `make export FORMAT=hf` folder)")
    entries = _entries(root)
    if not entries:
        raise UsageError(f"RUN={run}: not a Hugging Face export (no config.json, no {MANIFEST}; "
                         "`make export RUN=runs/<name> OUT=<dir> FORMAT=hf` writes one)")
    by_folder: dict[Path, VllmProcess] = {}
    by_base: dict[Path, VllmProcess] = {}
    for name, entry in entries.items():
        folder = (root / entry["folder"]).resolve()
        context = _hf_context(folder)
        if entry.get("adapter") and entry.get("lora_base"):
            base = (root / entry["lora_base"]).resolve()
            adapter = (root / entry["adapter"]).resolve()
            if _same_tokenizer(base, folder) and (adapter / "adapter_config.json").is_file():
                if base not in by_base:
                    by_base[base] = VllmProcess(base, [base.name], max_model_len=_hf_context(base), routed=False)
                p = by_base[base]
                p.loras[name] = adapter
                p.lora_ranks.append(int(json.loads((adapter / "adapter_config.json").read_text())["r"]))
                continue
        if folder not in by_folder:
            by_folder[folder] = VllmProcess(folder, [], max_model_len=context)
        by_folder[folder].names.append(name)
    return [*by_folder.values(), *by_base.values()]


def commands(processes: list[VllmProcess]):
    """Workers' `command(i, port)` for these processes, each given an equal share of the GPU's memory."""
    share = GPU_MEMORY / len(processes) if len(processes) > 1 else None
    return lambda i, port: processes[i].argv(port, share)
