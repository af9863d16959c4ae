"""The pre-training loop every recipe runs, on the DeepSpeed engine (even for one process).

A thin orchestration of parts that other loops (agents) compose as well:
    `ParallelDims` (trainer.dims)       the ranks and every process group, made once
    `RunContext` (trainer.run_context)  run directory, signals, tracker, checkpoints of components
    `build_replica` (trainer.replica)   the full model built, then `parallelize`d on the dims
    `Stepper` (trainer.step)            one optimizer step from given micro-batches, veto and hooks
    `restore` (trainer.resume)          continue in the same layout (exact) or another (resharded)

Order of work: set up the run directory -> prepare data (the job's first rank first, the others
reuse its cache) -> build the replica -> resume -> steps with logging, evaluation and checkpoints
-> final checkpoint, full evaluation, sample and summary. Every collective goes over the replica's
own groups, so one job may run several of these loops on disjoint groups of ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import yaml

from model.flops import end_of_run_peak, peak_flops

from . import checkpoint as ckpt
from . import distill, faults, optim_state
from .consolidate import consolidate_once
from .data import DataSpec, ShardedSampler, TokenBlocks, eval_sample, prepare_data
from .dims import ParallelDims
from .distributed import DistInfo, barrier
from .ds_config import resolve_precision
from .errors import TrainingStopped, UsageError
from .evaluation import (
    bits_per_byte,
    evaluate,
    evaluate_pipeline,
    gzip_bits_per_byte,
    sample_text,
)
from .files import atomic_write_text
from .parallelize import batch_world, engine_config, gather_full_state_dict
from .recipe import recipe_to_dict
from .replica import build_replica
from .resume import find_resume, layout_change, restore
from .run_context import RunContext
from .schema import Recipe
from .step import Stepper
from .sync import Synchronizer

__all__ = ["TrainingStopped", "UsageError", "train"]


def _tokenizer_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_dims(recipe: Recipe, dist: DistInfo, replicas: int = 1) -> ParallelDims:
    """The dims of a run over the whole world, split into `replicas` (a sync run) or not."""
    return ParallelDims.build(dist.world_size, dist.rank, recipe.parallel.tp, recipe.parallel.pp, replicas,
                              servers=recipe.server_ranks())


def _sampler(recipe: Recipe, dims: ParallelDims, data, train_blocks, shared: bool):
    """This rank's sampler and every replica's number of training samples n_i. IID (and no sync):
    every data-parallel rank of the job draws its share of one global order, as without replicas;
    a non-IID split gives each replica its own blocks, drawn by its own data-parallel ranks."""
    seed, micro = recipe.train.seed, recipe.parallel.micro_batch
    if not shared or recipe.data.split == "iid":
        dp_rank, dp_world = dims.dp_rank, dims.dp
        if shared:  # the job's data-parallel index: replicas of consecutive ranks in order
            dp_rank, dp_world = dims.replica * dims.dp + dims.dp_rank, dims.replicas * dims.dp
        counts = [len(train_blocks) // dims.replicas] * dims.replicas
        return ShardedSampler(len(train_blocks), micro, dp_rank, dp_world, seed), counts
    from .data import split_train_blocks

    parts = split_train_blocks(data, recipe.data.seq_len, dims.replicas, recipe.data.split,
                               alpha=recipe.data.split_alpha, seed=seed)
    mine = parts[dims.replica]
    return ShardedSampler(len(train_blocks), micro, dims.dp_rank, dims.dp, seed, indices=mine), [len(p) for p in parts]


def _prepare_data(recipe: Recipe, main_first: bool, group=None):
    spec = DataSpec(path=recipe.data.path, text_field=recipe.data.text_field, tokenizer=recipe.data.tokenizer,
                    vocab_size=recipe.data.vocab_size, seq_len=recipe.data.seq_len,
                    val_fraction=recipe.data.val_fraction, max_documents=recipe.data.max_documents,
                    num_proc=recipe.data.num_proc, seed=recipe.train.seed)
    # The job's first rank tokenises first (with a progress bar); everyone else then reads its
    # cache. A barrier over the job (every rank that trains): replicas of one job may share a cache folder.
    data = prepare_data(spec, recipe.data.cache_dir, show_progress=recipe.train.progress) if main_first else None
    barrier(group)
    return data or prepare_data(spec, recipe.data.cache_dir, show_progress=False)


def train(recipe: Recipe, dist: DistInfo, dims: ParallelDims | None = None, sync: Synchronizer | None = None) -> dict:
    """Train `recipe` on this rank's replica (`dims`, default: one replica over the whole world).

    With `sync` (a strategy of `agents.sync`) the run spans the whole job: the world is split into
    `sync.replicas` replicas, each with its own weights, engine and data share, driven in step; the
    strategy's hooks make them agree, and one checkpoint holds every replica as a component."""
    shared = sync is not None
    dims = dims or make_dims(recipe, dist, sync.replicas if shared else 1)
    ctx = RunContext(recipe, dims, dist.device, shared=shared)
    cfg_dict = recipe_to_dict(recipe)
    is_main = ctx.is_main
    # Collective: the run's first rank picks the checkpoint, the ranks share the sha256 checks.
    resume_from, resume_meta = find_resume(recipe, ctx.checkpoints, ctx.group)
    seq_len = recipe.data.seq_len

    data = _prepare_data(recipe, main_first=dist.rank == 0, group=dims.job_group)
    tok_hash = _tokenizer_hash(data.tokenizer_path)
    if resume_meta is not None and resume_meta.get("tokenizer_sha256") != tok_hash:
        raise UsageError(f"checkpoint {resume_from} was trained with a different tokenizer "
                         f"(vocabulary {resume_meta.get('vocab_size')}) than this run's data "
                         f"({data.vocab_size}); resume with the same data.* settings or start a new run.name")
    if is_main:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.run_dir / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))
        (ctx.run_dir / "tokenizer.json").write_bytes(Path(data.tokenizer_path).read_bytes())
    ctx.barrier()
    train_blocks = TokenBlocks(data.train_tokens, seq_len)
    val_blocks = TokenBlocks(data.val_tokens, seq_len)

    # ---- the replica (model + engine) ----------------------------------------------------------
    job_world = batch_world(recipe, dims)
    precision = resolve_precision(recipe, dist.device.type)
    run_replicas = dims.replicas if shared else 1
    move = layout_change(resume_meta, recipe, job_world, run_replicas) if resume_meta is not None else None
    state = None
    if move is not None:
        # Another layout wrote the checkpoint: start from its consolidated weights (resharded by
        # parallelize like any full model); DeepSpeed's shards cannot be read by this layout.
        move.adam_file = ckpt.component_files(resume_from, resume_meta) / optim_state.FILE
        state = consolidate_once(resume_from, resume_meta, dims)
    replica = build_replica(recipe, dims, dist.device, data.vocab_size, state_dict=state,
                            name=f"replica{dims.replica}" if shared else "model")
    del state
    engine, module, model_config = replica.engine, replica.module, replica.model_config
    if is_main:
        atomic_write_text(ctx.run_dir / "ds_config.json",
                          json.dumps(engine_config(recipe, dims, dist.device), indent=1))
    gas = recipe.grad_accum_steps(job_world)
    sampler, sample_counts = _sampler(recipe, dims, data, train_blocks, shared)
    plain_grads = recipe.parallel.zero_stage == 0 and precision == "fp32" and dims.tp == dims.pp == 1
    # Gradients exchanged across replicas: a non-finite loss anywhere skips the step everywhere.
    veto_group = dims.job_group if shared and sync.exchanges_gradients else dims.replica_group
    teacher = None
    if recipe.distill.teacher:  # knowledge distillation (trainer/distill.py): the step's loss is the KL term
        teacher = distill.load_teacher(recipe.distill.teacher, data.tokenizer_path, dist.device, recipe.model.kernels,
                                       _compute_dtype(precision) if precision == "bf16" else None)
    stepper = Stepper(engine, dims, dist.device, plain_grads=plain_grads, veto_group=veto_group,
                      loss_fn=distill.loss_fn(recipe, teacher, dist.device) if teacher is not None else None)
    if shared:
        sync.attach(stepper, replica, sample_counts)
    start_step = 0
    if resume_from is not None:
        loop_state = restore(replica, recipe, resume_from, resume_meta, move, sampler, is_main, ctx.rank)
        start_step = loop_state["step"]
        if shared:
            sync.load_state_dict(loop_state["sync"])
    tracker = ctx.open_tracker(cfg_dict, start_step if resume_from is not None else None)

    # One device's peak (measured once on CPU, in the run's compute dtype) and where it comes from.
    peak_device, peak_source = peak_flops(dist.device, recipe.train.peak_tflops, _compute_dtype(precision))
    # MFU per device: tokens/s counts every rank of the job's batch, the peak is one device's.
    peak = peak_device * job_world
    mfu_source = {"peak_flops": peak_device, "peak_flops_source": peak_source}
    tokens_per_step = recipe.global_batch(job_world) * seq_len
    if is_main:
        _print_start(ctx, replica, precision, data, resume_from)
        print(f"MFU: {replica.flops_per_token / 1e6:.2f} MFLOP/token against {job_world} x "
              f"{peak_device / 1e12:.3f} TFLOP/s ({peak_source})", flush=True)

    nan_steps = faults.nan_steps()
    signals = ctx.watch_signals()

    def meta(step: int) -> dict:
        return {"step": step, "config": cfg_dict, "tokenizer_sha256": tok_hash, "vocab_size": data.vocab_size,
                "world_size": job_world, "replicas": run_replicas, "replica_samples": sample_counts,
                "tp": dims.tp, "pp": dims.pp,
                "zero_stage": recipe.parallel.zero_stage, "data_cache_key": data.cache_key,
                "model_config": model_config.to_dict()}

    def save(step: int) -> Path:
        loop_state = {"step": step, "sampler": sampler.state_dict(), "rng": ckpt.rng_state()}
        if shared:
            loop_state["sync"] = sync.state_dict()
        # Layout-independent Adam moments (every layout; collective): let a resume change the layout.
        adam = optim_state.gather(engine, module, recipe.parallel.zero_stage, dims)
        extra = {f"{replica.name}/{optim_state.FILE}": adam} if adam is not None else None
        return ctx.save([replica.component], step, loop_state, meta(step), extra,
                        names=[f"replica{r}" for r in range(dims.replicas)] if shared else None)

    def validate(max_batches: int | None) -> tuple[float, int, list[float] | None]:
        if dims.is_pipeline:
            loss, n = evaluate_pipeline(engine, val_blocks, recipe.parallel.micro_batch, max_batches, dims)
        else:
            loss, n = evaluate(module, val_blocks, recipe.parallel.micro_batch, max_batches, dims.dp_rank, dims.dp,
                               dist.device, group=dims.dp_group)
        per_replica = None
        if shared:  # each replica evaluated its own weights: report their mean (and each)
            per_replica = replica_values(loss, dims)
            loss = sum(per_replica) / len(per_replica)
        return loss, n, per_replica

    def val_metrics(loss: float, n: int, per_replica: list[float] | None, suffix: str = "") -> dict:
        row = {f"val_loss{suffix}": loss, f"val_ppl{suffix}": math.exp(min(loss, 50.0)),
               f"val_bpb{suffix}": bits_per_byte(loss, data.val_num_tokens, data.val_bytes), f"val_tokens{suffix}": n}
        if per_replica is not None:
            row[f"val_loss{suffix}_replicas"] = per_replica
        return row

    def run_eval(step: int, full: bool) -> dict:
        """Validation on one fixed sample, the same blocks at every evaluation, the last included
        (`train.eval_batches` batches spread evenly over the split), so the curve compares like
        with like; with `full`, the whole split too, under its own keys (`val_loss_full`, ...)."""
        batches = recipe.train.eval_batches
        sample = validate(batches)
        row = {"step": step, **val_metrics(*sample)}
        if full:
            covered = len(eval_sample(len(val_blocks), recipe.parallel.micro_batch, batches)) == len(val_blocks)
            row.update(val_metrics(*(sample if covered else validate(None)), suffix="_full"))
        tracker.log(row)
        return row

    bar = None
    if is_main and recipe.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=recipe.train.max_steps, initial=start_step, desc="train", unit="step",
                   dynamic_ncols=True)

    def periodic_eval(at: int) -> None:
        row = run_eval(at, full=False)
        if bar is not None:
            bar.write(f"step {at}: val_loss {row['val_loss']:.4f}  val_bpb {row['val_bpb']:.3f}")
        if is_main:
            tracker.plot()

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
            batch = [train_blocks.get(sampler.next_indices()) for _ in range(gas)]
            with replica.component.rng.active():
                result = stepper.run(batch, poison=step + 1 in nan_steps, want_grad_norm=logged)
            step_loss, finite = result.loss, result.finite
            if shared and finite:
                step_loss = torch.tensor(replica_mean(float(step_loss), dims), dtype=torch.float64)
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
                             "tokens_per_s": tps, "mfu": replica.flops_per_token * tps / peak if peak else None,
                             **mfu_source,
                             "skipped_steps": skipped_total, "step_time_s": dt,
                             **(sync.log_row(step) if shared else {}), **_memory_stats(dist.device)})
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
            # Every rank of the replica stops at the same step, naming the same signal.
            stop_signal = ctx.end_of_step(step, periodic_eval, save, signals)
            if stop_signal:
                stop_reason = stop_signal
                break
    finally:
        if bar is not None:
            bar.close()

    if stop_reason is not None:
        ctx.stop(step, stop_reason, save, sync.close if shared else None)

    # ---- end of run: checkpoint, full evaluation, sample, summary --------------------------------
    folder = save(step)
    if shared:
        sync.close()
    if ema_tps:
        peak_device, peak_source = end_of_run_peak(dist.device, recipe.train.peak_tflops, _compute_dtype(precision),
                                                   (peak_device, peak_source))
        peak, mfu_source = peak_device * job_world, {"peak_flops": peak_device, "peak_flops_source": peak_source}
    final = run_eval(step, full=True)
    sample = _end_sample(recipe, replica, data, dist.device) if dims.replica == 0 else ""
    summary = {
        "run_dir": str(ctx.run_dir), "steps": step, "params": replica.n_params,
        # the curve's last point (the fixed evaluation sample), then the whole validation split
        "final_train_loss": last_loss, "final_val_loss": final["val_loss"], "val_bpb": final["val_bpb"],
        "val_tokens": final["val_tokens"], "val_loss_full": final["val_loss_full"],
        "val_bpb_full": final["val_bpb_full"], "val_tokens_full": final["val_tokens_full"],
        "gzip_bpb": gzip_bits_per_byte(data.val_text()), "ln_vocab": math.log(data.vocab_size),
        # None when no step ran (a resume at train.max_steps only evaluates and samples)
        "tokens_per_s": ema_tps, "mfu": replica.flops_per_token * ema_tps / peak if peak and ema_tps else None,
        **mfu_source,
        "skipped_steps": skipped_total, "checkpoint": str(folder), "sample": sample,
    }
    if teacher is not None:
        summary.update(distill.compare(teacher, module, summary, val_blocks, recipe, dims, dist.device))
    if is_main:
        tracker.log_sample(step, recipe.train.sample_prompt, sample)
        tracker.finish()
        atomic_write_text(ctx.run_dir / "summary.json", json.dumps(summary, indent=1))
        _print_summary(summary)
    return summary


