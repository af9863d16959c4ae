"""Evaluation figures: bits per byte, the gzip baseline, the fixed validation sample, the peak
FLOP/s behind MFU and loss.png, each against an independent computation."""

from __future__ import annotations

import math
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from model import flops as F
from trainer import evaluation as E
from trainer.data import EOS_TOKEN, DataSpec, TokenBlocks, eval_sample, iterate_eval, prepare_data

T = 16


# ------------------------------------------------------------------------------ a known text, a model

def _corpus(root):
    """Documents with multi-byte UTF-8 (bytes != characters) in a few files."""
    rng = random.Random(7)
    words = ["def", "return", "naïve", "café", "日本語", "🎉", "loss", "token", "x = 1", "\n", "    "]
    root.mkdir(parents=True)
    texts = {}
    for i in range(10):
        text = " ".join(rng.choice(words) for _ in range(250))
        (root / f"doc{i}.txt").write_text(text, encoding="utf-8")
        texts[f"doc{i}.txt"] = text
    return texts


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """The real data pipeline on a known corpus, and a GPT trained a little on its train split
    (an informative model: a misaligned target or a wrong token would change the loss)."""
    tmp = tmp_path_factory.mktemp("bpb")
    texts = _corpus(tmp / "corpus")
    data = prepare_data(DataSpec(path=str(tmp / "corpus"), vocab_size=300, seq_len=T, val_fraction=0.3, num_proc=1),
                        tmp / "cache", show_progress=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(style="llama", vocab_size=data.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=T))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = TokenBlocks(data.train_tokens, T)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        x, y = train.get(torch.randint(0, len(train), (16,), generator=gen))
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
    model.eval()
    return texts, data, model


def _nll64(model: GPT, ids: list[int], windows: list[int]) -> float:
    """Total NLL (nats) of the next tokens of the given T-token windows of `ids`, in float64, from
    the model's hidden states and head (no loss code of the repo involved)."""
    m64 = GPT(model.config, init=False).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    m64.eval()
    x = torch.tensor([ids[i * T:(i + 1) * T] for i in windows])
    y = torch.tensor([ids[i * T + 1:(i + 1) * T + 1] for i in windows])
    with torch.no_grad():
        logp = torch.log_softmax(m64.head(m64.hidden_states(x)), dim=-1)
    return float(-logp.gather(-1, y[..., None]).sum())


def test_bits_per_byte_equals_float64_recomputation(known):
    texts, data, model = known
    # The known text: the validation documents, each followed by the separator.
    text = data.val_text()
    docs = text.split(EOS_TOKEN)
    assert docs[-1] == "" and len(docs) > 2 and set(docs[:-1]) <= set(texts.values())
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > len(text)  # multi-byte characters: bytes, not characters, are counted
    ids = data.tokenizer.encode(text).ids  # tokenised here, not read from the cache
    n = (len(ids) - 1) // T  # windows of T predicted tokens
    total = _nll64(model, ids, list(range(n)))

    # Production: the loop's full evaluation (batches of 3: a smaller last batch) and conversion.
    loss, n_pred = E.evaluate(model, TokenBlocks(data.val_tokens, T), 3, None, 0, 1, torch.device("cpu"))
    assert n_pred == n * T
    got = E.bits_per_byte(loss, data.val_num_tokens, data.val_bytes)
    # Total code length of the text in bits over its UTF-8 bytes; the len(ids) - n*T tokens that no
    # window predicts (the first, and the tail shorter than a window) charged the mean loss.
    want = total / math.log(2) / n_bytes * len(ids) / (n * T)
    assert got == pytest.approx(want, rel=1e-5)
    assert len(ids) - n * T < T + 1  # that share is under one window's worth of tokens
    assert 0.5 < got < 8


