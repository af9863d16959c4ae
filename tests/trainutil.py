"""Helpers to run the real command line (`python -m launch train ...`) on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A 2-layer, 64-wide model on 60 stdlib files: a step takes a few milliseconds on 2 cores.
TINY = [
    "data.path=stdlib", "data.max_documents=60", "data.vocab_size=512", "data.seq_len=64",
    "model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.max_seq_len=64",
    "model.kernels=torch", "parallel.micro_batch=8", "train.eval_every=5", "train.eval_batches=2",
    "train.progress=false", "tracking.wandb=disabled", "train.sample_tokens=8", "optim.warmup_steps=2",
    # A given MFU ceiling: otherwise every rank of every run measures a 1536^3 sgemm at its start and end.
    # The tests of that measurement (test_evaluation, test_gpu_train) set train.peak_tflops=null again.
    "train.peak_tflops=1",
]


def env(**extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RECIPES_FAULT", "WANDB"))}
    e.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             PYTHONWARNINGS="ignore", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def train_cmd(root: Path, name: str, *overrides: str, recipe: str = "gpt-tiny") -> list[str]:
    return [sys.executable, "-m", "launch", "train", recipe, *TINY, f"run.name={name}",
            f"run.output_dir={root}/runs", f"data.cache_dir={root}/cache", *overrides]


def run_train(root: Path, name: str, *overrides: str, recipe: str = "gpt-tiny", timeout: int = 300,
              **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(root, name, *overrides, recipe=recipe), cwd=root, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


def metrics(root: Path, name: str) -> list[dict]:
    path = root / "runs" / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(root: Path, name: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(root, name) if "loss" in r}


def train_once(root: Path, name: str, *overrides: str, timeout: int = 600, **env_extra: str) -> dict[int, float]:
    """Train run `name` unless a finished one is already there (module-scoped roots share runs
    between tests); its losses by step."""
    if not (root / "runs" / name / "summary.json").exists():
        out = run_train(root, name, *overrides, timeout=timeout, **env_extra)
        assert out.returncode == 0, out.stderr[-3000:]
    return train_losses(root, name)


def latest_components(root: Path, name: str) -> list[dict]:
    """Every component (replica) of run `name`'s latest checkpoint, consolidated to full state dicts."""
    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    folder = ckpt.latest_checkpoint(root / "runs" / name / "checkpoints")
    meta = ckpt.verify(folder)
    return [consolidated_state_dict(folder, meta, c) for c in meta["components"]]


def byte_bpe_tokenizer(text: str, vocab_size: int = 300):
    """A small byte-level BPE tokenizer (GPT-2's kind, `<|endoftext|>` special) trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 20, trainer)
    return tok
