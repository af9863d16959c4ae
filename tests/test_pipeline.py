"""Pipeline parallelism (model/pipeline.py) against the single-process GPT.

The distributed part runs once per module: `python -m torch.distributed.run --nproc_per_node 2`
on this file (gloo, CPU) trains gpt2 (tied, ZeRO-0) and llama (untied, GQA, ZeRO-1) over two
pipeline stages, evaluates, saves and resumes; the tests compare its results with plain PyTorch.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script by torch.distributed.run
    sys.path.insert(0, str(REPO))

from launch.multiproc import free_port  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from model.pipeline import (  # noqa: E402
    _Source,
    gpt_to_pipeline_state_dict,
    make_loss_fn,
    num_pipeline_layers,
    pipeline_batches,
    pipeline_layer_specs,
    pipeline_to_gpt_state_dict,
    read_pipeline_checkpoint_layers,
)

SEED = 1234
STEPS, GAS, MICRO, SEQ = 5, 4, 2, 16
LR, BETAS, EPS, WD, CLIP, WARMUP = 3e-3, (0.9, 0.95), 1e-8, 0.1, 0.5, 2
ZERO = {"gpt2": 0, "llama": 1}
PARTITION = {"gpt2": "parameters", "llama": "uniform"}


def config(style: str) -> GPTConfig:
    if style == "gpt2":
        return GPTConfig(style="gpt2", vocab_size=96, n_layer=3, n_head=4, d_model=32, max_seq_len=SEQ)
    return GPTConfig(style="llama", vocab_size=96, n_layer=3, n_head=4, n_kv_head=2, d_model=32, max_seq_len=SEQ)


def train_data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n micro-batches (x, y) [MICRO, SEQ] with some structure to learn (y = x shifted)."""
    g = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(n):
        start = torch.randint(0, 96, (MICRO, 1), generator=g)
        step = torch.randint(1, 4, (MICRO, 1), generator=g)
        t = (start + step * torch.arange(SEQ + 1)) % 96
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def eval_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED + 1)
    sizes = [MICRO, MICRO, 1]  # the last batch is smaller than a micro-batch
    return [(torch.randint(0, 96, (b, SEQ), generator=g), torch.randint(0, 96, (b, SEQ), generator=g))
            for b in sizes]


def lr_fn(step: int) -> float:
    return (step + 1) / WARMUP if step < WARMUP else 1.0


def ds_config(zero: int) -> dict:
    return {
        "train_batch_size": MICRO * GAS, "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS, "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                  "weight_decay": WD, "torch_adam": True}},
        "zero_optimization": {"stage": zero}, "bf16": {"enabled": False}, "fp16": {"enabled": False},
        "steps_per_print": 10**9, "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True,
    }


# --------------------------------------------------------------------------------------------------
# Single process: layer equivalence and the state-dict mapping.


def _sequential(specs):
    """Run the layer specs in one process as DeepSpeed would with one stage."""
    from deepspeed.pipe import TiedLayerSpec

    tied, fns = {}, []
    for s in specs:
        if isinstance(s, TiedLayerSpec):
            if s.key not in tied:
                tied[s.key] = s.build()
            fns.append(tied[s.key] if s.forward_fn is None else (lambda x, m=tied[s.key], f=s.forward_fn: f(m, x)))
        else:
            fns.append(s.build())

    def run(x):
        for f in fns:
            x = f(x)
        return x

    return run


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_layers_reproduce_gpt_forward_and_loss(style):
    cfg = config(style)
    torch.manual_seed(SEED)
    gpt = GPT(cfg)
    specs = pipeline_layer_specs(cfg, _Source(gpt))
    assert len(specs) == num_pipeline_layers(cfg)
    x, y = train_data(1)[0]
    logits = _sequential(specs)(x)
    assert torch.equal(logits, gpt(x))
    assert torch.equal(make_loss_fn(cfg)(logits, y), gpt(x, y))


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_state_dict_mapping_round_trip(style):
    cfg = config(style)
    torch.manual_seed(SEED)
    sd = GPT(cfg).state_dict()
    L = cfg.n_layer

    layers = gpt_to_pipeline_state_dict(sd, cfg)
    assert sorted(layers) == list(range(L + 2 if cfg.tie_embeddings else L + 3))
    assert set(layers[0]) == ({"tok_emb.weight", "pos_emb.weight"} if style == "gpt2" else {"tok_emb.weight"})
    assert set(layers[L + 1]) >= {"final_norm.weight"}
    assert set(layers[1]) == {k[len("blocks.0."):] for k in sd if k.startswith("blocks.0.")}
    flat = gpt_to_pipeline_state_dict(sd, cfg, flat=True)
    if cfg.tie_embeddings:
        assert "tied_modules.embed.tok_emb.weight" in flat and f"{L + 2}.lm_head.weight" not in flat
    else:
        assert "0.tok_emb.weight" in flat and f"{L + 2}.lm_head.weight" in flat

    for state in (layers, flat):
        back = pipeline_to_gpt_state_dict(state, cfg)
        assert list(back) == list(sd)  # same keys, same order
        for k in sd:
            assert torch.equal(back[k], sd[k]), k
        model = GPT(cfg, init=False)
        model.load_state_dict(back, strict=True)
        if cfg.tie_embeddings:
            model.tie_weights()

    # A wrong config is refused rather than silently mapped.
    with pytest.raises(KeyError):
        pipeline_to_gpt_state_dict(layers, GPTConfig(**{**cfg.to_dict(), "n_layer": L - 1}))


