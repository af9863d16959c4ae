"""The one training loop every recipe runs, on the DeepSpeed engine (even for one process).

Order of work: set up the run directory -> prepare data (rank 0 first, the others reuse its
cache) -> build the model -> apply parallelism from outside the model (DeepSpeed engine: ZeRO and
data parallelism) -> resume -> train/evaluate/checkpoint -> final evaluation and summary.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt
from . import faults, optim_state
from .data import DataSpec, ShardedSampler, TokenBlocks, prepare_data
from .distributed import DistInfo, all_true, barrier, max_int
from .ds_config import deepspeed_config, lr_lambda, resolve_precision
from .evaluation import (
    bits_per_byte,
    evaluate,
    evaluate_pipeline,
    gzip_bits_per_byte,
    peak_flops,
    sample_text,
)
from .files import atomic_write_text
from .parallel import build_parallel_model, gather_full_state_dict, make_layout
from .recipe import recipe_to_dict
from .schema import Recipe
from .tracking import NullTracker, Tracker


class TrainingStopped(Exception):
    """The run stopped early on purpose; `exit_code` and the message are for the launcher."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(ValueError):
    """Bad input found at run time (e.g. a resume that does not fit this run)."""


@dataclass
class RunPaths:
    run_dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def padded_vocab(n: int, tp: int) -> int:
    """Round the embedding rows up to a multiple of 64*tp (Megatron's padding): faster matmuls and a
    vocabulary that splits evenly over tensor-parallel ranks."""
    m = 64 * tp
    return ((n + m - 1) // m) * m


def build_model(recipe: Recipe, vocab_size: int):
    from model import GPT, GPTConfig

    m = recipe.model
    if m.init_from:
        from model.hf import load_hf

        model = load_hf(m.init_from, kernels=m.kernels)
        if model.config.vocab_size < vocab_size:
            raise UsageError(f"model.init_from={m.init_from} has {model.config.vocab_size} embedding rows but the "
                             f"tokenizer has {vocab_size} tokens; set data.tokenizer to the model's tokenizer.json")
        model.config.activation_checkpointing = recipe.parallel.activation_checkpointing
        return model
    cfg = GPTConfig(
        style=m.style, vocab_size=m.vocab_size or padded_vocab(vocab_size, recipe.parallel.tp),
        n_layer=m.n_layer, n_head=m.n_head, n_kv_head=m.n_kv_head, d_model=m.d_model, d_ff=m.d_ff,
        max_seq_len=m.max_seq_len, dropout=m.dropout, bias=m.bias, norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings, init_std=m.init_std,
        activation_checkpointing=recipe.parallel.activation_checkpointing, kernels=m.kernels,
    )
    return GPT(cfg)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, norm gains or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class StepSkipper:
    """Lets the loop veto one optimizer update (non-finite loss) under any ZeRO stage.

    DeepSpeed wraps the torch optimizer (ZeRO, bf16); every wrapper ends in the base optimizer's
    step(), so skipping there leaves weights and Adam moments untouched while DeepSpeed's own
    bookkeeping (gradient reset, micro-step counters) proceeds as usual.

    With `check_grads` (the pipeline engine, which steps before the loop sees the loss) the
    decision is made inside step(): skip when any rank holds a non-finite gradient.
    `poison_next` is the test suite's fault injection for that path (gradients set to NaN)."""

    def __init__(self, engine, check_grads: bool = False):
        opt = self.base = optim_state.base_optimizer(engine)
        self.skip_next = False
        self.poison_next = False
        self.last_skipped = False
        original = opt.step

        # functools.wraps keeps the marker torch's LR scheduler put on step(), so it does not warn.
        @functools.wraps(original)
        def step(*args, **kwargs):
            skip = self.skip_next
            if check_grads:
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                if self.poison_next and grads:
                    grads[0].fill_(float("nan"))
                local_ok = all(bool(torch.isfinite(g).all()) for g in grads)
                skip = skip or not all_true(local_ok)
            self.skip_next = self.poison_next = False
            self.last_skipped = skip
            if skip:
                return None
            return original(*args, **kwargs)

        opt.step = step


@dataclass
class LayoutChange:
    """How the checkpoint's layout differs from this run's."""

    before: dict
    after: dict
    adam_file: Path | None = None

    @property
    def optimizer_portable(self) -> bool:
        """Adam moments move with the run when neither side uses tensor or pipeline parallelism
        (the checkpoint then holds them by parameter name, see `optim_state`). DeepSpeed's own
        ZeRO-1/2 "elastic" checkpoints cannot restore torch's AdamW in 0.19.8."""
        b, a = self.before, self.after
        return (b["tp"] == b["pp"] == a["tp"] == a["pp"] == 1 and self.adam_file is not None
                and self.adam_file.exists())

    def describe(self) -> str:
        f = "tp={tp} pp={pp} zero={zero_stage} world={world_size}"
        return f"{f.format(**self.before)} -> {f.format(**self.after)}"


def layout_change(meta: dict, recipe: Recipe, world_size: int) -> LayoutChange | None:
    keys = ("tp", "pp", "zero_stage", "world_size")
    before = {k: meta.get(k) for k in keys}
    after = {"tp": recipe.parallel.tp, "pp": recipe.parallel.pp, "zero_stage": recipe.parallel.zero_stage,
             "world_size": world_size}
    return None if before == after else LayoutChange(before, after)


def set_schedule_position(engine, step: int) -> None:
    """Continue the learning-rate schedule at `step` (optimizer state itself starts fresh)."""
    sched = engine.lr_scheduler
    sched.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    engine.global_steps = step


def _tokenizer_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _install_signal_handlers(state: dict) -> None:
    def handler(signum, frame):
        state["signal"] = signum

    # SIGUSR1: the warning Slurm sends before a time limit or preemption (see launch/slurm).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def _resolve_resume(recipe: Recipe, paths: RunPaths) -> Path | None:
    r = recipe.train.resume
    if r == "none":
        return None
    if r == "auto":
        return ckpt.latest_checkpoint(paths.checkpoints)
    p = Path(r)
    if not p.is_dir():
        raise UsageError(f"train.resume={r}: no such checkpoint folder")
    return p


def train(recipe: Recipe, dist: DistInfo) -> dict:
    import deepspeed

    cfg_dict = recipe_to_dict(recipe)
    paths = RunPaths(Path(recipe.run.output_dir) / recipe.run.name)
    is_main = dist.is_main
    resume_from = _resolve_resume(recipe, paths)
    resume_meta = ckpt.verify(resume_from) if resume_from is not None else None

    layout = make_layout(recipe, dist.rank, dist.world_size)
    dp_world, dp_rank = layout.dp, layout.dp_rank
    gas = recipe.grad_accum_steps(dist.world_size)
    seq_len = recipe.data.seq_len

    # ---- data: rank 0 tokenises, the others then read its cache --------------------------------
    spec = DataSpec(path=recipe.data.path, text_field=recipe.data.text_field, tokenizer=recipe.data.tokenizer,
                    vocab_size=recipe.data.vocab_size, seq_len=seq_len, val_fraction=recipe.data.val_fraction,
                    max_documents=recipe.data.max_documents, num_proc=recipe.data.num_proc, seed=recipe.train.seed)
    data = None
    if is_main:
        data = prepare_data(spec, recipe.data.cache_dir, show_progress=recipe.train.progress)
    barrier()
    if not is_main:
        data = prepare_data(spec, recipe.data.cache_dir, show_progress=False)
    tok_hash = _tokenizer_hash(data.tokenizer_path)
    if resume_meta is not None and resume_meta.get("tokenizer_sha256") != tok_hash:
        raise UsageError(f"checkpoint {resume_from} was trained with a different tokenizer "
                         f"(vocabulary {resume_meta.get('vocab_size')}) than this run's data "
                         f"({data.vocab_size}); resume with the same data.* settings or start a new run.name")

    if is_main:
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.run_dir / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))
        (paths.run_dir / "tokenizer.json").write_bytes(Path(data.tokenizer_path).read_bytes())
    barrier()

    train_blocks = TokenBlocks(data.train_tokens, seq_len)
    val_blocks = TokenBlocks(data.val_tokens, seq_len)

    # ---- model and engine ----------------------------------------------------------------------
    _seed_all(recipe.train.seed)
    full_model = build_model(recipe, data.vocab_size)
    move = layout_change(resume_meta, recipe, dist.world_size) if resume_meta is not None else None
    if move is not None:
        # Another layout wrote the checkpoint: start from its consolidated weights (resharded
        # below like any full model); DeepSpeed's shards cannot be read by this layout.
        from launch.export import consolidated_state_dict

        move.adam_file = resume_from / optim_state.FILE
        full_model.load_state_dict(consolidated_state_dict(resume_from, resume_meta))
    model_config = full_model.config
    n_params = full_model.num_params()
    flops_per_token = full_model.flops_per_token(seq_len)
    model = build_parallel_model(recipe, layout, full_model)
    del full_model
    if not layout.is_pipeline:
        model.to(dist.device)  # DeepSpeed's pipeline engine places its own stage
    if recipe.train.compile:
        # In place (nn.Module.compile): the same module, parameters and state_dict keys, so
        # checkpoints load with or without compile; only the module's call goes through dynamo.
        model.compile()
    ds_cfg = deepspeed_config(recipe, dist.world_size, dist.device.type)
    if is_main:
        atomic_write_text(paths.run_dir / "ds_config.json", json.dumps(ds_cfg, indent=1))
    schedule = lr_lambda(recipe)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, recipe.optim.weight_decay), config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        mpu=layout.grid if layout.tp > 1 and not layout.is_pipeline else None,
    )
    module = engine.module
    # The pipeline engine steps inside train_batch, before the loop sees the loss: there the
    # skipper checks the gradients themselves.
    skipper = StepSkipper(engine, check_grads=layout.is_pipeline)
    sampler = ShardedSampler(len(train_blocks), recipe.parallel.micro_batch, dp_rank, dp_world, recipe.train.seed)

    start_step = 0
    if resume_from is not None and move is None:
        loop_state = ckpt.load(engine, resume_from, dist.rank)
        sampler.load_state_dict(loop_state["sampler"])
        ckpt.set_rng_state(loop_state["rng"])
        start_step = loop_state["step"]
    elif resume_from is not None:
        loop_state = torch.load(resume_from / "loop_rank0.pt", weights_only=False)
        start_step = loop_state["step"]
        sampler.load_state_dict(loop_state["sampler"])  # a global position: valid for any dp degree
        _seed_all(recipe.train.seed + start_step)
        set_schedule_position(engine, start_step)
        if move.optimizer_portable:
            optim_state.restore(engine, module, recipe.parallel.zero_stage,
                                torch.load(move.adam_file, weights_only=False))
    if move is not None and is_main:
        print(f"resuming {resume_from} in another layout ({move.describe()}): weights resharded exactly; "
              + ("Adam state carried over" if move.optimizer_portable else
                 "optimizer state RESET (Adam moments start from zero: the checkpoint holds no "
                 "layout-independent Adam state, as with tensor/pipeline layouts)")
              + "; learning-rate schedule and data position carried over", flush=True)

    tracker = (Tracker(paths.run_dir, cfg_dict, recipe.tracking.wandb, recipe.tracking.project,
                       recipe.tracking.entity, recipe.tracking.group, recipe.tracking.tags,
                       resume_step=start_step if resume_from is not None else None)
               if is_main else NullTracker())

    peak, peak_source = peak_flops(dist.device, recipe.train.peak_tflops)
    tokens_per_step = recipe.global_batch(dist.world_size) * seq_len
    precision = resolve_precision(recipe, dist.device.type)
    if is_main:
        print(f"run: {paths.run_dir}  params: {n_params / 1e6:.2f}M  world: {dist.world_size} "
              f"({layout.describe()} zero={recipe.parallel.zero_stage})  "
              f"precision: {precision}  kernels: {module.ops.mode}  "
              f"train tokens: {len(data.train_tokens):,}  val tokens: {len(data.val_tokens):,}"
              + (f"  resumed from {resume_from.name}" if resume_from else ""), flush=True)
        if recipe.train.compile:
            print("compile: the model's forward runs under torch.compile (the first steps, and the first "
                  "evaluation, are slower while it compiles)", flush=True)
            if layout.tp > 1 and recipe.model.dropout > 0:
                print("compile: with tensor parallelism and dropout > 0 the graph breaks at every attention layer "
                      "(and sequence-parallel dropout): the per-rank dropout RNG cannot be traced", flush=True)

    nan_steps = faults.nan_steps()
    signal_state: dict = {}
    _install_signal_handlers(signal_state)

    def meta(step: int) -> dict:
        return {"step": step, "config": cfg_dict, "tokenizer_sha256": tok_hash, "vocab_size": data.vocab_size,
                "world_size": dist.world_size, "tp": recipe.parallel.tp, "pp": recipe.parallel.pp,
                "zero_stage": recipe.parallel.zero_stage, "data_cache_key": data.cache_key,
                "model_config": model_config.to_dict()}

    def save(step: int) -> Path:
        state = {"step": step, "sampler": sampler.state_dict(), "rng": ckpt.rng_state()}
        extra = None
        if layout.tp == layout.pp == 1:
            # Layout-independent Adam moments: let a resume change the ZeRO stage or dp degree.
            adam = optim_state.gather(engine, module, recipe.parallel.zero_stage)
            extra = {optim_state.FILE: adam} if adam is not None and is_main else None
        return ckpt.save(engine, paths.checkpoints, step, state, meta(step), dist.rank,
                         recipe.train.keep_checkpoints, extra)

    def run_eval(step: int, full: bool) -> dict:
        max_batches = None if full else recipe.train.eval_batches
        if layout.is_pipeline:
            loss, n = evaluate_pipeline(engine, val_blocks, recipe.parallel.micro_batch, max_batches, layout)
        else:
            loss, n = evaluate(module, val_blocks, recipe.parallel.micro_batch, max_batches, dp_rank, dp_world,
                               dist.device, group=layout.dp_group())
        row = {"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
               "val_bpb": bits_per_byte(loss, data.val_num_tokens, data.val_bytes), "val_tokens": n}
        tracker.log(row)
        return row

    bar = None
    if is_main and recipe.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=recipe.train.max_steps, initial=start_step, desc="train", unit="step",
                   dynamic_ncols=True)

    # With ZeRO-0 in fp32 the gradients live on the parameters until step(); otherwise DeepSpeed
    # reports the global norm itself.
    plain_grads = recipe.parallel.zero_stage == 0 and precision == "fp32" and layout.tp == layout.pp == 1
    grad_norm = None
    consecutive_nan = skipped_total = 0
    last_loss = float("nan")
    ema_tps = None
    engine.train()
    step = start_step
    stop_reason = None
    try:
        while step < recipe.train.max_steps:
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]  # the rate this step's update uses (the scheduler moves on in step())
            if layout.is_pipeline:
                # DeepSpeed's pipeline engine runs the 1F1B schedule over `gas` micro-batches and
                # steps the optimizer itself; its loss is already averaged over data-parallel ranks.
                batches = [train_blocks.get(sampler.next_indices()) for _ in range(gas)]
                skipper.poison_next = step + 1 in nan_steps
                step_loss = engine.train_batch(iter(batches)).detach().double().cpu()
                finite = not skipper.last_skipped and bool(torch.isfinite(step_loss).item())
            else:
                loss_sum = torch.zeros((), dtype=torch.float64)
                finite = True
                for micro in range(gas):
                    x, y = train_blocks.get(sampler.next_indices())
                    x, y = x.to(dist.device), y.to(dist.device)
                    loss = engine(x, targets=y)
                    if step + 1 in nan_steps:
                        loss = loss * float("nan")
                    finite &= bool(torch.isfinite(loss.detach()).item())
                    engine.backward(loss)
                    if micro == gas - 1:
                        finite = all_true(finite)
                        skipper.skip_next = not finite
                        if plain_grads and finite and (step + 1) % recipe.train.log_every == 0:
                            # ZeRO-0 in fp32 does not keep the norm it clips with; measure it here.
                            grad_norm = torch.nn.utils.get_total_norm(
                                [p.grad for p in module.parameters() if p.grad is not None]).item()
                    engine.step()
                    loss_sum += loss.detach().double().cpu()
                step_loss = loss_sum / gas
                if dp_world > 1 and finite:
                    t = step_loss.to(dist.device)
                    torch.distributed.all_reduce(t, group=layout.dp_group())
                    step_loss = t.cpu() / dp_world
            step += 1
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt
            ema_tps = tps if ema_tps is None else 0.9 * ema_tps + 0.1 * tps
            if finite:
                consecutive_nan = 0
                last_loss = float(step_loss)
            else:
                consecutive_nan += 1
                skipped_total += 1
                if is_main:
                    msg = f"step {step}: non-finite loss, update skipped ({consecutive_nan} in a row)"
                    (bar.write if bar else print)(msg)
            if step % recipe.train.log_every == 0 or step == recipe.train.max_steps or not finite:
                gn = grad_norm if plain_grads else engine.get_global_grad_norm()
                tracker.log({"step": step, "loss": float(step_loss) if finite else None, "lr": lr,
                             "grad_norm": float(gn) if gn is not None and finite else None,
                             "tokens_per_s": tps, "mfu": flops_per_token * tps / peak if peak else None,
                             "skipped_steps": skipped_total, "step_time_s": dt,
                             **_memory_stats(dist.device)})
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{ema_tps:,.0f}", refresh=False)
                bar.update(1)
            if not finite:
                if recipe.train.nan_policy == "stop":
                    raise TrainingStopped(f"non-finite loss at step {step} (train.nan_policy=stop); the update was "
                                          "skipped and the run stopped", 3)
                if consecutive_nan >= recipe.train.max_nan_steps:
                    raise TrainingStopped(f"{consecutive_nan} consecutive non-finite losses up to step {step} "
                                          f"(train.max_nan_steps={recipe.train.max_nan_steps}); stopping", 3)
            done = step == recipe.train.max_steps
            if step % recipe.train.eval_every == 0 and not done:
                row = run_eval(step, full=False)
                if bar is not None:
                    bar.write(f"step {step}: val_loss {row['val_loss']:.4f}  val_bpb {row['val_bpb']:.3f}")
                if is_main:
                    tracker.plot()
            if recipe.train.checkpoint_every and step % recipe.train.checkpoint_every == 0 and not done:
                save(step)
            faults.maybe_kill(faults.KILL_AFTER_STEP, step)
            # Every rank stops at the same step, naming the same signal (the largest one seen).
            stop_signal = max_int(int(signal_state.get("signal", 0)))
            if stop_signal:
                stop_reason = stop_signal
                break
    finally:
        if bar is not None:
            bar.close()

    if stop_reason is not None:
        folder = save(step)
        name = signal.Signals(stop_reason).name
        if is_main:
            tracker.finish()
        raise TrainingStopped(f"{name} received: saved checkpoint {folder} at step {step}; continue with "
                              f"train.resume=auto", 128 + int(stop_reason))

    # ---- end of run: checkpoint, full evaluation, sample, summary --------------------------------
    folder = save(step)
    final = run_eval(step, full=True)
    sample_module = module
    if layout.tp > 1 or layout.is_pipeline:
        # Generation runs on one rank with the gathered full model.
        from model import GPT

        full_sd = gather_full_state_dict(module, layout)
        sample_module = None
        if is_main:
            sample_module = GPT(model_config, init=False).to(dist.device)
            sample_module.load_state_dict(full_sd)
        del full_sd
    sample = ""
    if sample_module is not None:
        # Generation (a growing key/value cache, one new shape per token) stays eager.
        with torch.compiler.set_stance("force_eager") if recipe.train.compile else contextlib.nullcontext():
            sample = sample_text(sample_module, data.tokenizer, recipe.train.sample_prompt, recipe.train.sample_tokens,
                                 dist.device, recipe.train.seed, data.eos_id)
    summary = {
        "run_dir": str(paths.run_dir), "steps": step, "params": n_params,
        "final_train_loss": last_loss, "final_val_loss": final["val_loss"], "val_bpb": final["val_bpb"],
        "gzip_bpb": gzip_bits_per_byte(data.val_text()), "ln_vocab": math.log(data.vocab_size),
        "tokens_per_s": ema_tps, "mfu": flops_per_token * (ema_tps or 0) / peak if peak else None, "peak_flops_source": peak_source,
        "skipped_steps": skipped_total, "checkpoint": str(folder), "sample": sample,
    }
    if is_main:
        tracker.log_sample(step, recipe.train.sample_prompt, sample)
        tracker.finish()
        atomic_write_text(paths.run_dir / "summary.json", json.dumps(summary, indent=1))
        _print_summary(summary)
    return summary


def _memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem_allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
                "mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import resource

        return {"mem_rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    except ImportError:  # pragma: no cover - not on Linux
        return {}


def _print_summary(s: dict) -> None:
    ratio = s["final_val_loss"] / s["ln_vocab"]
    print(
        f"\nrun directory:   {s['run_dir']}\n"
        f"final loss:      train {s['final_train_loss']:.4f}   val {s['final_val_loss']:.4f} "
        f"({ratio:.0%} of ln(vocab) = {s['ln_vocab']:.3f})\n"
        f"bits per byte:   model {s['val_bpb']:.3f}   gzip -9 {s['gzip_bpb']:.3f}\n"
        f"throughput:      {s['tokens_per_s']:,.0f} tokens/s   MFU {s['mfu'] or 0:.1%} ({s['peak_flops_source']})\n"
        f"sample:\n{s['sample']}\n",
        flush=True,
    )
