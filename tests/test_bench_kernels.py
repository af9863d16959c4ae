"""Smoke test of `make bench`'s kernel table (bench/bench_kernels.py --quick on CPU): every kernel
and dtype gets an eager and a fused row with numbers, the file is written where --out says, and a
training-step section already in that file (bench_step.py's) survives the rewrite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
    """`make bench-train` (bench/bench_train.py) on a tiny model: the three loops run and the
    table with their tokens/s and the ratio lands in --out."""
    from tests.trainutil import env

    tiny = ["model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.max_seq_len=64", "data.seq_len=64",
            "data.vocab_size=512", "parallel.micro_batch=4"]
    out = subprocess.run([sys.executable, "bench/bench_train.py", "--steps", "4", "--rounds", "1", "--out",
                          str(tmp_path), *tiny], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "train-cpu.md").read_text()
    for row in ("plain PyTorch loop", "ours, DeepSpeed engine, torch ops", "ours, DeepSpeed engine, fused kernels"):
        assert row in text, text
    assert re.search(r"ratio ours / plain \(same ops\): \d+\.\d+", text), text