def test_evaluation_sharded_over_ranks_is_the_same_mean(known):
    """Two data-parallel ranks (without the all_reduce): token-weighted, their means give the
    single process's; the rank with fewer batches counts its repeated batch with weight 0."""
    _, data, model = known
    blocks = TokenBlocks(data.val_tokens, T)
    cpu = torch.device("cpu")
    one, n = E.evaluate(model, blocks, 4, None, 0, 1, cpu)
    assert math.ceil(len(blocks) / 4) % 2 == 1  # odd batch count: rank 1 has one batch less
    parts = [E.evaluate(model, blocks, 4, None, r, 2, cpu) for r in (0, 1)]
    assert sum(k for _, k in parts) == n
    assert sum(loss * k for loss, k in parts) / n == pytest.approx(one, rel=1e-6)


def test_gzip_baseline_matches_gzip_command(known, tmp_path):
    if shutil.which("gzip") is None:
        pytest.skip("no gzip command")
    _, data, _ = known
    text = data.val_text()
    (tmp_path / "val.txt").write_bytes(text.encode("utf-8"))
    out = subprocess.run(["gzip", "-9", "-n", "-c", str(tmp_path / "val.txt")], capture_output=True, check=True).stdout
    cli = 8 * len(out) / len(text.encode("utf-8"))
    # Python's zlib and GNU gzip implement deflate separately: same level, sizes within 2%.
    assert E.gzip_bits_per_byte(text) == pytest.approx(cli, rel=0.02)


# ---------------------------------------------------------------------------- the validation sample

def test_eval_sample_is_fixed_and_spread_over_the_split():
    n, bs = 1000, 8
    idx = eval_sample(n, bs, 5)
    assert len(idx) == 40 and len(set(idx.tolist())) == 40
    assert np.array_equal(idx, eval_sample(n, bs, 5))  # the same blocks at every call
    assert np.all(np.diff(idx) == 25)  # even stride n / m
    assert idx[0] == 0 and idx[-1] == 975  # from the start to the end of the split
    # None, or a sample as large as the split: every block, in order
    assert np.array_equal(eval_sample(n, bs, None), np.arange(n))
    assert np.array_equal(eval_sample(30, bs, 5), np.arange(30))
    # uneven ratio: still distinct, increasing, inside the split
    idx = eval_sample(101, 3, 7)
    assert len(idx) == 21 and np.all(np.diff(idx) >= 4) and idx[-1] <= 100


def test_periodic_evaluation_uses_the_spread_sample(known):
    """evaluate(max_batches=k) is the mean over the evenly spread blocks, not the first k batches."""
    _, data, model = known
    blocks = TokenBlocks(data.val_tokens, T)
    ids = data.val_tokens.tolist()
    k, bs = 2, 3
    chosen = eval_sample(len(blocks), bs, k).tolist()
    assert chosen != list(range(k * bs))
    got = [torch.cat([x for x, _ in iterate_eval(blocks, bs, k)])]
    assert torch.equal(got[0], blocks.get(chosen)[0])
    loss, n = E.evaluate(model, blocks, bs, k, 0, 1, torch.device("cpu"))
    assert n == k * bs * T
    assert loss == pytest.approx(_nll64(model, ids, chosen) / n, rel=1e-5)
    first = _nll64(model, ids, list(range(k * bs))) / n
    assert abs(first - loss) > 1e-4  # the two samples do differ: the test tells them apart


# --------------------------------------------------------------------------------- peak FLOP/s (MFU)

def test_cpu_peak_is_a_measured_matmul_ceiling(monkeypatch):
    """The best repetition's rate, 2 n^3 / seconds; timed until the budget is spent."""
    times = iter([0.0,            # start (before the warm-up)
                  1.0, 1.5,       # rep 1: 0.5 s
                  1.5, 1.75,      # rep 2: 0.25 s (best)
                  1.75, 2.75,     # rep 3: 1 s; past the 2 s budget -> stop
                  3.0])           # end
    monkeypatch.setattr(F.time, "perf_counter", lambda: next(times))
    calls = []
    monkeypatch.setattr(F.torch, "mm", lambda a, b, out: calls.append(a.shape))
    rate, source = F.measure_matmul_flops(n=64, budget_s=2.0, min_reps=2, max_reps=10)
    assert len(calls) == 4  # warm-up + 3 timed
    assert rate == 2 * 64**3 / 0.25
    assert f"{rate / 1e9:.1f} GFLOP/s" in source and "best of 3" in source and "64x64x64" in source
    assert f"{torch.get_num_threads()} thread" in source and "measured CPU sgemm" in source


