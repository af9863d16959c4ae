"""Tensor parallelism (model.tensor_parallel): state-dict shard/merge, and with tp=2 (and 4) gloo
processes on CPU: logits, loss, every gradient and a few AdamW steps against the single-process
GPT for both styles, with and without sequence parallelism; the vocab-parallel cross-entropy."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from launch.multiproc import free_port
from model import GPT, GPTConfig
from model import tensor_parallel as tpm
from model.tensor_parallel import apply_tensor_parallel, merge_state_dicts, shard_state_dict

V = 128
STYLES = ["gpt2", "llama"]


def tiny(style: str, **kw) -> GPTConfig:
    base = dict(style=style, vocab_size=V, n_layer=2, n_head=4, d_model=32, max_seq_len=16, kernels="torch")
    if style == "llama":
        base["n_kv_head"] = 2  # grouped-query attention: 2 query heads per kv head
    base.update(kw)
    return GPTConfig(**base)


def build(style: str, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(style, **kw))


def close(actual, expected, what="", tol=1e-5):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------- pure (no processes)


@pytest.mark.parametrize("style,tp", [("gpt2", 2), ("gpt2", 4), ("llama", 2)])
def test_shard_merge_round_trip(style, tp):
    m = build(style)
    cfg, sd = m.config, m.state_dict()
    shards = [shard_state_dict(sd, cfg, tp, r) for r in range(tp)]
    hd, d, ff = cfg.head_dim, cfg.d_model, cfg.d_ff
    for r, s in enumerate(shards):
        assert list(s) == list(sd)
        assert s["tok_emb.weight"].shape == (V // tp, d)
        assert torch.equal(s["tok_emb.weight"], sd["tok_emb.weight"][r * V // tp:(r + 1) * V // tp])
        assert s["blocks.0.attn.q_proj.weight"].shape == (cfg.n_head // tp * hd, d)
        assert s["blocks.0.attn.k_proj.weight"].shape == (cfg.n_kv_head // tp * hd, d)
        assert s["blocks.1.attn.o_proj.weight"].shape == (d, cfg.n_head // tp * hd)
        assert torch.equal(s["blocks.1.attn.o_proj.weight"],
                           sd["blocks.1.attn.o_proj.weight"][:, r * d // tp:(r + 1) * d // tp])
        assert s["final_norm.weight"] is sd["final_norm.weight"]  # replicated
        if style == "gpt2":
            assert s["blocks.0.mlp.fc.weight"].shape == (ff // tp, d)
            assert s["blocks.0.mlp.fc.bias"].shape == (ff // tp,)
            assert s["blocks.0.mlp.proj.weight"].shape == (d, ff // tp)
            assert s["blocks.0.mlp.proj.bias"] is sd["blocks.0.mlp.proj.bias"]  # row-parallel bias: full
            assert s["blocks.0.attn.q_proj.bias"].shape == (cfg.n_head // tp * hd,)
            assert s["pos_emb.weight"] is sd["pos_emb.weight"]
            assert s["lm_head.weight"] is s["tok_emb.weight"]  # tied stays one tensor
        else:
            assert s["blocks.0.mlp.gate_proj.weight"].shape == (ff // tp, d)
            assert s["blocks.0.mlp.down_proj.weight"].shape == (d, ff // tp)
            assert s["lm_head.weight"].shape == (V // tp, d)
    merged = merge_state_dicts(shards, cfg)
    assert list(merged) == list(sd)
    for k in sd:
        assert merged[k].shape == sd[k].shape and torch.equal(merged[k], sd[k]), k
    if style == "gpt2":
        assert merged["lm_head.weight"] is merged["tok_emb.weight"]
    # Any key prefix (a wrapper or a pipeline stage) is split the same way.
    pre = shard_state_dict({f"module.{k}": v for k, v in sd.items()}, cfg, tp, 1)
    assert all(torch.equal(pre[f"module.{k}"], v) for k, v in shards[1].items())


def test_shard_validation():
    sd = build("gpt2").state_dict()
    with pytest.raises(ValueError, match="vocabulary"):
        shard_state_dict({}, tiny("gpt2", vocab_size=101), 2, 0)
    with pytest.raises(ValueError, match="n_head=4"):
        shard_state_dict({}, tiny("gpt2", vocab_size=96), 3, 0)
    with pytest.raises(ValueError, match="n_kv_head=2"):
        shard_state_dict({}, tiny("llama"), 4, 0)
    with pytest.raises(ValueError, match="tp_rank"):
        shard_state_dict(sd, tiny("gpt2"), 2, 2)
    shards = [shard_state_dict(sd, tiny("gpt2"), 2, r) for r in range(2)]
    shards[1].pop("final_norm.weight")
    with pytest.raises(ValueError, match="keys"):
        merge_state_dicts(shards, tiny("gpt2"))


# ------------------------------------------------------------------------------- multi-process (gloo)


def _entry(rank, world, port, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    fn(rank, world, *args)  # an exception propagates: mp.spawn reports it with its traceback
    dist.barrier()
    _exit_now()


def _exit_now():
    """Leave a finished worker without the interpreter's teardown: under heavy load gloo's threads
    were once seen to abort while being destroyed at exit ("terminate called without an active
    exception"), failing a test whose checks had all passed."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world, *args):
    import torch.multiprocessing as mp

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # children inherit it: no oversubscription on small hosts
    try:
        mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