def test_pipeline_batches_forms():
    x, y = train_data(1)[0]
    block = torch.cat([x, y[:, -1:]], dim=1)
    for item in ((x, y), ((x,), y), block):
        (bx, by), = list(pipeline_batches([item]))
        assert torch.equal(bx, x) and torch.equal(by, y)
    with pytest.raises(ValueError):
        list(pipeline_batches([(x, y[:, :-1])]))


# --------------------------------------------------------------------------------------------------
# Plain PyTorch reference: the same global batch, AdamW, clipping and schedule on one process.


@functools.cache
def reference_run(style: str) -> dict:
    from trainer.model_setup import param_groups

    cfg = config(style)
    torch.manual_seed(SEED)
    model = GPT(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    data = train_data(STEPS * GAS)
    losses, norms = [], []
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in data[s * GAS:(s + 1) * GAS]:
            loss = model(x, y)
            (loss / GAS).backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        sched.step()
        losses.append(total / GAS)
    model.eval()
    with torch.no_grad():
        ev = [(model(x, y).item(), y.numel()) for x, y in eval_data()]
    return {"init": init, "losses": losses, "norms": norms, "final": model.state_dict(),
            "eval": (sum(loss * n for loss, n in ev), sum(n for _, n in ev))}


# --------------------------------------------------------------------------------------------------
# Two processes, two pipeline stages.


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # CPU and gloo on any host (two ranks cannot share one GPU under NCCL).
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(Path(__file__).resolve()), str(out)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-6000:])
    results = {style: torch.load(out / f"{style}.pt", weights_only=False) for style in ("gpt2", "llama")}
    results["seconds"] = time.time() - t0
    results["out"] = out
    return results


def _assert_state_close(got: dict, want: dict, atol: float, rtol: float = 0.0):
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.dist
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_pipeline_matches_single_process_training(dist_run, style):
    res, ref = dist_run[style], reference_run(style)
    # Two stages, every layer on exactly one; the tied head on the last stage.
    assert res["parts"][0] == 0 and res["parts"][-1] == num_pipeline_layers(config(style)) and len(res["parts"]) == 3
    _assert_state_close(res["init"], ref["init"], atol=0.0)  # exactly GPT(config) after manual_seed
    assert max(ref["norms"]) > CLIP  # clipping is active, so the global norm must be right
    for got, want in zip(res["losses"], ref["losses"]):
        assert got == pytest.approx(want, rel=1e-4)
    assert ref["losses"][-1] < ref["losses"][0]
    _assert_state_close(res["final"], ref["final"], atol=1e-4, rtol=1e-4)
    # the stages' own state_dict()s, merged, map to the same weights
    _assert_state_close(res["from_module_state"], res["final"], atol=0.0)
    total, n = res["eval"]
    assert n == ref["eval"][1] == 5 * SEQ
    assert total / n == pytest.approx(ref["eval"][0] / n, rel=1e-4)


@pytest.mark.dist
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_checkpoint_loads_as_gpt(dist_run, style):
    res = dist_run[style]
    folder = Path(res["checkpoint"])
    cfg = config(style)
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("layer_"))
    L = cfg.n_layer
    n_files = L + 2 if cfg.tie_embeddings else L + 3  # a tied head has no file of its own
    assert names == [f"layer_{i:02d}-model_states.pt" for i in range(n_files)]
    assert sorted(read_pipeline_checkpoint_layers(folder)) == list(range(n_files))
    # as consolidation reads it: tensor-parallel rank 0's files (no model part in the names here)
    for layers in (read_pipeline_checkpoint_layers(folder), read_pipeline_checkpoint_layers(folder, tp_rank=0)):
        sd = pipeline_to_gpt_state_dict(layers, cfg)
        model = GPT(cfg, init=False)
        model.load_state_dict(sd, strict=True)
        if cfg.tie_embeddings:
            model.tie_weights()
        _assert_state_close(model.state_dict(), res["saved"], atol=0.0)