def replica_values(value: float, dims: ParallelDims) -> list[float]:
    """Collective over the cross-replica group: `value` of every replica, in replica order (each
    replica's ranks already agree on theirs)."""
    if dims.replicas == 1:
        return [value]
    t = torch.zeros(dims.replicas, dtype=torch.float64)
    t[dims.replica] = value
    torch.distributed.all_reduce(t, group=dims.cross_replica_group)
    return t.tolist()


def replica_mean(value: float, dims: ParallelDims) -> float:
    """The mean of `value` over the replicas (collective, see `replica_values`)."""
    values = replica_values(value, dims)
    return sum(values) / len(values)


def _end_sample(recipe: Recipe, replica, data, device) -> str:
    """Collective over the replica: the end-of-run sample text (on every rank that generates)."""
    dims, module = replica.dims, replica.module
    sample_module = module
    if dims.is_pipeline or (dims.tp > 1 and recipe.parallel.sequence_parallel):
        # Decoding one token at a time cannot be split over pipeline stages or sequence chunks:
        # generation runs on one rank with the gathered full model. Tensor parallelism without
        # SP generates in place on every rank (same generator seed, gathered logits: same tokens).
        from model import GPT

        full_sd = gather_full_state_dict(module, dims)
        sample_module = None
        if dims.is_replica_main:
            sample_module = GPT(replica.model_config, init=False).to(device)
            sample_module.load_state_dict(full_sd)
        del full_sd
    if sample_module is None:
        return ""
    # Generation (a growing key/value cache, one new shape per token) stays eager.
    with torch.compiler.set_stance("force_eager") if recipe.train.compile else contextlib.nullcontext():
        return sample_text(sample_module, data.tokenizer, recipe.train.sample_prompt, recipe.train.sample_tokens,
                           device, recipe.train.seed, data.eos_id)


