"""`make bench-parallel`: per-rank memory of ZeRO 0/1/2/3 on 2 and 4 processes against the ZeRO paper.

For every layout (ZeRO stage x process count) this starts the processes with
`python -m torch.distributed.run` (environment from `launch.multiproc.launcher_env`: gloo, DeepSpeed's
CPU accelerator, LOCAL_SIZE), builds the engine through the project's own path
(`load_recipe` -> `build_model` -> `param_groups` -> `deepspeed_config` -> `deepspeed.initialize`), trains
a few steps on random tokens with the same global batch for every layout, and walks what DeepSpeed
actually holds on each rank. The numbers are set beside the ZeRO paper's formulas for Adam
(Rajbhandari et al. 2020, sec. 5), with Psi = the number of model parameters and N = data-parallel ranks:

    bf16 mixed precision (bf16 params + bf16 grads + fp32 master/m/v = 2 + 2 + 12 bytes/param):
        ZeRO-0: 2Psi + 2Psi + 12Psi     ZeRO-1: 2Psi + 2Psi + 12Psi/N
        ZeRO-2: 2Psi + 2Psi/N + 12Psi/N ZeRO-3: (2Psi + 2Psi + 12Psi)/N
    fp32 (`--precision fp32`; fp32 params and grads, Adam m and v, no separate master copy = 4 + 4 + 8):
        ZeRO-0: 4Psi + 4Psi + 8Psi      ZeRO-1: 4Psi + 4Psi + 8Psi/N
        ZeRO-2: 4Psi + 4Psi/N + 8Psi/N  ZeRO-3: (4Psi + 4Psi + 8Psi)/N

How memory is measured (per rank; every tensor storage counted once, keyed by
`untyped_storage().data_ptr()`, at its full storage size, so alignment padding counts):
  snapshots are taken during the second training step (the optimizer state exists from the first) at
    a  end of backward: inside the last parameter's post-accumulate-grad hook, registered before
       `deepspeed.initialize` so it runs before DeepSpeed's own hook for that parameter (all gradients
       are computed; ZeRO-0/1 still hold every full gradient, ZeRO-2/3 have reduced all but this one),
    b  after `engine.backward()` returns (DeepSpeed's reduction and partitioning are done),
    c  on entry to the base (torch) optimizer's step() (DeepSpeed's fp32 gradient copies exist),
    d  after `engine.step()` returns (steady state).
  In each snapshot a storage gets the first category that claims it, in this order:
    comm buffers  the ZeRO IPG bucket buffers (`optimizer.ipg_buckets[dtype].buffer`)
    params        storages behind the model's parameters: `p` itself, for ZeRO-3 `p.ds_tensor`
                  (the partition; the module's `p.data` is an empty placeholder)
    optimizer     the base optimizer's parameters (DeepSpeed's fp32 master copy / partition:
                  `fp32_groups`, `single_partition_of_fp32_groups`, `fp32_partitioned_groups_flat`) and
                  its state tensors (exp_avg, exp_avg_sq, step)
    grads         ZeRO-0/1: `p.grad` / `p.grad_accum` of the model parameters; every stage: the
                  partitioned gradient buffers `averaged_gradients`, `grads_in_partition`,
                  `all_grad_tensors` (stage 1/2) and `grad_partitions_flat_buffer` (stage 3)
    fp32 step grad  `.grad` of the base optimizer's parameters (the fp32 copy DeepSpeed makes for step())
    in-flight grads ZeRO-2/3: a model parameter's `p.grad` that is not yet reduced into the partition
    gathered params ZeRO-3: a module parameter's full `p.data` still gathered
    other         any other tensor reachable from the engine object (walked generically)
    untracked     tensors alive in the process (gc) that none of the above reaches (activations,
                  the batch, temporaries referenced from frames)
  The reported params / grads / optimizer value is the largest over the four snapshots; "live tensors"
  is the largest total over the snapshots of everything alive. RSS (current after the step, and the
  process peak `ru_maxrss`, which includes model construction) is the sanity line.
Throughput: global-batch tokens / the median time of the timed steps (each between two barriers, after
one warm-up and one measured step), relative to ZeRO-0 on the same number of processes; the global
batch is the same for every layout.

    python bench/bench_parallel.py [--procs 2 4] [--stages 0 1 2 3] [--steps 3] [--precision bf16]
                                   [--quick] [--out bench/results/parallel-cpu.md] [key=value overrides...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from record_losses import cpu_name  # noqa: E402  (bench/ is this script's first path entry)

# A GPT-2-style model of ~70M parameters; a 16k-row vocabulary keeps the (tied) embedding from
# dominating. The global batch is the same for every layout (micro-batch = global / N).
MODEL_OVERRIDES = ["model.n_layer=8", "model.d_model=768", "model.n_head=12", "model.vocab_size=16384",
                   "model.max_seq_len=256", "data.seq_len=128"]
QUICK_OVERRIDES = ["model.n_layer=2", "model.d_model=128", "model.n_head=4", "model.vocab_size=4096",
                   "model.max_seq_len=128", "data.seq_len=64"]
GLOBAL_BATCH = 8
MIB = 2**20

CATEGORIES = ("comm", "params", "optimizer", "grads", "step_grad", "inflight", "gathered", "other",
              "untracked")


# ---------------------------------------------------------------------------------------------------
# Formulas.


def formulas(stage: int, n: int, psi: int, precision: str) -> dict:
    """Bytes per rank of (params, grads, optimizer state) from the ZeRO paper's accounting."""
    if precision == "bf16":
        p, g, o = 2 * psi, 2 * psi, 12 * psi
    else:
        p, g, o = 4 * psi, 4 * psi, 8 * psi
    if stage >= 1:
        o /= n
    if stage >= 2:
        g /= n
    if stage >= 3:
        p /= n
    return {"params": p, "grads": g, "optimizer": o, "total": p + g + o}


