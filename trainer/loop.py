"""The one training loop every recipe runs, on the DeepSpeed engine (even for one process).

Order of work: set up the run directory -> prepare data (rank 0 first, the others reuse its
cache) -> build the full model (`model_setup`) -> apply parallelism from outside the model
(`parallel`: pipeline, tensor parallel, then the DeepSpeed engine with ZeRO and data
parallelism) -> resume (`resume`) -> steps (`step`) with logging, evaluation and checkpoints ->
final checkpoint, full evaluation, sample and summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import checkpoint as ckpt
from . import faults, optim_state
from .data import DataSpec, ShardedSampler, TokenBlocks, prepare_data
from .distributed import DistInfo, barrier, max_int
from .ds_config import deepspeed_config, lr_lambda, resolve_precision
from .errors import TrainingStopped, UsageError
from .evaluation import (
    bits_per_byte,
    evaluate,
    evaluate_pipeline,
    gzip_bits_per_byte,
    peak_flops,
    sample_text,
)
from .files import atomic_write_text
from .model_setup import build_model, param_groups
from .parallel import build_parallel_model, gather_full_state_dict, make_layout
from .recipe import recipe_to_dict
from .resume import layout_change, resolve_resume, restore
from .schema import Recipe
from .step import StepRunner
from .tracking import NullTracker, Tracker

__all__ = ["TrainingStopped", "UsageError", "train"]


@dataclass
class RunPaths:
    run_dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def _tokenizer_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _install_signal_handlers(state: dict) -> None:
    def handler(signum, frame):
        state["signal"] = signum

    # SIGUSR1: the warning Slurm sends before a time limit or preemption (see launch/slurm).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def train(recipe: Recipe, dist: DistInfo) -> dict:
    import deepspeed

    cfg_dict = recipe_to_dict(recipe)
    paths = RunPaths(Path(recipe.run.output_dir) / recipe.run.name)
    is_main = dist.is_main
    resume_from = resolve_resume(recipe, paths.checkpoints)
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
    ckpt.seed_all(recipe.train.seed)
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
    sampler = ShardedSampler(len(train_blocks), recipe.parallel.micro_batch, dp_rank, dp_world, recipe.train.seed)
    start_step = 0
    if resume_from is not None:
        start_step = restore(engine, recipe, resume_from, move, sampler, dist.rank, is_main)

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
        # Layout-independent Adam moments (every layout; collective): let a resume change the layout.
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
    runner = StepRunner(engine, layout, train_blocks, sampler, gas, dist.device, plain_grads)
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
            logged = (step + 1) % recipe.train.log_every == 0 or step + 1 == recipe.train.max_steps
            result = runner.run(poison=step + 1 in nan_steps, want_grad_norm=logged)
            step_loss, finite = result.loss, result.finite
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
                gn = result.grad_norm if plain_grads else engine.get_global_grad_norm()
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
    if layout.is_pipeline or (layout.tp > 1 and recipe.parallel.sequence_parallel):
        # Decoding one token at a time cannot be split over pipeline stages or sequence chunks:
        # generation runs on one rank with the gathered full model. Tensor parallelism without
        # SP generates in place on every rank (same generator seed, gathered logits: same tokens).
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
        # None when no step ran (a resume at train.max_steps only evaluates and samples)
        "tokens_per_s": ema_tps, "mfu": flops_per_token * ema_tps / peak if peak and ema_tps else None,
        "peak_flops_source": peak_source,
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
        + (f"throughput:      {s['tokens_per_s']:,.0f} tokens/s   MFU {s['mfu'] or 0:.1%} ({s['peak_flops_source']})\n"
           if s["tokens_per_s"] else "throughput:      no training step in this run\n")
        + f"sample:\n{s['sample']}\n",
        flush=True,
    )