def test_cpu_peak_measured_for_real_is_short_and_plausible():
    import time

    t0 = time.perf_counter()
    rate, source = F.peak_flops(torch.device("cpu"), None)
    took = time.perf_counter() - t0
    threads = torch.get_num_threads()
    assert source.startswith(f"measured CPU sgemm 1536x1536x1536 on {threads} thread")
    assert took < 5.0  # budget 0.5 s: products of 0.04 s (0.2 s on a busy machine), at least 3
    # (how fast is not asserted: a shared machine makes any timing noisy)
    # fp32 per core: at most 2 AVX-512 FMA units x 16 lanes x 2 FLOP = 64 FLOP/cycle; at <= 6 GHz that is
    # 384 GFLOP/s (a Xeon of this project's machines measured 206 per core at its turbo clock)
    assert 1e9 < rate < 384e9 * threads


def test_peak_sources(monkeypatch):
    def no_measure(**kw):
        raise AssertionError("must not measure")

    monkeypatch.setattr(F, "measure_matmul_flops", no_measure)
    assert F.peak_flops(torch.device("cpu"), 0.25) == (0.25e12, "train.peak_tflops = 0.25 TFLOP/s")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak, source = F.peak_flops(torch.device("cuda", 0), None)
    assert peak == 989e12 and "H100 datasheet bf16 dense peak" in source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert F.peak_flops(torch.device("cuda", 0), None)[0] == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert F.peak_flops(torch.device("cuda", 0), None) == (0.0, "unknown GPU 'Mystery GPU': set train.peak_tflops")


# ------------------------------------------------------------------------------------------- loss.png

def test_loss_plot_keeps_the_full_split_apart(tmp_path):
    from trainer.tracking import Tracker

    tr = Tracker(tmp_path, {}, "disabled", "p", None, None, [], None)
    for s in range(1, 11):
        tr.log({"step": s, "loss": 5.0 - 0.1 * s})
    tr.log({"step": 5, "val_loss": 4.6})
    tr.log({"step": 10, "val_loss": 4.2, "val_loss_full": 4.3})
    fig = tr.figure()
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert set(lines) == {"train", "validation (fixed sample)", "validation (full split)"}
    assert list(lines["validation (fixed sample)"].get_ydata()) == [4.6, 4.2]
    full = lines["validation (full split)"]
    assert list(full.get_xdata()) == [10] and list(full.get_ydata()) == [4.3] and full.get_linestyle() == "None"
    tr.plot()
    assert (tmp_path / "loss.png").stat().st_size > 0


# ------------------------------------------------------------------------- the loop, end to end

