"""Smoke test of `make bench-sync` (bench/bench_sync.py) on a tiny model: the table, its ratios
and the plot come out of real runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.trainutil import REPO, env

TINY_MODEL = ["data.max_documents=60", "data.vocab_size=512", "data.seq_len=64", "model.n_layer=1",
              "model.d_model=64", "model.n_head=2", "model.max_seq_len=64", "model.kernels=torch",
              "train.peak_tflops=1"]  # a given MFU ceiling: no sgemm measurement per rank (the table has no MFU)


@pytest.mark.dist
def test_bench_sync_writes_its_table_and_plot(tmp_path):
    out = tmp_path / "sync.md"
    cmd = [sys.executable, "bench/bench_sync.py", "--replicas", "2", "--steps", "2", "--out", str(out),
           "--cache", str(tmp_path / "cache"), "--only", "allreduce", "ring", "--extra", *TINY_MODEL]
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    table = out.read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert "gloo (not counted)" in rows["allreduce"]
    assert "1.0x fewer" in rows["ring"] and "+0.00%" in rows["ring"]  # ring reproduces allreduce
    # A rerun of one row (--only) keeps the others: the synchronous parameter server joins the table.
    res = subprocess.run([*cmd[:cmd.index("--only") + 1], "parameter_server (1 server)", "--extra", *TINY_MODEL],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines()
            if line.startswith("| ") and "---" not in line}
    assert set(rows) - {"strategy"} == {"allreduce", "ring", "parameter_server (1 server)"}
    assert "+0.00%" in rows["parameter_server (1 server)"]  # synchronous PS reproduces allreduce
    assert out.with_suffix(".png").stat().st_size > 10_000