def formula_text(stage: int, precision: str) -> str:
    pb, gb, ob = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    parts = [f"{pb}Ψ" + ("/N" if stage >= 3 else ""), f"{gb}Ψ" + ("/N" if stage >= 2 else ""),
             f"{ob}Ψ" + ("/N" if stage >= 1 else "")]
    return " + ".join(parts)


# ---------------------------------------------------------------------------------------------------
# Walking what a rank holds.


def _tensors(obj):
    """Tensors inside nested lists / tuples / dicts (and DeepSpeed's GradPartitionBufferGroup)."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    flat = getattr(obj, "flat_partition", None)
    if isinstance(flat, torch.Tensor):
        yield flat
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors(v)


def _grad_of(t: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return t.grad if t.is_leaf else None


def _storage_key(t: torch.Tensor):
    if t.device.type == "meta":
        return None, 0
    s = t.untyped_storage()
    n = s.nbytes()
    if n == 0 or s.data_ptr() == 0:
        return None, 0
    return (t.device.type, s.data_ptr()), n


class Snapshot:
    """Unique storages claimed by category (first claim wins)."""

    def __init__(self):
        self.owner: dict = {}  # storage key -> category
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self.paths: dict = {c: {} for c in CATEGORIES}  # category -> {where it was found: bytes}

    def claim(self, t, category: str, path: str) -> None:
        if not isinstance(t, torch.Tensor):
            return
        key, n = _storage_key(t)
        if key is None or key in self.owner:
            return
        self.owner[key] = category
        self.bytes[category] += n
        self.paths[category][path] = self.paths[category].get(path, 0) + n


_SKIP_TYPES = (str, bytes, int, float, bool, complex, type, torch.dtype, torch.device, type(None))


def _walk_other(root, snap: Snapshot, max_objects: int = 400_000) -> None:
    """Every tensor reachable from `root` through attributes, containers, `.grad` and tensor attributes
    (DeepSpeed hangs `ds_tensor` and friends on parameters) that no category claimed yet."""
    import types

    skip = _SKIP_TYPES + (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen = set()
    stack = [(root, "engine")]
    while stack and len(seen) < max_objects:
        obj, path = stack.pop()
        if isinstance(obj, skip) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            snap.claim(obj, "other", path)
            g = _grad_of(obj)
            if g is not None:
                stack.append((g, path + ".grad"))
            d = getattr(obj, "__dict__", None) or {}
            for k, v in d.items():
                stack.append((v, f"{path}.{k}"))
            continue
        if isinstance(obj, dict):
            for k, v in obj.items():
                stack.append((v, f"{path}[{k if isinstance(k, (str, int)) else type(k).__name__}]"))
            continue
        if isinstance(obj, (list, tuple, set, frozenset)):
            for i, v in enumerate(obj):
                stack.append((v, f"{path}[{i}]"))
            continue
        try:
            d = vars(obj)
        except TypeError:
            continue
        for k, v in d.items():
            stack.append((v, f"{path}.{k}"))


def _gc_tensors() -> list:
    out = []
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor):
                out.append(o)
        except ReferenceError:
            pass
    return out


class Probe:
    """Classifies what the rank holds; see the module docstring for the categories."""

    MASTER_ATTRS = ("fp32_groups", "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
    GRAD_ATTRS = ("averaged_gradients", "grads_in_partition", "all_grad_tensors", "grad_partitions_flat_buffer",
                  "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")

    def __init__(self, stage: int):
        self.stage = stage
        self.engine = None
        self.base = None
        self.params: list = []
        self.snapshots: dict = {}
        self.seconds = 0.0

    def take(self, name: str) -> None:
        t0 = time.perf_counter()
        eng, base, stage = self.engine, self.base, self.stage
        zopt = eng.optimizer
        snap = Snapshot()
        # comm buffers
        for bucket in (getattr(zopt, "ipg_buckets", None) or {}).values():
            for t in _tensors(getattr(bucket, "buffer", None)):
                snap.claim(t, "comm", "optimizer.ipg_buckets[].buffer")
        # params
        for p in self.params:
            ds = getattr(p, "ds_tensor", None)
            if ds is not None:
                snap.claim(ds, "params", "p.ds_tensor")
            else:
                snap.claim(p, "params", "model parameters")
        # optimizer: the master copy (DeepSpeed hands the base optimizer one group / sub-group at a
        # time inside step(), so its param_groups alone miss some) and the optimizer state
        masters = []
        for attr in self.MASTER_ATTRS:
            for t in _tensors(getattr(zopt, attr, None)):
                masters.append((t, f"optimizer.{attr}"))
        masters += [(p, "base.param_groups") for group in base.param_groups for p in group["params"]]
        for t, where in masters:
            snap.claim(t, "optimizer", where)
        for state in base.state.values():
            for k, v in state.items():
                for t in _tensors(v):
                    snap.claim(t, "optimizer", f"base.state[{k}]")
        # grads
        if stage <= 1:
            for p in self.params:
                snap.claim(_grad_of(p), "grads", "p.grad")
                snap.claim(getattr(p, "grad_accum", None), "grads", "p.grad_accum")
        for attr in self.GRAD_ATTRS:
            for t in _tensors(getattr(zopt, attr, None)):
                snap.claim(t, "grads", f"optimizer.{attr.split('__')[-1]}")
        # DeepSpeed's fp32 gradient copy for the base optimizer's step()
        for t, where in masters:
            snap.claim(_grad_of(t), "step_grad", f"{where}.grad")
        if stage >= 2:
            for p in self.params:
                snap.claim(_grad_of(p), "inflight", "p.grad")
                snap.claim(getattr(p, "grad_accum", None), "inflight", "p.grad_accum")
        if stage == 3:
            for p in self.params:
                if p.numel() > 0:
                    snap.claim(p.data, "gathered", "p.data")
        _walk_other(eng, snap)
        for t in _gc_tensors():
            snap.claim(t, "untracked", "gc")
        self.snapshots[name] = {"bytes": dict(snap.bytes), "paths": snap.paths}
        self.seconds += time.perf_counter() - t0


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------------
# One layout, inside each rank.


def worker(args) -> None:
    import deepspeed

    from trainer.distributed import init_distributed
    from trainer.ds_config import deepspeed_config, lr_lambda, resolve_precision
    from trainer.model_setup import build_model, param_groups
    from trainer.recipe import load_recipe
    from trainer.step import StepSkipper

    world = int(os.environ["WORLD_SIZE"])
    overrides = [f"parallel.zero_stage={args.stage}", f"train.precision={args.precision}",
                 f"parallel.micro_batch={args.global_batch // world}", f"parallel.global_batch={args.global_batch}",
                 f"launch.procs_per_node={world}", "model.kernels=torch", *args.overrides]
    recipe = load_recipe(args.recipe, overrides)
    dist = init_distributed(recipe.launch.backend, recipe.launch.timeout_s)
    vocab = recipe.model.vocab_size or recipe.data.vocab_size
    probe = Probe(args.stage)
    state = {"armed": False, "count": 0}

    def make_model():
        torch.manual_seed(recipe.train.seed)
        model = build_model(recipe, vocab).to(dist.device)
        params = [p for p in model.parameters() if p.requires_grad]
        n_params = len(params)  # not `params` itself: the hooks live in C++, a cycle through them would leak

        # Snapshot a: the last gradient of the backward pass has just been accumulated. Registered
        # before deepspeed.initialize, so this runs before DeepSpeed's hook on the same parameter.
        def hook(_p):
            if state["armed"]:
                state["count"] += 1
                if state["count"] == n_params:
                    probe.take("a_end_of_backward")

        state["handles"] = [p.register_post_accumulate_grad_hook(hook) for p in params]
        return model, params

    model, params = make_model()
    psi = sum(p.numel() for p in params)
    cfg = deepspeed_config(recipe, dist.world_size, dist.device.type)
    generated = json.loads(json.dumps(cfg))  # DeepSpeed adds keys to the dict it is given
    notes = []
    schedule = lr_lambda(recipe)

    def initialize(model, cfg):
        return deepspeed.initialize(
            model=model, model_parameters=param_groups(model, recipe.optim.weight_decay), config=cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))[0]

    engine = None
    try:
        engine = initialize(model, cfg)
    except NotImplementedError as e:
        # DeepSpeed 0.19 rejects bf16 params with fp32 gradient accumulation outside ZeRO (the
        # `data_types` our generator adds for ZeRO-0 + bf16). Retry with bf16 accumulation.
        if "data_types" not in cfg:
            raise
        notes.append(f"deepspeed.initialize rejected the generated config ({type(e).__name__}: {e}); "
                     "measured without its data_types.grad_accum_dtype=fp32 (bf16 accumulation)")
    if engine is None:
        # Outside the except block, so the traceback (which holds the first model) is gone.
        cfg = {k: v for k, v in cfg.items() if k != "data_types"}
        for h in state.pop("handles"):
            h.remove()
        del model, params
        gc.collect()
        model, params = make_model()
        engine = initialize(model, cfg)
    probe.engine, probe.params = engine, params
    skipper = StepSkipper(engine)
    probe.base = skipper.base
    original_step = skipper.base.step

    def step_with_probe(*a, **kw):
        if state["armed"]:
            state["calls"] = state.get("calls", 0) + 1
            probe.take(f"c_optimizer_step{state['calls']}")
        return original_step(*a, **kw)

    skipper.base.step = step_with_probe

    mb, seq = recipe.parallel.micro_batch, recipe.data.seq_len
    gen = torch.Generator().manual_seed(1000 + dist.rank)
    engine.train()

    def train_step():
        for _ in range(engine.gradient_accumulation_steps()):
            b = torch.randint(0, vocab, (mb, seq + 1), generator=gen).to(dist.device)
            loss = engine(b[:, :-1], targets=b[:, 1:])
            engine.backward(loss)
            if state["armed"]:
                probe.take("b_after_backward")
            engine.step()
        return float(loss.detach().float())

    train_step()  # warm-up: creates the optimizer state
    state["armed"] = True
    train_step()
    state["armed"] = False
    probe.take("d_after_step")
    times, losses = [], []
    for _ in range(args.steps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        losses.append(train_step())
        torch.distributed.barrier()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    result = {
        "rank": dist.rank, "world": dist.world_size, "stage": args.stage, "psi": psi,
        "precision": resolve_precision(recipe, dist.device.type),
        "param_dtype": str(next(iter(engine.module.parameters())).dtype).replace("torch.", ""),
        "wrapper": type(engine.optimizer).__name__, "base": type(probe.base).__name__,
        "snapshots": probe.snapshots, "probe_s": probe.seconds,
        "rss_now": _rss_now(),
        "rss_peak": max(_rss_now(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "tokens_per_s": recipe.global_batch(dist.world_size) * seq / step_s,
        "step_s": step_s, "step_times": times, "loss": losses[-1], "notes": notes, "ds_config": generated,
        "threads": torch.get_num_threads(),
    }
    zopt = engine.optimizer
    if hasattr(zopt, "params_in_partition") and hasattr(zopt, "partition_size"):
        # ZeRO-1/2 copy a rank's reduced gradients into `grads_in_partition`, sized for every parameter
        # that overlaps the rank's partition, whole.
        names = {id(p): n for n, p in engine.module.named_parameters()}
        inside = [p for group in zopt.params_in_partition for p in group]
        big = max(inside, key=lambda p: p.numel())
        result["partition"] = {"partition_numel": int(sum(zopt.partition_size)),
                               "params_in_partition_numel": sum(p.numel() for p in inside),
                               "largest": [names.get(id(big), "?"), big.numel()]}
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, result)
    if dist.rank == 0:
        Path(args.json).write_text(json.dumps(gathered))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# The driver: one launch per layout, then the report.


def run_layout(stage: int, n: int, args, workdir: Path) -> dict:
    from launch.multiproc import free_port, launcher_env

    out = workdir / f"z{stage}-n{n}.json"
    log = workdir / f"z{stage}-n{n}.log"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(Path(__file__).resolve()),
           "--worker", "--stage", str(stage), "--precision", args.precision, "--steps", str(args.steps),
           "--global-batch", str(args.global_batch), "--recipe", args.recipe, "--json", str(out), *args.overrides]
    env = launcher_env(n)
    env.setdefault("PYTHONWARNINGS", "ignore")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        # Own session, so that a layout that hangs can be stopped with all of its ranks.
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - t0
    # DeepSpeed's CPU backend gives every rank a ~66 MB shared-memory all-reduce workspace named after
    # the rendezvous and never unlinks it; tmpfs keeps it in RAM after the job. Remove ours.
    for rank in range(n):
        Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}").unlink(missing_ok=True)
    if rc != 0 or not out.exists():
        tail = log.read_text().strip().splitlines()[-15:]
        print(f"  ZeRO-{stage} on {n}: FAILED ({rc}) after {wall:.0f}s; log {log}:\n    " + "\n    ".join(tail),
              flush=True)
        return {"stage": stage, "n": n, "failed": f"exit {rc}", "wall": wall}
    ranks = json.loads(out.read_text())
    print(f"  ZeRO-{stage} on {n} processes: {wall:.0f}s ({ranks[0]['tokens_per_s']:,.0f} tokens/s, "
          f"optimizer {ranks[0]['wrapper']})", flush=True)
    return {"stage": stage, "n": n, "ranks": ranks, "wall": wall}


def summarize(layout: dict, precision: str) -> dict:
    """Per component the largest value over snapshots, then the largest over ranks."""
    rows = []
    for r in layout["ranks"]:
        snaps = r["snapshots"].values()
        comp = {c: max(s["bytes"][c] for s in snaps) for c in CATEGORIES}
        comp["live"] = max(sum(s["bytes"].values()) for s in snaps)
        comp["rss_now"], comp["rss_peak"] = r["rss_now"], r["rss_peak"]
        rows.append(comp)
    keys = rows[0].keys()
    out = {k: max(row[k] for row in rows) for k in keys}
    out["spread"] = {k: (min(row[k] for row in rows), max(row[k] for row in rows)) for k in keys}
    r0 = layout["ranks"][0]
    out["formula"] = formulas(layout["stage"], layout["n"], r0["psi"], precision)
    out["measured_total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def _mib(b: float) -> str:
    return f"{b / MIB:,.1f}"


def _cell(meas: float, form: float) -> str:
    return f"{_mib(meas)} / {_mib(form)} ({meas / form:.2f})"


def peak_sources(layout: dict, category: str) -> str:
    """Where `category` came from in the snapshot (and rank) where it was largest."""
    best = None
    for r in layout["ranks"]:
        for name, snap in r["snapshots"].items():
            b = snap["bytes"][category]
            if best is None or b > best[0]:
                best = (b, name, snap["paths"][category])
    b, name, paths = best
    parts = ", ".join(f"`{p}` {_mib(v)}" for p, v in sorted(paths.items(), key=lambda kv: -kv[1]))
    return f"{_mib(b)} MiB at snapshot {name.split('_')[0].rstrip('0123456789')} ({parts or 'nothing'})"


def _top_paths(layout: dict, category: str, k: int = 3) -> str:
    agg: dict = {}
    for r in layout["ranks"]:
        for s in r["snapshots"].values():
            for path, b in s["paths"].get(category, {}).items():
                agg[path] = max(agg.get(path, 0), b)
    top = sorted(agg.items(), key=lambda kv: -kv[1])[:k]
    return ", ".join(f"`{p}` {_mib(b)}" for p, b in top)


def report(layouts: list, args, total_wall: float) -> str:
    ok = [lay for lay in layouts if "ranks" in lay]
    if not ok:
        return "# ZeRO memory per rank\n\nevery layout failed; see the logs printed above.\n"
    r0 = ok[0]["ranks"][0]
    psi, precision = r0["psi"], args.precision
    sums = {(lay["stage"], lay["n"]): summarize(lay, precision) for lay in ok}
    ds_version = _version("deepspeed")
    cfg = r0["ds_config"]
    zero_keys = {k: v for lay in ok for k, v in lay["ranks"][0]["ds_config"]["zero_optimization"].items()
                 if k != "stage"}
    lines = [
        "# ZeRO memory per rank: DeepSpeed on CPU against the ZeRO paper",
        "",
        f"`make bench-parallel` ({' '.join(sys.argv[1:]) or 'defaults'}), {date.today()}, "
        f"{cpu_name()} x {os.cpu_count()} cores shared with other jobs, "
        f"torch {torch.__version__}, DeepSpeed {ds_version}, gloo, DeepSpeed CPU accelerator; "
        f"{args.steps} timed steps per layout; the whole run took {total_wall / 60:.1f} min; load average "
        f"{args.load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end, so tokens/s are noisy.",
        "",
        f"Model: recipe `{args.recipe}` with `{' '.join(MODEL_OVERRIDES if not args.quick else QUICK_OVERRIDES)}`"
        + (f" `{' '.join(args.user_overrides)}`" if args.user_overrides else "")
        + f", and per layout `parallel.zero_stage`, `train.precision`, `parallel.micro_batch`/`global_batch`, "
        "`launch.procs_per_node` and `model.kernels=torch` (the fused kernels change no model state; the "
        f"references spare every rank a JIT build): **Ψ = {psi:,} parameters** (tied embedding counted once). "
        f"Global batch {cfg['train_batch_size']} sequences x {_seq_len(args)} tokens for every layout "
        f"(micro-batch = {cfg['train_batch_size']}/N, no accumulation).",
        "",
        f"Precision: **{_precision_text(precision, ok)}**. Paper formulas per rank: "
        + "; ".join(f"ZeRO-{s}: {formula_text(s, precision)}" for s in range(4)) + ".",
        "",
        f"DeepSpeed config: generated by `trainer.ds_config.deepspeed_config` (AdamW with torch_adam, "
        f"bf16={cfg['bf16']['enabled']}, zero_optimization {json.dumps(zero_keys)}).",
        "",
    ]
    notes = sorted({n for lay in ok for r in lay["ranks"] for n in r["notes"]})
    for n in notes:
        lines += [f"**Workaround:** {n}.", ""]
    lines += [
        "## Model states per rank (MiB): measured / formula (ratio)",
        "",
        "| layout | N | optimizer wrapper | params | grads | optimizer state (fp32 master + m + v) | "
        "total model states |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for (stage, n), s in sorted(sums.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        f = s["formula"]
        wrapper = next(lay for lay in ok if lay["stage"] == stage and lay["n"] == n)["ranks"][0]["wrapper"]
        lines.append(f"| ZeRO-{stage} | {n} | {wrapper} | {_cell(s['params'], f['params'])} | "
                     f"{_cell(s['grads'], f['grads'])} | {_cell(s['optimizer'], f['optimizer'])} | "
                     f"**{_cell(s['measured_total'], f['total'])}** |")
    lines += [
        "",
        "## Everything else each rank held, peak memory and throughput",
        "",
        "Largest value over the snapshots (MiB, largest rank). *IPG bucket*: ZeRO's reduce bucket "
        "(`reduce_bucket_size` elements, allocated with torch.empty, so untouched pages cost no RSS). "
        "*fp32 step grad*: the fp32 gradient copy DeepSpeed hands the torch optimizer in step(). *in flight*: "
        "ZeRO-2/3 gradients not yet reduced at the end of backward. *live tensors*: every unique tensor "
        "storage alive at the fullest snapshot (includes activations and the batch) / the formula's total.",
        "",
        "| layout | N | IPG bucket | fp32 step grad | in flight | gathered params | other in engine | "
        "untracked (activations, batch) | live tensors / formula | RSS after step / peak | tokens/s | "
        "vs ZeRO-0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (stage, n), s in sorted(sums.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lay = next(lay for lay in ok if lay["stage"] == stage and lay["n"] == n)
        tps = lay["ranks"][0]["tokens_per_s"]
        base = next((b for b in ok if b["stage"] == 0 and b["n"] == n), None)
        rel = f"{tps / base['ranks'][0]['tokens_per_s']:.2f}x" if base else "n/a"
        lines.append(
            f"| ZeRO-{stage} | {n} | {_mib(s['comm'])} | {_mib(s['step_grad'])} | {_mib(s['inflight'])} | "
            f"{_mib(s['gathered'])} | {_mib(s['other'])} | {_mib(s['untracked'])} | "
            f"{_mib(s['live'])} ({s['live'] / s['formula']['total']:.2f}x) | "
            f"{_mib(s['rss_now'])} / {_mib(s['rss_peak'])} | {tps:,.0f} | {rel} |")
    other = [(lay, _top_paths(lay, "other")) for lay in ok if sums[(lay["stage"], lay["n"])]["other"] > 0.1 * MIB]
    if other:
        lines += ["", "Largest 'other' storages reachable from the engine: "
                  + "; ".join(f"ZeRO-{lay['stage']}/N={lay['n']}: {t}" for lay, t in other) + "."]
    gaps = []
    for lay in ok:
        s = sums[(lay["stage"], lay["n"])]
        for comp in ("params", "grads", "optimizer"):
            ratio = s[comp] / s["formula"][comp]
            if abs(ratio - 1) > 0.10:
                why = ""
                part = max((r.get("partition") for r in lay["ranks"] if r.get("partition")),
                           key=lambda d: d["params_in_partition_numel"], default=None)
                if comp == "grads" and part:
                    why = (f"; DeepSpeed sizes `grads_in_partition` for the whole of every parameter that "
                           f"overlaps the rank's partition: {part['params_in_partition_numel']:,} elements "
                           f"for a partition of {part['partition_numel']:,} (largest: `{part['largest'][0]}`, "
                           f"{part['largest'][1]:,})")
                gaps.append(f"- ZeRO-{lay['stage']}, N={lay['n']}, {comp} {ratio:.2f}x the formula: "
                            f"{peak_sources(lay, comp)}{why}")
    lines += ["", "Components more than 10% off the formula, with where the bytes were found"
              + (":" if gaps else ": none."), *gaps]
    failed = [lay for lay in layouts if "ranks" not in lay]
    if failed:
        lines += ["", "Failed layouts: " + ", ".join(f"ZeRO-{lay['stage']} on {lay['n']} ({lay['failed']})"
                                                      for lay in failed) + "."]
    spread = [f"ZeRO-{st}/N={n} {k} {_mib(lo)}-{_mib(hi)}" for (st, n), s in sums.items()
              for k in ("params", "grads", "optimizer") for lo, hi in [s["spread"][k]] if hi - lo > 0.001 * hi]
    lines += ["", "Ranks agree on params/grads/optimizer to 0.1% unless listed here: "
              + ("; ".join(spread) if spread else "all agree") + "."]
    lines += ["", "## Reading the gaps", "", *_findings(ok, sums, precision, psi)]
    lines += ["", "## How it is measured", "", *_how_lines(), ""]
    return "\n".join(lines) + "\n"


def _findings(ok: list, sums: dict, precision: str, psi: int) -> list:
    """What the extra columns come from, with this run's numbers."""
    out = []
    lay_of = {(lay["stage"], lay["n"]): lay for lay in ok}
    z0 = [(k, s) for k, s in sums.items() if k[0] == 0 and s["step_grad"] > 0]
    if z0:
        (_, n), s = z0[0]
        out.append(f"- ZeRO-0 runs DeepSpeed's `{lay_of[(0, n)]['ranks'][0]['wrapper']}`: per-parameter fp32 master "
                   f"copies (the 4Ψ of the 12Ψ), and in step() it upcasts every gradient to fp32 at once: "
                   f"+{_mib(s['step_grad'])} MiB ({s['step_grad'] / psi:.1f} bytes/param) at the step that the "
                   "paper's accounting (a fused mixed-precision Adam) does not have.")
    z12 = sorted((k, s) for k, s in sums.items() if k[0] in (1, 2, 3) and s["step_grad"] > 0)
    if z12:
        parts = ", ".join(f"ZeRO-{k[0]}/N={k[1]} {_mib(s['step_grad'])}" for k, s in z12)
        out.append("- ZeRO-1/2/3 upcast the rank's gradient partition to fp32 for the torch optimizer one "
                   f"parameter group (sub-group) at a time, so the transient is the largest group's partition: {parts} MiB.")
    comm = [(k, s) for k, s in sums.items() if s["comm"] > 0]
    if comm:
        (st, n), s = comm[0]
        bucket = lay_of[(st, n)]["ranks"][0]["ds_config"]["zero_optimization"].get("reduce_bucket_size")
        out.append(f"- The IPG reduce bucket is `reduce_bucket_size` = {bucket:,} elements of the gradient dtype = "
                   f"{_mib(s['comm'])} MiB per rank ({s['comm'] / psi:.2f} bytes/param of this model) whatever the "
                   "model size: ZeRO-1/2 allocate it at the first gradient of each backward and free it after "
                   "the reduction, ZeRO-3 keeps it for the whole run. torch.empty leaves untouched pages out of RSS, "
                   "but on a model this small it is larger than ZeRO-3's whole parameter + gradient partition "
                   "at N=4. The paper does not count buckets.")
    z3 = [(k, s) for k, s in sums.items() if k[0] == 3 and (s["gathered"] or s["inflight"])]
    if z3:
        (_, n), s = z3[0]
        out.append(f"- ZeRO-2/3 at the end of backward still hold the last parameter's full gradient, not yet "
                   f"reduced ({_mib(s['inflight'])} MiB: the tied embedding, which is used first in forward and "
                   f"so gets its gradient last), and ZeRO-3 also holds that parameter gathered "
                   f"({_mib(s['gathered'])} MiB); the working set of ZeRO-3 is bounded below by the largest "
                   "parameter.")
    if not out:
        out.append("- nothing beyond the model states was held.")
    return out