def test_run_evaluates_one_sample_throughout_and_reports_the_full_split(tmp_path):
    """A real run: every evaluation (periodic and final) is the loss on the same evenly spread
    blocks, recomputed here from the checkpoint of that step; the final one also reports the whole
    split under its own keys; every MFU figure carries the peak it was divided by and its source."""
    import json

    from tests.trainutil import TINY, metrics, run_train
    from trainer import checkpoint as ckpt
    from trainer.consolidate import consolidated_state_dict
    from trainer.loop import _prepare_data
    from trainer.recipe import load_recipe

    overrides = ["train.max_steps=10", "train.checkpoint_every=5", "train.peak_tflops=null"]  # measured
    out = run_train(tmp_path, "ev", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics(tmp_path, "ev")
    evals = {r["step"]: r for r in rows if "val_loss" in r}
    assert sorted(evals) == [5, 10]
    assert "val_loss_full" not in evals[5] and evals[5]["val_tokens"] == evals[10]["val_tokens"] == 2 * 8 * 64

    recipe = load_recipe("gpt-tiny", [*TINY, "run.name=ev", f"run.output_dir={tmp_path}/runs",
                                      f"data.cache_dir={tmp_path}/cache", *overrides])
    data = _prepare_data(recipe, main_first=True)
    blocks = TokenBlocks(data.val_tokens, 64)
    sample = eval_sample(len(blocks), 8, 2)
    assert len(sample) < len(blocks) and sample[-1] > len(blocks) // 2  # spread, not the first batches

    def loss_at(step: int, indices) -> float:
        folder = tmp_path / "runs" / "ev" / "checkpoints" / f"step_{step:08d}"
        meta = ckpt.verify(folder)
        model = GPT(GPTConfig(**meta["model_config"]))
        model.load_state_dict(consolidated_state_dict(folder, meta))
        model.eval()
        with torch.no_grad():
            x, y = blocks.get(indices)
            logp = torch.log_softmax(model(x).double(), dim=-1)
            return float(-logp.gather(-1, y[..., None]).mean())

    for step in (5, 10):
        assert evals[step]["val_loss"] == pytest.approx(loss_at(step, sample), rel=1e-5), step
    final = evals[10]
    assert final["val_loss_full"] == pytest.approx(loss_at(10, np.arange(len(blocks))), rel=1e-5)
    assert final["val_tokens_full"] == len(blocks) * 64
    assert final["val_bpb_full"] == pytest.approx(
        E.bits_per_byte(final["val_loss_full"], data.val_num_tokens, data.val_bytes), rel=1e-12)

    summary = json.loads((tmp_path / "runs" / "ev" / "summary.json").read_text())
    assert summary["final_val_loss"] == final["val_loss"] and summary["val_loss_full"] == final["val_loss_full"]
    assert summary["val_bpb_full"] == final["val_bpb_full"] and summary["val_tokens_full"] == final["val_tokens_full"]
    assert f"full val split:  loss {final['val_loss_full']:.4f}" in out.stdout
    assert f"model {final['val_bpb_full']:.3f} on the full split" in out.stdout

    # MFU: tokens/s x FLOP/token over one process's measured ceiling, named in every figure.
    fpt = GPT(GPTConfig(**ckpt.verify(tmp_path / "runs" / "ev" / "checkpoints" / "step_00000010")["model_config"]),
              init=False).flops_per_token(64)
    steps = [r for r in rows if r.get("tokens_per_s")]
    assert len(steps) == 10
    source, peak = steps[0]["peak_flops_source"], steps[0]["peak_flops"]  # measured at start-up
    assert source.startswith("measured CPU sgemm 1536x1536x1536 on 1 thread")  # OMP_NUM_THREADS=1
    for r in steps:
        assert r["peak_flops_source"] == source and r["peak_flops"] == peak
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / r["peak_flops"], rel=1e-9)
    # the summary: the higher of the start-up and end-of-run measurements (model.flops.end_of_run_peak)
    assert summary["peak_flops"] == peak and summary["peak_flops_source"] == source or (
        summary["peak_flops"] > peak and summary["peak_flops_source"].endswith("(at the end of the run, above the start's)"))
    assert summary["mfu"] == pytest.approx(fpt * summary["tokens_per_s"] / summary["peak_flops"], rel=1e-9)
    assert f"({summary['peak_flops_source']})" in out.stdout.split("throughput:")[1].splitlines()[0]
    assert f"MFU: {fpt / 1e6:.2f} MFLOP/token against 1 x" in out.stdout and source in out.stdout


def test_run_threads_sets_torchs_threads_in_the_run(tmp_path):
    """`run.threads` is what the run's torch uses, over the environment's OMP_NUM_THREADS=1 (the test
    env): the start-up matmul ceiling names the threads it was measured on."""
    from tests.trainutil import metrics, run_train

    out = run_train(tmp_path, "th", "train.max_steps=2", "train.checkpoint_every=null", "run.threads=2",
                    "train.peak_tflops=null")
    assert out.returncode == 0, out.stderr[-3000:]
    source = next(r["peak_flops_source"] for r in metrics(tmp_path, "th") if r.get("tokens_per_s"))
    assert source.startswith("measured CPU sgemm 1536x1536x1536 on 2 threads"), source
    bad = run_train(tmp_path, "th0", "run.threads=0")
    assert bad.returncode == 2 and "run.threads" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