def _print_start(ctx: RunContext, replica, precision: str, data, resume_from) -> None:
    recipe, dims = ctx.recipe, ctx.dims
    print(f"run: {ctx.run_dir}  params: {replica.n_params / 1e6:.2f}M  world: {dims.replica_size} "
          f"({dims.describe()} zero={recipe.parallel.zero_stage})  "
          f"precision: {precision}  kernels: {replica.module.ops.mode}  "
          f"train tokens: {len(data.train_tokens):,}  val tokens: {len(data.val_tokens):,}"
          + (f"  resumed from {resume_from.name}" if resume_from else ""), flush=True)
    if recipe.train.compile:
        print("compile: the model's forward runs under torch.compile (the first steps, and the first "
              "evaluation, are slower while it compiles)", flush=True)
        if dims.tp > 1 and recipe.model.dropout > 0:
            print("compile: with tensor parallelism and dropout > 0 the graph breaks at every attention layer "
                  "(and sequence-parallel dropout): the per-rank dropout RNG cannot be traced", flush=True)


def _compute_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


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
    ratio = s["val_loss_full"] / s["ln_vocab"]
    print(
        f"\nrun directory:   {s['run_dir']}\n"
        f"final loss:      train {s['final_train_loss']:.4f}   val {s['final_val_loss']:.4f} on the evaluation "
        f"sample of the curve ({s['val_tokens']:,} tokens)\n"
        f"full val split:  loss {s['val_loss_full']:.4f} over {s['val_tokens_full']:,} tokens "
        f"({ratio:.0%} of ln(vocab) = {s['ln_vocab']:.3f})\n"
        f"bits per byte:   model {s['val_bpb_full']:.3f} on the full split   gzip -9 {s['gzip_bpb']:.3f} on the same text\n"
        + (f"throughput:      {s['tokens_per_s']:,.0f} tokens/s   MFU {s['mfu'] or 0:.1%} of "
           f"{s['peak_flops'] / 1e12:.3f} TFLOP/s per device ({s['peak_flops_source']})\n"
           if s["tokens_per_s"] else "throughput:      no training step in this run\n")
        + ("warning:         MFU above 100%: the measured ceiling is below the rate this run reached (the "
           "machine was busier while it was measured); set train.peak_tflops for a fixed ceiling\n"
           if (s["mfu"] or 0) > 1 else "")
        + f"sample:\n{s['sample']}\n",
        flush=True,
    )