def _how_lines() -> list:
    doc = __doc__.split("How memory is measured")[1].split("    python bench")[0]
    return ["How memory is measured" + doc.rstrip()]


def _precision_text(precision: str, ok: list) -> str:
    dtypes = sorted({r["param_dtype"] for lay in ok for r in lay["ranks"]})
    if precision == "bf16":
        return (f"bf16 mixed precision via DeepSpeed `bf16: {{enabled: true}}` (model parameters held as "
                f"{', '.join(dtypes)}; fp32 master weights and Adam moments)")
    return f"fp32 (model parameters {', '.join(dtypes)}; no separate master copy in the formula)"


def _seq_len(args) -> int:
    from trainer.recipe import load_recipe

    return load_recipe(args.recipe, args.overrides).data.seq_len


def _version(pkg: str) -> str:
    from importlib.metadata import version

    try:
        return version(pkg)
    except Exception:  # pragma: no cover
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4], help="process counts")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO stages")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per layout (after 2 untimed)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--global-batch", type=int, default=GLOBAL_BATCH)
    ap.add_argument("--recipe", default="gpt-tiny")
    ap.add_argument("--quick", action="store_true", help="a ~1M-parameter model to check the benchmark itself")
    ap.add_argument("--out", default=str(ROOT / "bench/results/parallel-cpu.md"), help="'' to write nothing")
    ap.add_argument("--save-json", default="", help="also write every rank's raw snapshots here")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per layout")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value (after the model preset)")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    args.user_overrides = list(args.overrides)
    args.overrides = (QUICK_OVERRIDES if args.quick else MODEL_OVERRIDES) + args.user_overrides
    for n in args.procs:
        if args.global_batch % n:
            ap.error(f"--global-batch {args.global_batch} must be divisible by every --procs value")
    t0 = time.perf_counter()
    args.load_start = os.getloadavg()[0]
    layouts = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    print(f"ZeRO stages {args.stages} on {args.procs} processes, {args.precision} (logs in {tmp}):", flush=True)
    for n in args.procs:
        for stage in args.stages:
            layouts.append(run_layout(stage, n, args, tmp))
    text = report(layouts, args, time.perf_counter() - t0)
    if all("ranks" in lay for lay in layouts):
        shutil.rmtree(tmp, ignore_errors=True)
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(layouts, indent=1))
    print()
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