def _gather_dicts(d: dict, world: int) -> list[dict]:
    out = [None] * world
    dist.all_gather_object(out, d)
    return out


def _batch(gen, B=2, T=8):
    x = torch.randint(0, V, (B, T), generator=gen)
    y = torch.randint(0, V, (B, T), generator=gen)
    y[0, :3] = -100
    return x, y


def _model_worker(rank, world, style, sp, tensor_collectives, cfg_kw):
    tpm.GLOO_TENSOR_COLLECTIVES = tensor_collectives
    ref = build(style, **cfg_kw).train()
    model = copy.deepcopy(ref)
    cfg = ref.config
    assert apply_tensor_parallel(model, None, sequence_parallel=sp) is model
    assert isinstance(model.tok_emb, tpm.VocabParallelEmbedding)
    assert isinstance(model.lm_head, tpm.VocabParallelLMHead)
    assert model.blocks[0].attn.n_head == cfg.n_head // world
    assert model.blocks[0].attn.n_kv_head == cfg.n_kv_head // world
    if style == "gpt2":
        assert model.lm_head.weight is model.tok_emb.weight  # tied: one shard parameter

    # state_dict: the single-process keys, holding exactly shard_state_dict's slices.
    local, expected = model.state_dict(), shard_state_dict(ref.state_dict(), cfg, world, rank)
    assert list(local) == list(expected)
    for k in expected:
        assert torch.equal(local[k], expected[k]), k
    model.set_kernels("torch")  # keeps the vocab-parallel loss
    assert isinstance(model.ops, tpm.TensorParallelOps) and model.blocks[1].mlp.ops is model.ops

    gen = torch.Generator().manual_seed(1)
    x, y = _batch(gen)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 8, V // world)  # sharded over the vocabulary
        close(tpm.gather_from_tensor_parallel_region(logits), ref(x), "logits")

    loss, ref_loss = model(x, targets=y), ref(x, targets=y)
    close(loss, ref_loss, "loss")
    loss.backward()
    ref_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}
    merged = merge_state_dicts(_gather_dicts(grads, world), cfg)
    ref_grads = {n: p.grad for n, p in ref.named_parameters(remove_duplicate=False)}
    assert list(merged) == list(ref_grads)
    for n, g in ref_grads.items():
        close(merged[n], g, f"grad of {n}")

    # Adam divides by sqrt(v): float32 rounding of the ~1e-8 (cancelling) gradients of a few unused
    # embedding rows becomes weight differences of ~lr*1e-3 with the default eps=1e-8 (~lr*1e-4 with
    # eps=1e-6), hence the weights' tolerance below; the losses match to 1e-5 either way.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-6)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-6)
    for step in range(3):
        x, y = _batch(gen)
        losses = []
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            loss = m(x, targets=y)
            loss.backward()
            o.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[1]), (step, losses)
    weights = merge_state_dicts(_gather_dicts(model.state_dict(), world), cfg)
    for k, w in ref.state_dict().items():
        close(weights[k], w, f"weight {k} after 3 steps", tol=1e-4)

    prompts = [[5, 17, 33, 2], [11, 3]]
    if sp:  # decoding steps of one token cannot be split over the sequence
        with pytest.raises(ValueError, match="sequence length 1"):
            model.generate(prompts, 3, temperature=0)
    else:  # KV cache with the local kv heads, logits gathered for sampling
        assert model.generate(prompts, 4, temperature=0) == ref.generate(prompts, 4, temperature=0)


