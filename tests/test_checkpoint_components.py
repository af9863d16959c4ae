"""Checkpoints of named components: their own random-number streams, checkpoints written before
components existed, and Adam moments of parameters the GPT does not have (an adapter's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.trainutil import run_train, train_losses
from trainer import checkpoint as ckpt
from trainer import optim_state
from trainer.files import sha256_file
from trainer.rng import RngStream

# ------------------------------------------------------------------------------------ RNG streams


def test_streams_are_independent_of_each_other_and_of_the_process():
    a, b = RngStream.seeded(1), RngStream.seeded(1)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with a.active():
        x1 = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the process's generator untouched
    with a.active():
        x2 = torch.rand(3)
    with b.active():  # b has not moved: it repeats a's first draw
        y1 = torch.rand(3)
    assert torch.equal(x1, y1) and not torch.equal(x1, x2)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), x1)  # seeded(1) is the process's seed_all(1) stream
    assert not torch.equal(RngStream.seeded(2).state["torch"], a.state["torch"])


# ---------------------------------------------------------------------------- format 1 checkpoints

ARGS = ["train.max_steps=8", "train.checkpoint_every=4", "model.dropout=0.1", "train.sample_tokens=0",
        "train.eval_every=1000"]


def _as_format1(folder):
    """Rewrite a checkpoint in the layout written before named components (DeepSpeed's files at
    the top, the training RNG state in the loop state, no format in meta.json)."""
    comp = folder / "model"
    loop = torch.load(folder / "loop_rank0.pt", weights_only=False)
    loop["rng"] = torch.load(comp / "rng_rank0.pt", weights_only=False)
    torch.save(loop, folder / "loop_rank0.pt")
    (comp / "rng_rank0.pt").unlink()
    for f in comp.iterdir():
        f.rename(folder / f.name)
    comp.rmdir()
    meta = json.loads((folder / "meta.json").read_text())
    del meta["format"], meta["components"]
    (folder / "meta.json").write_text(json.dumps(meta))
    files = sorted(p for p in folder.iterdir() if p.name != "manifest.json")
    (folder / "manifest.json").write_text(json.dumps(
        {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}))


def test_a_checkpoint_written_before_components_resumes_exactly(tmp_path):
    full = run_train(tmp_path, "full", *ARGS)
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "runs" / "full"
    cut = tmp_path / "runs" / "cut"
    shutil.copytree(run, cut)
    ck = cut / "checkpoints"
    shutil.rmtree(ck / "step_00000008")
    (ck / "latest").write_text("step_00000004\n")
    _as_format1(ck / "step_00000004")
    assert "format" not in ckpt.verify(ck / "step_00000004")
    (cut / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (cut / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4))
    resumed = run_train(tmp_path, "cut", *ARGS, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_00000004" in resumed.stdout
    assert train_losses(tmp_path, "cut") == train_losses(tmp_path, "full")  # dropout on: the stream came back


# -------------------------------------------------------------------- adapters' Adam moments


class LowRank(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank update (the shape of a LoRA adapter)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.t() @ self.lora_B.t()


def _adapted_model():
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=16, max_seq_len=8, kernels="torch"))
    model.requires_grad_(False)
    for block in model.blocks:
        block.attn.q_proj = LowRank(block.attn.q_proj)
    return model


def _adapter_worker(rank, world, out):
    import os

    import deepspeed.ops

    from trainer.dims import ParallelDims
    from trainer.parallelize import parallelize
    from trainer.recipe import load_recipe

    os.environ["LOCAL_RANK"] = str(rank)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    dims = ParallelDims.build(world, rank)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    gathered = {}
    for zero in (1, 2):
        recipe = load_recipe("gpt-tiny", [f"parallel.zero_stage={zero}", "parallel.micro_batch=2", "optim.warmup_steps=1"])
        engine = parallelize(_adapted_model(), dims, recipe, torch.device("cpu"))
        if zero == 2:  # restore what ZeRO-1 gathered, then gather again
            assert optim_state.restore(engine, engine.module, zero, gathered[1])
        else:
            for _ in range(2):
                engine.backward(engine(x, targets=x))
                engine.step()
        gathered[zero] = optim_state.gather(engine, engine.module, zero, dims)
    torch.save(gathered, f"{out}/moments.pt")


@pytest.mark.dist
def test_adapter_moments_are_gathered_by_name_and_restored(tmp_path):
    from tests.test_tensor_parallel import spawn

    spawn(_adapter_worker, 1, str(tmp_path))
    g = torch.load(tmp_path / "moments.pt", weights_only=False)
    names = list(g[1]["moments"])
    trainable = [n for n, p in _adapted_model().named_parameters() if p.requires_grad]
    assert names == trainable and all("lora_" in n for n in names)  # adapters in, the frozen base out
    # the reference: plain torch AdamW on the same model, data and steps
    from trainer.recipe import load_recipe

    o = load_recipe("gpt-tiny", []).optim
    model = _adapted_model()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in trainable], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        opt.zero_grad()
        model(x, targets=x).backward()
        torch.nn.utils.clip_grad_norm_([params[n] for n in trainable], o.grad_clip)
        opt.step()
    assert g[1]["step"] == 2
    for n in trainable:
        st = opt.state[params[n]]
        torch.testing.assert_close(g[1]["moments"][n][0], st["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(g[1]["moments"][n][1], st["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        assert torch.equal(g[2]["moments"][n][0], g[1]["moments"][n][0]), n  # restored into ZeRO-2 exactly
        assert torch.equal(g[2]["moments"][n][1], g[1]["moments"][n][1]), n


# ------------------------------------------------- two components, one commit; stepper hooks


def _components_worker(rank, world, out):
    import os

    import deepspeed.ops

    from model import GPT, GPTConfig
    from trainer.dims import ParallelDims
    from trainer.parallelize import parallelize
    from trainer.recipe import load_recipe
    from trainer.step import Stepper

    os.environ["LOCAL_RANK"] = str(rank)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    dims = ParallelDims.build(world, rank)
    cfg = GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=8, kernels="torch", dropout=0.2)
    recipe = load_recipe("gpt-tiny", ["parallel.micro_batch=2", "optim.warmup_steps=1", "optim.grad_clip=0"])

    def build(seed):
        torch.manual_seed(seed)
        e = parallelize(GPT(cfg), dims, recipe, torch.device("cpu"))
        return ckpt.Component(f"agent{seed}", e, RngStream.seeded(seed))

    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    seen = []

    def double_loss(engine, batch):  # a loss of the caller's choosing
        return 2 * engine(batch[0], targets=batch[1])

    def grads_seen(stepper):
        seen.append(("after_backward", torch.cat([p.grad.flatten() for p in stepper.engine.module.parameters()])))

    def stepped(stepper, result):
        seen.append(("after_step", float(result.loss)))

    comps = [build(1), build(2)]
    for c in comps:
        stepper = Stepper(c.engine, dims, torch.device("cpu"), loss_fn=double_loss, after_backward=[grads_seen],
                          after_step=[stepped])
        with c.rng.active():
            stepper.run([(x, x)])
    folder = ckpt.save(comps, Path(out) / "ck", 1, {"step": 1}, {"model_config": cfg.to_dict()}, dims.local_rank,
                       dims.is_replica_main, keep=2, group=dims.replica_group)
    meta = ckpt.verify(folder)
    fresh = [build(1), build(2)]
    fresh[0].rng, fresh[1].rng = RngStream.seeded(9), RngStream.seeded(9)
    loop = ckpt.load(fresh, folder, meta, dims.local_rank)
    result = {"meta": meta, "loop": loop, "seen": seen, "names": sorted(p.name for p in folder.iterdir()),
              "trained": [c.engine.module.state_dict() for c in comps],
              "loaded": [c.engine.module.state_dict() for c in fresh],
              "streams": [(a.rng.state["torch"], b.rng.state["torch"]) for a, b in zip(comps, fresh)]}
    torch.save(result, f"{out}/components.pt")


@pytest.mark.dist
def test_two_components_share_one_commit_and_stepper_hooks_see_the_step(tmp_path):
    from tests.test_tensor_parallel import spawn

    spawn(_components_worker, 1, str(tmp_path))
    r = torch.load(tmp_path / "components.pt", weights_only=False)
    assert r["meta"]["components"] == ["agent1", "agent2"] and r["loop"] == {"step": 1}
    assert r["names"] == ["agent1", "agent2", "loop_rank0.pt", "manifest.json", "meta.json"]
    for trained, loaded in zip(r["trained"], r["loaded"]):
        for k in trained:
            assert torch.equal(trained[k], loaded[k]), k
    for saved, back in r["streams"]:
        assert torch.equal(saved, back)  # each component's own stream came back, not the seed-9 one
    assert not torch.equal(r["streams"][0][0], r["streams"][1][0])
    assert [kind for kind, _ in r["seen"]] == ["after_backward", "after_step"] * 2
    # The hooks saw the gradient of the caller's loss (2 x the LM loss) before the update: plain
    # autograd on the same model and data (dropout masks from the same stream) gives the same.
    from model import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=8, kernels="torch", dropout=0.2)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    ref = GPT(cfg)
    with RngStream.seeded(1).active():
        loss = 2 * ref(x, targets=x)
    loss.backward()
    torch.testing.assert_close(r["seen"][0][1], torch.cat([p.grad.flatten() for p in ref.parameters()]),
                               rtol=1e-5, atol=1e-7)
    assert r["seen"][1][1] == pytest.approx(loss.item(), rel=1e-6)
