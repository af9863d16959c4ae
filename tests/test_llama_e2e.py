"""The Llama style end to end through the command line: recipe `llama-tiny` (reduced by overrides)
trained on one process and with tensor parallelism 2 on 2 processes, each exported with
`python -m launch export` and loaded by `transformers` as a LlamaForCausalLM whose logits are ours."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainutil import env, metrics, run_train

# TINY (tests/trainutil.py) makes it 2 layers of width 64 with 4 heads; llama-tiny's 2 KV heads stay,
# so each tensor-parallel rank holds 2 query heads sharing 1 KV head and half the vocabulary.
SINGLE = ["train.max_steps=8", "train.checkpoint_every=8", "parallel.micro_batch=4"]
TP2 = [*SINGLE, "launch.procs_per_node=2", "parallel.tp=2"]


def _train_export_compare(root: Path, overrides: list[str], world: str) -> dict:
    """Train llama-tiny, export it, and check transformers' logits against ours from the checkpoint;
    returns the checkpoint's meta."""
    out = run_train(root, "llama", *overrides, recipe="llama-tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"world: {world}" in out.stdout
    losses = [r["loss"] for r in metrics(root, "llama") if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1  # it learns

    run_dir, hf_dir = root / "runs" / "llama", root / "hf"
    res = subprocess.run([sys.executable, "-m", "launch", "export", str(run_dir), str(hf_dir)], cwd=root,
                         env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step_00000008" in res.stdout

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from model import GPT, GPTConfig
    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert isinstance(hf, LlamaForCausalLM)
    assert (hf.config.num_hidden_layers, hf.config.num_attention_heads, hf.config.num_key_value_heads,
            hf.config.hidden_size) == (2, 4, 2, 64)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "class Config:\n    def __init__(self, path):\n        self.path = path\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text

    folder = ckpt.latest_checkpoint(run_dir / "checkpoints")
    meta = ckpt.verify(folder)
    ours = GPT(GPTConfig(**{**meta["model_config"], "kernels": "torch"})).eval()
    ours.load_state_dict(consolidated_state_dict(folder, meta))
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids)
        torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)
        # and the trained model is not the initial one: its loss on real text is below ln(vocab)
        loss = torch.nn.functional.cross_entropy(theirs[0, :-1], ids[0, 1:])
    assert loss.item() < math.log(meta["model_config"]["vocab_size"])
    return meta


def test_llama_tiny_trains_exports_and_matches_transformers(tmp_path):
    meta = _train_export_compare(tmp_path, SINGLE, "1 (dp=1 tp=1 pp=1 zero=0)")
    assert meta.get("tp", 1) == 1


@pytest.mark.dist
def test_llama_tp2_trains_exports_and_matches_transformers(tmp_path):
    meta = _train_export_compare(tmp_path, TP2, "2 (dp=1 tp=2 pp=1 zero=0)")
    assert meta.get("tp") == 2