@pytest.mark.dist
@pytest.mark.parametrize("style,sp,tensor_collectives,cfg_kw", [
    ("gpt2", False, False, {}),
    ("gpt2", True, False, {}),
    ("llama", False, False, {}),
    # the single-tensor collectives (the NCCL code path) on gloo, and recomputation in backward
    ("llama", True, True, {"activation_checkpointing": True}),
], ids=["gpt2", "gpt2-sp", "llama", "llama-sp-tensorcoll-ckpt"])
def test_tp2_matches_single_process(style, sp, tensor_collectives, cfg_kw):
    spawn(_model_worker, 2, style, sp, tensor_collectives, cfg_kw)


@pytest.mark.dist
def test_tp4_sequence_parallel_gpt2():
    spawn(_model_worker, 4, "gpt2", True, False, {})


def _ce_meta_errors_worker(rank, world):
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(3, 9, V, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (3, 9), generator=gen)
    targets[0, :4] = -100
    targets[1, 0], targets[1, 1] = V // 2 - 1, V // 2  # last id of shard 0, first of shard 1
    targets[2, :] = 7  # with ignore_index=7: the whole row is ignored
    n = V // world
    lo = rank * n
    for ignore_index in (-100, 7):
        if ignore_index != -100:
            targets = targets.masked_fill(targets == -100, ignore_index)
        for dtype in (torch.float32, torch.float64):
            shard = full[..., lo:lo + n].to(dtype).requires_grad_()
            loss = tpm.vocab_parallel_cross_entropy(shard, targets, lo, None, ignore_index)
            loss.backward()
            ref_in = full.clone().requires_grad_()
            ref = F.cross_entropy(ref_in.view(-1, V), targets.view(-1), ignore_index=ignore_index)
            ref.backward()
            close(loss.double(), ref, f"CE loss ({dtype}, ignore {ignore_index})")
            close(shard.grad.double(), ref_in.grad[..., lo:lo + n], f"CE grad ({dtype}, ignore {ignore_index})")

    # Build on the meta device, split, then load this rank's shard of a checkpoint.
    for style in STYLES:
        ref = build(style)
        with torch.device("meta"):
            model = GPT(tiny(style), init=False)
        apply_tensor_parallel(model, None, sequence_parallel=True)
        model.to_empty(device="cpu")  # unties, as for the unsplit model
        if model.config.tie_embeddings:
            model.tie_weights()
        model.reset_buffers()
        model.load_state_dict(shard_state_dict(ref.state_dict(), ref.config, world, rank))
        x, y = _batch(torch.Generator().manual_seed(4))
        close(model(x, targets=y), ref(x, targets=y), f"{style} loss after meta init")

    # Bad sizes are refused before anything changes.
    m = build("gpt2", vocab_size=V + 1)
    with pytest.raises(ValueError, match="vocabulary"):
        apply_tensor_parallel(m, None)
    assert type(m.tok_emb) is torch.nn.Embedding and type(m.blocks[0].attn.q_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="n_kv_head=1"):
        apply_tensor_parallel(build("llama", n_kv_head=1), None)
    m = apply_tensor_parallel(build("llama"), None)
    with pytest.raises(ValueError, match="already tensor parallel"):
        apply_tensor_parallel(m, None)


@pytest.mark.dist
def test_vocab_parallel_cross_entropy_meta_init_and_errors():
    spawn(_ce_meta_errors_worker, 2)


