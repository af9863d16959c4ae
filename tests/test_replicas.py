"""Several models in one job: ParallelDims, replicas on disjoint groups, engines that keep their groups.

- `ParallelDims.plan` places ranks exactly as DeepSpeed's own topology does (the reference).
- Two replicas in one launcher job (2 + 2 processes, ZeRO-1 and ZeRO-2, different seeds) each train
  and checkpoint exactly as the same recipe alone on 2 processes: equal losses and equal weights.
  A non-finite loss in one replica is skipped there and changes nothing in the other.
- Two DeepSpeed engines over different groups in one process each reduce over their own group,
  although DeepSpeed keeps one global mpu (`parallelize.bind_mpu`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.trainutil import REPO, TINY, env, metrics, run_train, train_losses
from trainer import checkpoint as ckpt
from trainer.consolidate import consolidated_state_dict
from trainer.dims import DimsError, ParallelDims

# ---------------------------------------------------------------------------------------- dims


@pytest.mark.parametrize("tp, pp, dp", [(1, 1, 4), (2, 1, 2), (2, 2, 2), (1, 2, 4), (4, 2, 1)])
def test_plan_places_ranks_as_deepspeeds_topology(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    world = tp * pp * dp
    for rank in range(world):
        d = ParallelDims.plan(world, rank, tp, pp)
        c = topo.get_coord(rank)
        assert (d.tp_rank, d.pp_rank, d.dp_rank, d.dp) == (c.model, c.pipe, c.data, dp), rank


def test_plan_splits_the_world_into_replicas():
    dims = [ParallelDims.plan(8, r, tp=2, replicas=2) for r in range(8)]
    assert [d.replica for d in dims] == [0] * 4 + [1] * 4
    assert [d.local_rank for d in dims] == [0, 1, 2, 3] * 2
    assert list(dims[5].replica_ranks) == [4, 5, 6, 7] and dims[4].is_replica_main and not dims[5].is_replica_main
    # inside a replica the grid is the single-replica grid of its size, ranks offset
    assert [(d.tp_rank, d.dp_rank) for d in dims[4:]] == [(d.tp_rank, d.dp_rank) for d in dims[:4]]


@pytest.mark.parametrize("kw, words", [
    (dict(world_size=6, rank=0, replicas=4), "4 equal replicas"),
    (dict(world_size=4, rank=0, tp=3), "not divisible by tp=3"),
    (dict(world_size=8, rank=0, pp=2, replicas=2), "needs a single replica"),
])
def test_plan_refuses_impossible_layouts(kw, words):
    with pytest.raises(DimsError, match=words):
        ParallelDims.plan(**kw)


# ---------------------------------------------------------------------------- replicas in a job

STEPS = 6
COMMON = [*TINY, f"train.max_steps={STEPS}", "train.sample_tokens=0", "train.eval_every=1000", "parallel.micro_batch=4",
          "train.peak_tflops=0.5"]
# A checkpoints every 2 steps, B only at the end: neither waits for the other's saves.
REPLICA_A = ["parallel.zero_stage=1", "train.checkpoint_every=2"]  # NaN at step 3 in the job
REPLICA_B = ["parallel.zero_stage=2", "train.seed=7"]


def _overrides(root, name, extra):
    return [*COMMON, *extra, "launch.procs_per_node=2", f"run.name={name}", f"run.output_dir={root}/runs",
            f"data.cache_dir={root}/cache"]


def _weights(root, name):
    folder = ckpt.latest_checkpoint(root / "runs" / name / "checkpoints")
    return consolidated_state_dict(folder, ckpt.verify(folder))


@pytest.mark.dist
def test_two_replicas_in_one_job_train_and_checkpoint_as_alone(tmp_path):
    root = tmp_path
    # Each replica's recipe alone, on 2 processes of its own (the NaN injected in A's as well).
    a = run_train(root, "alone-a", *COMMON, *REPLICA_A, "launch.procs_per_node=2", RECIPES_FAULT_NAN_STEPS="3",
                  timeout=600)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_train(root, "alone-b", *COMMON, *REPLICA_B, "launch.procs_per_node=2", timeout=600)
    assert b.returncode == 0, b.stderr[-3000:]

    spec = {"replicas": [["gpt-tiny", _overrides(root, "job-a", REPLICA_A)],
                         ["gpt-tiny", _overrides(root, "job-b", REPLICA_B)]],
            "nan_steps": {"0": "3"}}
    from launch import node
    from launch.multiproc import free_port, launcher_env

    e = {**launcher_env(4), **env()}
    cmd = node.command({"localhost": [0, 1, 2, 3]}, 0, "127.0.0.1", free_port(),
                       [sys.executable, "-u", "-m", "tests.replica_job", json.dumps(spec)])
    job = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]

    for alone, in_job in (("alone-a", "job-a"), ("alone-b", "job-b")):
        assert train_losses(root, in_job) == train_losses(root, alone), in_job
        wa, wj = _weights(root, alone), _weights(root, in_job)
        assert wa.keys() == wj.keys()
        for k in wa:
            assert torch.equal(wa[k], wj[k]), (in_job, k)
    # The NaN was A's alone: A skipped step 3, B skipped nothing and learned on.
    rows_a = {r["step"]: r for r in metrics(root, "job-a") if "skipped_steps" in r}
    rows_b = {r["step"]: r for r in metrics(root, "job-b") if "skipped_steps" in r}
    assert rows_a[3]["loss"] is None and rows_a[STEPS]["skipped_steps"] == 1
    assert rows_b[STEPS]["skipped_steps"] == 0 and all(r["loss"] is not None for r in rows_b.values())
    # MFU per device: the job's tokens/s over 2 devices' peak (not one device's).
    from model import GPT, GPTConfig

    meta = ckpt.verify(ckpt.latest_checkpoint(root / "runs" / "alone-a" / "checkpoints"))
    with torch.device("meta"):
        fpt = GPT(GPTConfig(**meta["model_config"]), init=False).flops_per_token(64)
    for r in (x for x in metrics(root, "alone-a") if x.get("tokens_per_s")):
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / (2 * 0.5e12), rel=1e-9)
    # Each replica committed its own checkpoints, with its own layout in meta.json.
    for name, zero in (("job-a", 1), ("job-b", 2)):
        meta = ckpt.verify(ckpt.latest_checkpoint(root / "runs" / name / "checkpoints"))
        assert (meta["zero_stage"], meta["world_size"], meta["components"]) == (zero, 2, ["model"])


# ------------------------------------------------------------------- two engines in one process


def _two_engines(rank, world, out):
    import deepspeed.ops

    os.environ["LOCAL_RANK"] = str(rank)  # what DeepSpeed's launcher would set
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as trainer.distributed does on CPU
    from model import GPT, GPTConfig
    from trainer.dims import ParallelDims
    from trainer.parallelize import parallelize
    from trainer.recipe import load_recipe

    recipe = load_recipe("gpt-tiny", ["optim.warmup_steps=1", "parallel.micro_batch=2", "optim.grad_clip=0.5"])
    cfg = GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=8, kernels="torch")
    shared = ParallelDims.build(world, rank)  # one replica over both ranks: gradients averaged
    own = ParallelDims.build(world, rank, replicas=world)  # every rank its own replica
    engines = {}
    for name, dims in (("shared", shared), ("own", own)):
        torch.manual_seed(0)
        engines[name] = parallelize(GPT(cfg), dims, recipe, torch.device("cpu"))
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x = torch.randint(0, 64, (2, 8), generator=g)
    for name in ("own", "shared"):  # the engine built last is stepped first: its mpu is the global one
        e = engines[name]
        e.backward(e(x, targets=x))
        e.step()
    result = {name: {k: v.detach().clone() for k, v in e.module.state_dict().items()} for name, e in engines.items()}
    # the reference: one plain AdamW step of the same model on this rank's data only
    torch.manual_seed(0)
    ref = GPT(cfg)
    from trainer.ds_config import lr_lambda
    from trainer.model_setup import param_groups

    o = recipe.optim
    opt = torch.optim.AdamW(param_groups(ref, o.weight_decay), lr=o.lr * lr_lambda(recipe)(0), betas=(o.beta1, o.beta2),
                            eps=o.eps)
    ref(x, targets=x).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), o.grad_clip)
    opt.step()
    result["ref"] = ref.state_dict()
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.mark.dist
def test_two_engines_in_one_process_reduce_over_their_own_groups(tmp_path):
    from tests.test_tensor_parallel import spawn

    spawn(_two_engines, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for k in r0["shared"]:
        assert torch.equal(r0["shared"][k], r1["shared"][k]), k  # reduced over both ranks
        for r in (r0, r1):  # reduced over nothing: exactly a plain local step
            torch.testing.assert_close(r["own"][k], r["ref"][k], rtol=1e-6, atol=1e-7, msg=k)
    assert any(not torch.equal(r0["own"][k], r1["own"][k]) for k in r0["own"])
