"""`make bench`'s kernel table (bench/bench_kernels.py --quick on CPU): every kernel and dtype gets
an eager and a fused row with numbers, the file is written where --out says, and a training-step
section already in that file (bench_step.py's) survives the rewrite. `make bench-train`
(bench/bench_train.py): the table's medians, ratios and MFU follow from its measured rounds."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_quick_kernel_table(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from bench_kernels import device_slug
    finally:
        sys.path.remove(str(REPO / "bench"))
    path = tmp_path / f"{device_slug('cpu')}-quick.md"
    step_section = "<!-- bench_step:begin -->\nstep table\n<!-- bench_step:end -->\n"
    path.write_text("old kernel table\n\n" + step_section)
    out = subprocess.run([sys.executable, "bench/bench_kernels.py", "--quick", "--no-compile", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = path.read_text()
    assert "old kernel table" not in text and text.endswith(step_section), text[-500:]
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = [c.strip() for c in rows[0]], [[c.strip() for c in r] for r in rows[1:]]
    col = {name: i for i, name in enumerate(header)}
    seen = {(r[col["kernel"]].split("+")[0].split(" ")[0], r[col["dtype"]], r[col["impl"]]) for r in rows}
    for kernel in ("layer_norm", "rms_norm", "bias_gelu", "swiglu", "rope", "cross_entropy"):
        for dtype in ("float32", "bfloat16"):
            for impl in ("eager", "fused"):
                assert (kernel, dtype, impl) in seen, (kernel, dtype, impl, sorted(seen))
    for r in rows:
        for name in ("fwd ms", "fwd+bwd ms"):
            assert re.fullmatch(r"\d+\.\d+", r[col[name]]) and float(r[col[name]]) > 0, r


def test_quick_training_step_benchmark(tmp_path):
    """`make bench-train` (bench/bench_train.py) on a tiny model, 2 rounds: the three loops run and
    every figure of the table follows from its measured rounds: the median, the ratio to the plain
    loop, and the MFU against an independent FLOP count (bench/plain_gpt.py's nanoGPT formula for
    the same shape) and the measured peak the header names."""
    from tests.trainutil import env

    tiny = ["model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.max_seq_len=64", "data.seq_len=64",
            "data.vocab_size=512", "parallel.micro_batch=4"]
    out = subprocess.run([sys.executable, "bench/bench_train.py", "--steps", "4", "--rounds", "2", "--out",
                          str(tmp_path), *tiny], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "train-cpu.md").read_text()
    assert text.split("\n", 2)[2] in out.stdout  # the table is printed too (the file adds a title)
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and "---" not in line and cells[0] != "loop":
            rows[cells[0]] = cells
    names = ["plain PyTorch loop (torch ops)", "ours, DeepSpeed engine, torch ops",
             "ours, DeepSpeed engine, fused kernels"]
    assert list(rows) == names, text

    def num(cell):
        return float(cell.replace(",", "").rstrip("%"))

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from plain_gpt import PlainConfig, PlainGPT
    finally:
        sys.path.remove(str(REPO / "bench"))
    flops = PlainGPT(PlainConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=512, block_size=64)).flops_per_token(64)
    peak = float(re.search(r"best of \d+ in [\d.]+ s: ([\d.]+) GFLOP/s", text).group(1)) * 1e9
    med = {}
    for name, cells in rows.items():
        rounds = [num(x) for x in cells[4].split(", ")]
        assert len(rounds) == 2 and all(r > 0 for r in rounds)
        med[name] = statistics.median(rounds)
        assert num(cells[1]) == pytest.approx(med[name], abs=1)
        assert num(cells[2]) / 100 == pytest.approx(flops * med[name] / peak, rel=0.01, abs=0.0006), cells
    base = med[names[0]]
    for name, cells in rows.items():
        assert num(cells[3]) == pytest.approx(med[name] / base, abs=0.0006), cells
    ratio = float(re.search(r"ratio ours / plain \(same ops\): (\d+\.\d+)", text).group(1))
    assert ratio == pytest.approx(med[names[1]] / base, abs=0.0006)