# ------------------------------------------------------------------------------------ dropout RNG


def _dropout_worker(rank, world, sp):
    # Decorrelated per rank inside the region; the global stream stays identical across ranks.
    tp = tpm.TPInfo(None, sp)
    torch.manual_seed(3)
    with tpm.tensor_parallel_rng(tp, torch.device("cpu")):
        inside = torch.rand(16)
    after = torch.rand(4)
    gathered_in, gathered_after = _gather_dicts({"v": inside}, world), _gather_dicts({"v": after}, world)
    assert not torch.equal(gathered_in[0]["v"], gathered_in[1]["v"]), "TP ranks drew the same dropout stream"
    assert all(torch.equal(g["v"], after) for g in gathered_after), "the global RNG diverged across TP ranks"

    # Attention dropout over each rank's heads: make the heads of rank 1 copies of rank 0's, so the
    # attention outputs (o_proj's input) of the two ranks are equal unless the masks differ.
    ref = build("gpt2", dropout=0.3).train()
    hd, nh = ref.config.head_dim, ref.config.n_head
    with torch.no_grad():
        for blk in ref.blocks:
            for lin in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj):
                lin.weight[nh // 2 * hd:] = lin.weight[:nh // 2 * hd]
                lin.bias[nh // 2 * hd:] = lin.bias[:nh // 2 * hd]
    model = apply_tensor_parallel(copy.deepcopy(ref), None, sequence_parallel=sp)
    if sp:
        assert isinstance(model.blocks[0].drop, tpm.SequenceParallelDropout)
    else:
        assert type(model.blocks[0].drop) is torch.nn.Dropout
    seen = []
    model.blocks[0].attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x, y = _batch(torch.Generator().manual_seed(1))
    for p in (0.0, 0.3):  # control: no dropout -> equal; dropout -> different masks per rank
        for blk in model.blocks:
            blk.attn.dropout = p
        seen.clear()
        torch.manual_seed(7)
        model(x, targets=y)
        outs = _gather_dicts({"y": seen[0]}, world)
        same = torch.equal(outs[0]["y"], outs[1]["y"])
        assert same == (p == 0.0), f"dropout {p}: rank outputs equal={same}"

    # Activation recomputation regenerates exactly the forward's masks (region seeds come from the
    # global state that checkpointing restores): equal loss and gradients with and without it.
    grads = []
    for ckpt in (False, True):
        m = copy.deepcopy(model)
        m.config = copy.copy(m.config)
        m.config.activation_checkpointing = ckpt
        torch.manual_seed(11)
        loss = m(x, targets=y)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert torch.equal(grads[0][0], grads[1][0])
    for n, g in grads[0][1].items():
        assert torch.equal(g, grads[1][1][n]), f"grad of {n} differs under recomputation"


@pytest.mark.dist
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_dropout_masks_per_rank_and_recompute(sp):
    spawn(_dropout_worker, 2, sp)


# ------------------------------------------------------------------------------- decoding engine


def _engine_worker(rank, world, style):
    from model import DecodeEngine, SamplingParams

    ref = build(style, max_seq_len=32).eval()
    model = apply_tensor_parallel(copy.deepcopy(ref), None)
    prompts = [[5, 17, 33, 2], [11, 3], [60, 3, 3, 99, 7, 1], [9], [40, 41, 42]]
    params = [SamplingParams(temperature=0, max_new_tokens=6),
              SamplingParams(temperature=1.0, seed=1, max_new_tokens=9),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=2, max_new_tokens=4),
              SamplingParams(temperature=0, max_new_tokens=8),
              SamplingParams(temperature=1.2, seed=3, max_new_tokens=5)]

    def run(m):
        engine = DecodeEngine(m, max_slots=2)
        # By hand: a row leaves unfinished, another joins its slot, a step over one row only.
        events = [(o.slot, o.token, o.logprob) for o in engine.prefill(prompts[:2], [0, 1], params[:2])]
        events += [(o.slot, o.token, o.logprob) for o in engine.decode([1])]
        engine.release(0)
        events += [(o.slot, o.token, o.logprob) for o in engine.prefill([prompts[3]], [0], params[3])]
        events += [(o.slot, o.token, o.logprob) for o in engine.decode([0, 1])]
        engine.release(0)
        engine.release(1)
        # Continuous batching: five requests through the two slots.
        events += [(i, o.token, o.logprob) for i, o in engine.stream(prompts, params)]
        return events

    got, want = run(model), run(ref)
    assert [e[:2] for e in got] == [e[:2] for e in want]
    close(torch.tensor([e[2] for e in got]), torch.tensor([e[2] for e in want]), "logprobs")
    assert all(g == got for g in _gather_dicts(got, world))  # the same tokens on every rank


@pytest.mark.dist
@pytest.mark.parametrize("style", STYLES)
def test_tp2_decode_engine_matches_single_process(style):
    spawn(_engine_worker, 2, style)


# ----------------------------------------------------------- vocabulary-parallel per-token losses


def _vp_token_losses_worker(rank, world):
    """vocab_parallel_token_{cross_entropy, entropy, logprob_and_entropy} on this rank's shard of
    logits[:, :-1] (row-strided; V = 1001 split 501 + 500) against the float64 oracle of the full
    logits: values (the same on every rank) and the shard of the gradient for random per-token
    upstream gradients; kernels and plain torch, float32 and bfloat16; ignored targets, targets on
    both sides of the shard edge, a row with -inf logits across both shards, a nearly one-hot row."""
    from model.kernels import (
        vocab_parallel_token_cross_entropy,
        vocab_parallel_token_entropy,
        vocab_parallel_token_logprob_and_entropy,
    )
    from tests.test_token_losses import assert_grads, assert_values, o_token_ce, o_token_entropy

    gen = torch.Generator().manual_seed(21)
    Vf, bounds = 1001, (0, 501, 1001)
    lo, hi = bounds[rank], bounds[rank + 1]
    full = torch.randn(3, 13, Vf, generator=gen, dtype=torch.float64) * 3
    full[0, 2, 10:700] = float("-inf")
    full[1, 4] *= 10
    targets = torch.randint(0, Vf, (3, 12), generator=gen)
    targets[0, :3] = -100
    targets[2, 5] = -100
    targets[1, 0], targets[1, 1], targets[1, 2], targets[0, 4] = 500, 501, Vf - 1, 0
    valid = targets != -100
    ups = [torch.randn(3, 12, generator=gen, dtype=torch.float64) for _ in range(2)]

    def oracles(x64):
        ce, ent = o_token_ce(x64, targets), o_token_entropy(x64)
        return {"ce": (ce,), "entropy": (ent,), "both": (-ce, torch.where(valid, ent, 0.0))}

    for use_kernels in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            x = full.to(dtype)
            uk = dict(use_kernels=use_kernels)
            fns = {"ce": lambda s, uk=uk: (vocab_parallel_token_cross_entropy(s, targets, lo, None, **uk),),
                   "entropy": lambda s, uk=uk: (vocab_parallel_token_entropy(s, None, **uk),),
                   "both": lambda s, uk=uk: vocab_parallel_token_logprob_and_entropy(s, targets, lo, None, **uk)}
            for name, fn in fns.items():
                what = f"rank {rank} {name} kernels={use_kernels} {dtype}"
                shard = x[..., lo:hi].clone().requires_grad_()
                outs = fn(shard[:, :-1])
                sum((o.double() * u).sum() for o, u in zip(outs, ups)).backward()
                x64 = x.double().requires_grad_()
                refs = oracles(x64[:, :-1])[name]
                sum((o * u).sum() for o, u in zip(refs, ups)).backward()
                for i, (o, r) in enumerate(zip(outs, refs)):
                    assert_values(o, r, f"{what} output {i}", max_logit=100.0)
                    assert all(torch.equal(g["v"], o) for g in _gather_dicts({"v": o.detach()}, world)), what
                assert_grads(shard.grad, x64.grad[..., lo:hi], dtype, f"{what} grad")


@pytest.mark.dist
def test_vocab_parallel_token_losses_two_ranks():
    spawn(_vp_token_losses_worker, 2)
