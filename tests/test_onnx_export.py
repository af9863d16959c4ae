"""ONNX export with the KV cache as inputs/outputs, run by ONNX Runtime, against the PyTorch model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from launch.onnx_export import OrtDecoder, write_onnx_folder
from model import GPT, GPTConfig
from tests.trainutil import env, run_train

STEPS = 16


# "llama": grouped kv heads (2 for 4 query heads: the traced SDPA); "llama-mha": one kv head per query
# head (MultiHeadAttention after the graph's rotary embedding), as "gpt2" (MultiHeadAttention).
STYLES = {"gpt2": ("gpt2", 4), "llama": ("llama", 2), "llama-mha": ("llama", 4)}


def _model(name: str) -> GPT:
    style, n_kv_head = STYLES[name]
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=300, d_model=64, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                    d_ff=128 if style == "gpt2" else 96, max_seq_len=64, style=style, kernels="torch", dropout=0.0)
    return GPT(cfg).eval()


@pytest.fixture(scope="module", params=list(STYLES))
def exported(request, tmp_path_factory):
    model = _model(request.param)
    folder = tmp_path_factory.mktemp(f"onnx-{request.param}")
    write_onnx_folder(model, folder, None, int8=True)
    return model, folder


def test_attention_is_one_multiheadattention_node_per_layer_where_it_applies(exported):
    """With one kv head per query head each layer's attention is ORT's contrib MultiHeadAttention (causal,
    past/present in and out), in the fp32 graph and its int8 copy; grouped kv heads keep the traced SDPA."""
    model, folder = exported
    manifest = json.loads((folder / "onnx.json").read_text())
    fused = model.config.n_kv_head == model.config.n_head
    assert manifest["attention"] == ("MultiHeadAttention" if fused else "sdpa")
    for name in manifest["files"].values():
        nodes = [n for n in onnx.load(folder / name).graph.node if n.op_type == "MultiHeadAttention"]
        assert len(nodes) == (model.config.n_layer if fused else 0), name
        for n in nodes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert n.domain == "com.microsoft" and attrs["unidirectional"] == 1 and attrs["num_heads"] == 4
            assert n.input[6].startswith("past_key_values.") and n.output[1].startswith("present.")
    if fused:
        ops = {n.op_type for n in onnx.load(folder / "model.onnx").graph.node}
        assert "Softmax" not in ops, sorted(ops)  # no attention left outside the op


def test_prefill_and_decode_steps_equal_the_pytorch_model(exported):
    """Rows of different lengths (left-padded in one ONNX batch), a prefill and 16 greedy steps: at
    every step each row's logits equal the PyTorch model's on that row alone, within 2e-6 (the issue
    asks 1e-4; this model's logits are ~0.1, and a graph whose GELU is the erf form instead of the
    model's tanh form, as ORT's GELU fusion made it, is 7.7e-6 off here and 1.7e-4 at gpt-tiny's size).
    For each attention path: MultiHeadAttention (gpt2, llama-mha) and the traced SDPA (llama, grouped)."""
    model, folder = exported
    prompts = [[5, 17, 33, 2, 250, 9, 14], [11], [40, 41, 42]]
    dec = OrtDecoder(folder)
    logits = dec.prefill(prompts)
    assert np.isfinite(logits).all()  # padding positions too (they attend to no real key)
    seqs = [list(p) for p in prompts]
    worst = 0.0
    for step in range(STEPS + 1):
        last = logits[:, -1] if step == 0 else logits
        for r, s in enumerate(seqs):
            with torch.no_grad():
                ref = model(torch.tensor([s]))[0, -1].numpy()
            worst = max(worst, float(np.abs(last[r] - ref).max()))
            if step == 0:  # the prefill's real positions too, not only the last
                T = len(s)
                with torch.no_grad():
                    full = model(torch.tensor([s]))[0].numpy()
                np.testing.assert_allclose(logits[r, -T:], full, atol=2e-6, rtol=0)
        tokens = last.argmax(-1).tolist()
        for r, t in enumerate(tokens):
            seqs[r].append(int(t))
        if step < STEPS:
            logits = dec.step(tokens)
    assert worst <= 2e-6, worst
    assert dec.mask.shape == (3, len(prompts[0]) + STEPS)


def test_greedy_tokens_equal_generate(exported):
    model, folder = exported
    prompts = [[3, 4, 5], [200, 100]]
    ours = OrtDecoder(folder).greedy(prompts, 10)
    ref = model.generate(prompts, max_new_tokens=10, temperature=0)
    assert ours == [r[len(p):] for p, r in zip(prompts, ref)]


def test_int8_copy_quantises_the_matmuls_and_stays_close(exported):
    model, folder = exported
    manifest = json.loads((folder / "onnx.json").read_text())
    assert manifest["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    ops = {n.op_type for n in onnx.load(folder / "model.int8.onnx").graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, sorted(ops)
    prompts = [[5, 17, 33, 2, 250, 9, 14]]
    fp32 = OrtDecoder(folder).prefill(prompts)[0]
    int8 = OrtDecoder(folder, "int8").prefill(prompts)[0]
    assert not np.array_equal(fp32, int8)
    p, q = torch.log_softmax(torch.from_numpy(fp32), -1), torch.log_softmax(torch.from_numpy(int8), -1)
    kl = (p.exp() * (p - q)).sum(-1).max().item()
    assert kl < 0.01, kl  # same distribution up to quantisation noise
    with pytest.raises(ValueError, match="has no int4 model"):
        OrtDecoder(folder, "int4")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-run")
    out = run_train(root, "exp", "train.max_steps=3")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def test_export_command_writes_a_folder_with_the_runs_logits(trained):
    out_dir = trained / "onnx"
    res = subprocess.run([sys.executable, "-m", "launch", "export", str(trained / "runs" / "exp"), str(out_dir),
                          "--format", "onnx"], env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "onnx.json", "tokenizer.json"]
    from trainer.consolidate import load_run_model

    ours, meta = load_run_model(trained / "runs" / "exp")
    v = meta["model_config"]["vocab_size"]
    ids = [[7, v - 1, 12, 99, v // 2, 4]]
    with torch.no_grad():
        ref = ours(torch.tensor(ids))[0].numpy()
    np.testing.assert_allclose(OrtDecoder(out_dir).prefill(ids)[0], ref, atol=1e-4, rtol=0)


def test_unknown_export_format_is_one_line(trained):
    res = subprocess.run([sys.executable, "-m", "launch", "export", str(trained / "runs" / "exp"),
                          str(trained / "x"), "--format", "tflite"], env=env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "error: FORMAT=tflite: unknown export format; allowed: hf, onnx, onnx-int8"
    assert not (trained / "x").exists()


@pytest.mark.parametrize("name", ["gpt2", "llama-mha"])
def test_the_stand_in_attention_computes_the_models_function_in_pytorch(name):
    """What the export traces (each attention module stood in for by the MultiHeadAttention custom op,
    here on its PyTorch reference) equals the model on real positions, prefill and a step after a past."""
    from model.onnx import OnnxDecoder, mha_attention, prefill_feeds

    model = _model(name)
    feeds = prefill_feeds([[5, 17, 33, 2], [9, 8]], 2, 4, 16)
    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    past = tuple(torch.from_numpy(feeds[k]) for k in list(feeds)[2:])
    with torch.no_grad():
        ref, *ref_present = OnnxDecoder(model)(ids, mask, past)
        with mha_attention(model):
            out, *present = OnnxDecoder(model)(ids, mask, past)
        assert all(type(b.attn).__name__ == "Attention" for b in model.blocks)  # restored
        real = mask.bool()
        torch.testing.assert_close(out[real], ref[real], atol=1e-6, rtol=0)
        step_ids, step_mask = torch.tensor([[3], [4]]), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        ref_step = OnnxDecoder(model)(step_ids, step_mask, tuple(ref_present))[0]
        with mha_attention(model):
            step = OnnxDecoder(model)(step_ids, step_mask, tuple(present))[0]
    torch.testing.assert_close(step, ref_step, atol=1e-6, rtol=0)