@pytest.mark.dist
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_resume_from_pipeline_checkpoint(dist_run, style):
    """An engine built with init=False and loaded from the checkpoint continues exactly like the
    engine that saved it (weights, AdamW moments, LR schedule)."""
    res = dist_run[style]
    _assert_state_close(res["resumed_weights"], res["saved"], atol=0.0)
    assert res["resumed_loss"] == pytest.approx(res["continued_loss"], rel=1e-6)
    _assert_state_close(res["resumed_after"], res["continued_after"], atol=1e-6)


@pytest.mark.dist
def test_load_gpt_weights_and_activation_checkpointing(dist_run):
    res = dist_run["gpt2"]
    ref = reference_run("gpt2")
    _assert_state_close(res["loaded_init"], ref["init"], atol=0.0)
    for got, want in zip(res["ckpt_losses"], ref["losses"]):
        assert got == pytest.approx(want, rel=1e-4)
    assert res["ckpt_flags"] == [False, True]  # block layers are checkpointed, the embedding is not
    assert dist_run["seconds"] < 120


# --------------------------------------------------------------------------------------------------
# The distributed worker (run by torch.distributed.run with this file as the script).


def _worker(out: Path) -> None:
    import deepspeed

    from model.pipeline import (
        build_pipeline_module,
        gather_gpt_state_dict,
        load_gpt_state_dict_into_pipeline,
        pipeline_eval,
    )
    from trainer.distributed import init_distributed
    from trainer.model_setup import param_groups

    dist = init_distributed("gloo")
    data = train_data((STEPS + 1) * GAS)

    def engine_for(module, zero):
        engine, *_ = deepspeed.initialize(
            model=module, model_parameters=param_groups(module, WD), config=ds_config(zero),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn))
        return engine

    def step_batches(s):
        return pipeline_batches(data[s * GAS:(s + 1) * GAS])

    def merged_module_state(module):
        own = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, own)
        merged = {}
        for p in parts:
            merged.update(p)
        return merged

    for style in ("gpt2", "llama"):
        cfg = config(style)
        res: dict = {}
        module = build_pipeline_module(cfg, num_stages=2, partition_method=PARTITION[style], seed=SEED)
        res["parts"] = list(module.parts)
        res["init"] = gather_gpt_state_dict(module)
        engine = engine_for(module, ZERO[style])
        res["losses"] = [float(engine.train_batch(step_batches(s))) for s in range(STEPS)]
        res["final"] = gather_gpt_state_dict(module)
        res["from_module_state"] = pipeline_to_gpt_state_dict(merged_module_state(module), cfg)
        res["eval"] = pipeline_eval(engine, eval_data())

        ckpt = out / f"ckpt_{style}"
        engine.save_checkpoint(str(ckpt), tag="step5")
        res["checkpoint"] = str(ckpt / "step5")
        res["saved"] = gather_gpt_state_dict(module)

        # Resume into a fresh module that never built the full model.
        module2 = build_pipeline_module(cfg, num_stages=2, partition_method=PARTITION[style], init=False)
        engine2 = engine_for(module2, ZERO[style])
        path, _ = engine2.load_checkpoint(str(ckpt), tag="step5", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        assert path is not None
        res["resumed_weights"] = gather_gpt_state_dict(module2)
        res["continued_loss"] = float(engine.train_batch(step_batches(STEPS)))
        res["resumed_loss"] = float(engine2.train_batch(step_batches(STEPS)))
        res["continued_after"] = gather_gpt_state_dict(module)
        res["resumed_after"] = gather_gpt_state_dict(module2)

        if style == "gpt2":
            # init=False + GPT weights loaded before deepspeed.initialize, with activation checkpointing.
            torch.manual_seed(SEED)
            sd = GPT(cfg).state_dict()
            module3 = build_pipeline_module(cfg, num_stages=2, init=False, activation_checkpoint_interval=1)
            load_gpt_state_dict_into_pipeline(module3, sd)
            res["loaded_init"] = gather_gpt_state_dict(module3)
            engine3 = engine_for(module3, 0)
            res["ckpt_flags"] = list(module3.is_checkpointable_results)  # rank 0: [embedding, block 0]
            res["ckpt_losses"] = [float(engine3.train_batch(step_batches(s))) for s in range(2)]

        if dist.rank == 0:
            torch.save(res, out / f"{style}.pt")
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
