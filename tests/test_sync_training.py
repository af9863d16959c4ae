"""Sync strategies in real training runs (2 replicas of one process each, through the launcher).

- ring: our ring all-reduce of the gradients across replicas reproduces DeepSpeed's own all-reduce
  over every rank: the same losses and the same weights (the custom reducer under DeepSpeed).
- diloco with outer lr 1 and momentum 0 is local_sgd; after each outer step every replica holds
  identical weights (consolidated components compared bit for bit, consensus_dist 0).
- SIGKILL + resume continues diloco and gossip bit-identically (weights, residuals and outer
  optimizer state live in the checkpoint).
- fedavg on a non-IID split: `make export` writes the n_i/n-weighted consensus of the replicas.
- ZeRO inside replicas (2 replicas of 2 ranks): ring under ZeRO-1 and ZeRO-3 reproduces DeepSpeed's
  own all-reduce; local_sgd / diloco under ZeRO-2 and ZeRO-3 average the fp32 master partitions;
  each rank sends its partition only.
- settings that cannot run stop before any process starts: one line, exit 2.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.trainutil import latest_components, metrics, run_train, train_losses, train_once
from trainer import checkpoint as ckpt

STEPS = 8
# train.peak_tflops: a given MFU ceiling instead of two sgemm measurements per rank and run (about 3 s of
# a 4-rank run on 2 cores); nothing here checks MFU (test_evaluation and test_flops do).
COMMON = [f"train.max_steps={STEPS}", "train.eval_every=1000", "train.sample_tokens=0", "parallel.micro_batch=4",
          "launch.procs_per_node=2", "optim.warmup_steps=2", "train.peak_tflops=1"]
TWO = ["sync.replicas=2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sync")


def _run(root, name, *overrides, **env):
    return train_once(root, name, *COMMON, *overrides, **env)


_components = latest_components


@pytest.mark.dist
def test_ring_gradients_reproduce_deepspeeds_allreduce(root):
    ref = _run(root, "allreduce")
    ring = _run(root, "ring", "sync.strategy=ring", *TWO)
    for s in range(1, STEPS + 1):
        assert ring[s] == pytest.approx(ref[s], rel=1e-6, abs=0), s
    (w,) = _components(root, "allreduce")
    for replica in _components(root, "ring"):
        for k in w:
            torch.testing.assert_close(replica[k], w[k], rtol=1e-5, atol=1e-6, msg=k)
    rows = [r for r in metrics(root, "ring") if "comm_bytes" in r]
    n = sum(v.numel() for v in w.values() if v.dtype.is_floating_point) - w["tok_emb.weight"].numel()  # tied once
    # ring with R=2: each rank sends 2(R-1)/R = 1 copy of the fp32 gradients per step
    assert [r["comm_bytes"] for r in rows] == [4 * n * s for s in range(1, STEPS + 1)]


FOUR = ["launch.procs_per_node=4", "parallel.micro_batch=2"]  # 2 replicas of 2 ranks, one ZeRO partition each


@pytest.mark.dist
def test_ring_under_zero1_reproduces_deepspeeds_allreduce_and_sends_partitions(root):
    ref = _run(root, "allreduce-z1", *FOUR, "parallel.zero_stage=1")
    ring = _run(root, "ring-z1", *FOUR, "parallel.zero_stage=1", "sync.strategy=ring", *TWO)
    for s in range(1, STEPS + 1):
        assert ring[s] == pytest.approx(ref[s], rel=1e-6, abs=0), s
    (w,) = _components(root, "allreduce-z1")
    for replica in _components(root, "ring-z1"):
        for k in w:
            if not k.endswith("k_proj.bias"):  # zero gradient: rounding noise only (see test_sync_ps)
                torch.testing.assert_close(replica[k], w[k], rtol=1e-5, atol=1e-6, msg=k)
    n = sum(v.numel() for v in w.values() if v.dtype.is_floating_point) - w["tok_emb.weight"].numel()
    per_step = {r["step"]: r["comm_bytes"] for r in metrics(root, "ring-z1") if "comm_bytes" in r}[1]
    # each rank exchanges its half of the gradient (ring over 2 replicas: one copy of it), never the whole
    assert 4 * n / 2 <= per_step <= 4 * (n / 2 + 64)


@pytest.mark.dist
def test_weight_strategies_under_zero2_average_master_partitions(root):
    lsgd = _run(root, "lsgd-z2", *FOUR, "parallel.zero_stage=2", "sync.strategy=local_sgd", *TWO, "sync.every=2")
    dil = _run(root, "diloco-z2", *FOUR, "parallel.zero_stage=2", "sync.strategy=diloco", *TWO, "sync.every=2",
               "sync.outer.lr=1.0", "sync.outer.momentum=0.0")
    for s in range(1, STEPS + 1):
        assert dil[s] == pytest.approx(lsgd[s], rel=1e-6, abs=0), s
    for name in ("lsgd-z2", "diloco-z2"):
        a, b = _components(root, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name  # the parameters follow the averaged fp32 masters
        rows = {r["step"]: r for r in metrics(root, name) if "consensus_dist" in r}
        assert all(rows[s]["consensus_dist"] == 0.0 for s in range(2, STEPS + 1, 2))
        assert any(rows[s]["consensus_dist"] > 0 for s in range(1, STEPS, 2))
    n = sum(v.numel() for v in a.values() if v.dtype.is_floating_point) - a["tok_emb.weight"].numel()
    sent = {r["step"]: r["comm_bytes"] for r in metrics(root, "lsgd-z2") if "comm_bytes" in r}
    assert 4 * n / 2 <= sent[2] <= 4 * (n / 2 + 64) and sent[STEPS] == sent[2] * STEPS // 2


@pytest.mark.dist
def test_ring_and_weight_averaging_under_zero3_exchange_partitions(root):
    ref = _run(root, "allreduce-z3", *FOUR, "parallel.zero_stage=3")
    ring = _run(root, "ring-z3", *FOUR, "parallel.zero_stage=3", "sync.strategy=ring", *TWO)
    for s in range(1, STEPS + 1):
        assert ring[s] == pytest.approx(ref[s], rel=1e-6, abs=0), s
    lsgd = _run(root, "lsgd-z3", *FOUR, "parallel.zero_stage=3", "sync.strategy=local_sgd", *TWO, "sync.every=2")
    dil = _run(root, "diloco-z3", *FOUR, "parallel.zero_stage=3", "sync.strategy=diloco", *TWO, "sync.every=2",
               "sync.outer.lr=1.0", "sync.outer.momentum=0.0")
    for s in range(1, STEPS + 1):
        assert dil[s] == pytest.approx(lsgd[s], rel=1e-6, abs=0), s
    a, b = _components(root, "diloco-z3")  # replica 1's checkpoint too holds the tied head (consolidation)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    sent = {r["step"]: r["comm_bytes"] for r in metrics(root, "lsgd-z3") if "comm_bytes" in r}
    n = sum(v.numel() for v in a.values() if v.dtype.is_floating_point) - a["tok_emb.weight"].numel()
    assert 4 * n / 2 <= sent[2] <= 4 * (n / 2 + 64)  # each rank: its ZeRO-3 partition only


DILOCO_PLAIN = ["sync.strategy=diloco", *TWO, "sync.every=2", "sync.outer.lr=1.0", "sync.outer.momentum=0.0"]


@pytest.mark.dist
def test_diloco_with_plain_outer_step_is_local_sgd_and_replicas_agree(root):
    lsgd = _run(root, "lsgd", "sync.strategy=local_sgd", *TWO, "sync.every=2")
    dil = _run(root, "diloco", *DILOCO_PLAIN)
    for s in range(1, STEPS + 1):
        assert dil[s] == pytest.approx(lsgd[s], rel=1e-6, abs=0), s
    for name in ("lsgd", "diloco"):
        a, b = _components(root, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name  # after the outer step: identical replicas
        rows = {r["step"]: r for r in metrics(root, name) if "consensus_dist" in r}
        assert all(rows[s]["consensus_dist"] == 0.0 for s in range(2, STEPS + 1, 2))
        assert any(rows[s]["consensus_dist"] > 0 for s in range(1, STEPS, 2))  # they drift in between


@pytest.mark.dist
@pytest.mark.parametrize("name, overrides", [
    ("diloco-m", ["sync.strategy=diloco", *TWO, "sync.every=2", "sync.compress=int8", "model.dropout=0.1"]),
    ("gossip", ["sync.strategy=gossip", *TWO, "sync.every=3", "model.dropout=0.1"]),
])
def test_sigkill_and_resume_continue_bit_identically(root, name, overrides):
    full = _run(root, name, *overrides)
    cut = f"{name}-cut"
    out = run_train(root, cut, *COMMON, *overrides, "train.checkpoint_every=5", timeout=600,
                    RECIPES_FAULT_KILL_AFTER_STEP="5")
    assert out.returncode != 0
    resumed = run_train(root, cut, *COMMON, *overrides, "train.resume=auto", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000005" in resumed.stdout
    assert train_losses(root, cut) == full
    sent = [{r["step"]: r["comm_bytes"] for r in metrics(root, n) if "comm_bytes" in r} for n in (cut, name)]
    assert sent[0] == sent[1]  # the byte count went on from the checkpoint
    for a, b in zip(_components(root, cut), _components(root, name)):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.dist
def test_fedavg_on_a_non_iid_split_exports_the_weighted_consensus(root, tmp_path):
    from launch.export import export_run
    from model.hf import load_hf

    _run(root, "fedavg", "sync.strategy=fedavg", *TWO, "sync.every=3", "data.split=dirichlet",
         "data.split_alpha=0.3", "train.max_steps=7")  # the last step is off the sync schedule
    folder = ckpt.latest_checkpoint(root / "runs" / "fedavg" / "checkpoints")
    meta = ckpt.verify(folder)
    counts = meta["replica_samples"]
    assert len(counts) == 2 and counts[0] != counts[1]
    a, b = _components(root, "fedavg")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # one local step since the last average
    out = export_run(str(root / "runs" / "fedavg"), str(tmp_path / "hf"))
    assert "consensus of 2 replicas" in out["note"]
    exported = load_hf(str(tmp_path / "hf")).state_dict()
    n = sum(counts)
    plain_differs = False
    for k in a:
        want = (a[k].double() * counts[0] / n + b[k].double() * counts[1] / n).float()
        torch.testing.assert_close(exported[k], want, rtol=0, atol=1e-7, msg=k)
        plain_differs |= not torch.allclose(want, (a[k] + b[k]) / 2, rtol=0, atol=1e-6)
    assert plain_differs


@pytest.mark.parametrize("overrides, words", [
    (["sync.strategy=ring", "sync.replicas=3"], "sync.replicas=3 must divide the data-parallel degree 2"),
    (["sync.strategy=ring", *TWO, "parallel.zero_stage=3", "parallel.offload_optimizer=true"],
     "needs parallel.offload_optimizer=false"),
    (["sync.strategy=ring", *TWO, "parallel.zero_stage=1", "sync.compress=powersgd"], "needs parallel.zero_stage=0"),
    (["sync.strategy=gossip", *TWO, "sync.compress=int8"], "sync.compress=int8"),
    (["sync.replicas=2"], "sync.replicas needs a sync.strategy other than allreduce"),
    (["sync.strategy=ring", *TWO, "data.split=dirichlet"], "data.split=dirichlet"),
    (["sync.strategy=diloco", "sync.replicas=1", "launch.procs_per_node=1"], "needs sync.replicas >= 2"),
    (["sync.strategy=parameter_server", "launch.procs_per_node=2", "sync.servers=2"],
     "sync.servers=2 must be below the number of processes 2"),
    (["sync.strategy=parameter_server", "launch.procs_per_node=4", "sync.staleness=1"],
     "sync.staleness=1 cannot be guaranteed with 3 workers"),
    (["sync.strategy=parameter_server", "launch.procs_per_node=3", "parallel.zero_stage=3"],
     "needs parallel.zero_stage=0"),
    (["sync.strategy=parameter_server", "launch.procs_per_node=3", "sync.staleness=-1"], "sync.staleness"),
    (["sync.strategy=parameter_server", "launch.procs_per_node=5", "sync.replicas=2"],
     "each of the 4 worker ranks is its own replica"),
])
def test_settings_that_cannot_run_stop_with_one_line(tmp_path, overrides, words):
    out = run_train(tmp_path, "bad", *COMMON, *overrides)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], out.stderr
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()


@pytest.mark.dist
def test_resume_into_another_replica_count_is_refused(root, tmp_path):
    _run(root, "lsgd", "sync.strategy=local_sgd", *TWO, "sync.every=2")
    shutil.copytree(root / "runs" / "lsgd", tmp_path / "runs" / "moved")
    out = run_train(tmp_path, "moved", *COMMON, f"data.cache_dir={root}/cache", "train.max_steps=10",
                    "train.resume=auto", "launch.procs_per_node=1", "sync.replicas=null")
    assert out.returncode == 2
    assert "resumes only in the same layout and replica count" in out.stderr.strip().splitlines()[-1]
