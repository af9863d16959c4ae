"""`make export` writes a run as a Hugging Face folder; `model.init_from` starts a run from one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.trainutil import REPO, env, metrics, run_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = run_train(root, "exp", "train.max_steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def test_export_loads_in_transformers_with_same_logits(trained):
    out_dir = trained / "hf"
    res = subprocess.run([sys.executable, "-m", "launch", "export", str(trained / "runs" / "exp"), str(out_dir)],
                         cwd=trained, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model import GPT, GPTConfig
    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict

    hf = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tok = AutoTokenizer.from_pretrained(out_dir)
    text = "def main(argv):\n    return 0\n"
    ids = tok(text, return_tensors="pt").input_ids
    folder = ckpt.latest_checkpoint(trained / "runs" / "exp" / "checkpoints")
    meta = ckpt.verify(folder)
    ours = GPT(GPTConfig(**{**meta["model_config"], "kernels": "torch"})).eval()
    ours.load_state_dict(consolidated_state_dict(folder, meta))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    assert tok.decode(ids[0]) == text


def test_export_usage_errors(tmp_path):
    res = subprocess.run(["make", "-s", "export", "RUN=", "OUT="], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and "usage: make export RUN=runs/<name> OUT=<dir>" in res.stderr
    res = subprocess.run([sys.executable, "-m", "launch", "export", str(tmp_path / "nope"), str(tmp_path / "o")],
                         env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: RUN=") and "Traceback" not in res.stderr


def test_init_from_exported_folder_continues_from_its_weights(trained):
    hf_dir = trained / "hf"
    if not hf_dir.exists():
        pytest.skip("needs test_export_loads_in_transformers_with_same_logits")
    # Same tokenizer (the exported one), learning rate ~0: the first loss is the exported model's loss.
    out = run_train(trained, "ft", "train.max_steps=2", f"model.init_from={hf_dir}",
                    f"data.tokenizer={hf_dir / 'tokenizer.json'}", "optim.lr=1e-12")
    assert out.returncode == 0, out.stderr[-3000:]
    base = [r for r in metrics(trained, "exp") if "loss" in r]
    ft = [r for r in metrics(trained, "ft") if "loss" in r]
    fresh = run_train(trained, "fresh", "train.max_steps=1", f"data.tokenizer={hf_dir / 'tokenizer.json'}")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    first_fresh = [r for r in metrics(trained, "fresh") if "loss" in r][0]["loss"]
    # started from trained weights: far below a fresh model's first loss, near the end of the source run
    assert ft[0]["loss"] < first_fresh - 0.3
    assert ft[0]["loss"] == pytest.approx(base[-1]["loss"], abs=0.3)
