"""sync.strategy=parameter_server in real training runs, through the launcher.

- synchronous (staleness 0), 2 workers + 1 server: the losses of DeepSpeed's own all-reduce over
  2 ranks within 1e-6 and the same weights; bytes each worker sends = one fp32 gradient + headers.
- asynchronous (staleness 1), 2 workers + 2 servers: SIGKILL + resume continues bit-identically
  (weights of both workers, and the servers' states: AdamW moments and versions, in rank 0's loop
  state).
- a killed server stops the whole job, naming the dead rank; nothing hangs.
- settings that cannot run stop with one line (in tests/test_sync_training.py).
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.trainutil import latest_components, metrics, run_train, train_losses, train_once
from trainer import checkpoint as ckpt

STEPS = 8
COMMON = [f"train.max_steps={STEPS}", "train.eval_every=1000", "train.sample_tokens=0", "parallel.micro_batch=4",
          "optim.warmup_steps=2", "launch.timeout_s=60",
          "train.peak_tflops=1"]  # a given MFU ceiling: no sgemm measurement per rank (MFU is not checked here)
PS = ["sync.strategy=parameter_server", "launch.procs_per_node=3"]
ASYNC = ["sync.strategy=parameter_server", "launch.procs_per_node=4", "sync.servers=2", "sync.staleness=1",
         "model.dropout=0.1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ps")


def _run(root, name, *overrides, **env):
    return train_once(root, name, *COMMON, *overrides, **env)


def _checkpoint(root, name):
    folder = ckpt.latest_checkpoint(root / "runs" / name / "checkpoints")
    return folder, ckpt.verify(folder)


_components = latest_components


@pytest.mark.dist
def test_synchronous_parameter_server_reproduces_allreduce(root):
    ref = _run(root, "allreduce", "launch.procs_per_node=2")
    ps = _run(root, "ps", *PS)
    for s in range(1, STEPS + 1):
        assert ps[s] == pytest.approx(ref[s], rel=1e-6, abs=0), s
    (w,) = _components(root, "allreduce")
    workers = _components(root, "ps")
    assert len(workers) == 2
    for replica in workers:
        for k in w:
            if k.endswith("k_proj.bias"):
                # Zero gradient in exact arithmetic (a key bias adds the same score to every key of a
                # query; softmax ignores it): it moves by rounding noise only, which Adam rescales,
                # so two reduction orders leave it at different values of the order of 1e-6.
                assert replica[k].abs().max() < 1e-5 and w[k].abs().max() < 1e-5, k
                continue
            torch.testing.assert_close(replica[k], w[k], rtol=1e-5, atol=1e-6, msg=k)
    rows = [r for r in metrics(root, "ps") if "comm_bytes" in r]
    n = sum(v.numel() for v in w.values() if v.dtype.is_floating_point) - w["tok_emb.weight"].numel()  # tied once
    # a push: the fp32 gradient plus one 40-byte header per server; pulls are the server's sends
    assert [r["comm_bytes"] for r in rows] == [(4 * n + 40) * s for s in range(1, STEPS + 1)]
    assert [r["ps_version"] for r in rows] == list(range(1, STEPS + 1))  # one update per step
    folder, _ = _checkpoint(root, "ps")
    servers = torch.load(folder / "loop_rank0.pt", weights_only=False)["sync"]["servers"]
    assert [s["version"] for s in servers] == [STEPS]
    assert servers[0]["weights"].numel() == n  # the one server holds the whole vector (and its AdamW)


@pytest.mark.dist
def test_asynchronous_parameter_server_resumes_bit_identically(root):
    full = _run(root, "async", *ASYNC)
    rows = [r for r in metrics(root, "async") if "staleness" in r]
    # 2 workers in a fixed order: 2 updates per step; worker 0's pushes after the first are 1 version late
    assert [r["ps_version"] for r in rows] == [2 * s - 1 for s in range(1, STEPS + 1)]
    assert [r["staleness"] for r in rows] == [0] + [1] * (STEPS - 1)
    assert all(r["consensus_dist"] > 0 for r in rows)  # the workers hold different versions
    a, b = _components(root, "async")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    cut = "async-cut"
    out = run_train(root, cut, *COMMON, *ASYNC, "train.checkpoint_every=5", timeout=600,
                    RECIPES_FAULT_KILL_AFTER_STEP="5")
    assert out.returncode != 0
    resumed = run_train(root, cut, *COMMON, *ASYNC, "train.resume=auto", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000005" in resumed.stdout
    assert train_losses(root, cut) == full
    for x, y in zip(_components(root, cut), _components(root, "async")):
        assert all(torch.equal(x[k], y[k]) for k in x)
    states = [torch.load(_checkpoint(root, n)[0] / "loop_rank0.pt", weights_only=False)["sync"]["servers"]
              for n in (cut, "async")]
    for s, t in zip(*states):
        assert s["version"] == t["version"] == 2 * STEPS
        assert torch.equal(s["weights"], t["weights"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s["optimizer"]["state"][0][key], t["optimizer"]["state"][0][key])


@pytest.mark.dist
def test_a_killed_server_stops_the_job_naming_the_rank(tmp_path):
    t0 = time.monotonic()
    out = run_train(tmp_path, "dead", *COMMON, *PS, "train.max_steps=50", timeout=300,
                    RECIPES_FAULT_KILL_SERVER_AT_VERSION="3")
    assert out.returncode != 0
    assert time.monotonic() - t0 < 200
    assert "rank 2" in out.stderr, out.stderr[-3000:]


@pytest.mark.dist
def test_resume_with_another_server_count_is_refused(root, tmp_path):
    import shutil

    _run(root, "ps", *PS)
    shutil.copytree(root / "runs" / "ps", tmp_path / "runs" / "moved")
    out = run_train(tmp_path, "moved", *COMMON, *PS, f"data.cache_dir={root}/cache", "train.max_steps=10",
                    "train.resume=auto", "launch.procs_per_node=4", "sync.servers=2")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "resume with the same launch processes and sync.servers" in out.stderr.strip().splitlines()[-1]
