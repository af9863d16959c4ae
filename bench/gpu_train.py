"""The GPU check's full training run of a recipe's model (`gpt-tiny`): final validation loss,
tokens/s and MFU (with the peak's source), written as a marked section of the check's results file.

`python -m launch train` (DeepSpeed engine) needs DeepSpeed, pydantic, PyYAML and tokenizers; a lent
GPU machine may have only torch.  So the run is one of two, chosen by `gpu-check` and named in the
results file:

  * our loop, when those modules import: `python -m launch train RECIPE` on 1 GPU with
    train.precision=bf16, or with 2+ GPUs a 2-rank NCCL run (launch.backend=nccl,
    launch.procs_per_node=2); the figures are read from the run's summary.json;
  * otherwise one line saying our loop cannot run there and why (the missing modules), then this
    file's plain-PyTorch loop (`train`, below) on the same model and tokens, in bf16 autocast; on
    2+ GPUs as 2 ranks of torch DDP over NCCL (`torchrun --nproc_per_node 2`).

The plain loop needs only torch and this repo's `model` package.  Its inputs are made here, in the
project's environment, by `prepare`: the recipe's token streams exactly as `python -m launch train`
tokenises them (trainer.data, the same cache) and a plan.json with the model config, optimiser,
schedule, batch, evaluation sample and seed.  Carry that folder to the GPU machine with the wheels:

    .venv/bin/python bench/gpu_train.py prepare build/gpu-data                  # here
    python bench/gpu_train.py gpu-check --plan build/gpu-data --out DIR --results DIR/x.md --device cuda

What the plain loop shares with our loop (ZeRO-0, one replica; tests/test_gpu_train.py compares
its per-step and validation losses with a real `launch train` run on CPU in fp32):
  - init: torch.manual_seed(train.seed), then model.GPT on the CPU, then moved to the device;
  - data order: trainer.data.ShardedSampler's (a randperm seeded with seed + epoch per epoch, each
    global batch cut into consecutive per-rank chunks), gradient accumulation over micro-batches;
  - AdamW over the same parameter groups (decay on matrices, not on biases, norms, embeddings),
    warm-up then cosine to optim.min_lr_ratio (trainer.ds_config.lr_lambda), optim.grad_clip;
  - evaluation: the fixed sample (train.eval_batches micro-batches spread evenly over the split) at
    every train.eval_every steps and at the end, plus the full split at the end; bits per byte;
  - tokens/s as the loop's summary: an exponential average (0.9) of global tokens per step over
    each step's wall time; MFU per device = FLOP/token x tokens/s / (ranks x one device's peak),
    the peak from model.flops.peak_flops (a GPU's datasheet, or a measured CPU matmul ceiling).
What differs: bf16 is autocast (fp32 weights and AdamW state, bf16 matmuls) where DeepSpeed's bf16
mode keeps bf16 weights and an fp32 master copy; several ranks are torch DDP, not the DeepSpeed
engine; no checkpoints, samples or W&B.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTION_BEGIN = "<!-- gpu_train:begin -->"
SECTION_END = "<!-- gpu_train:end -->"
PLAN_FORMAT = 1

# What `python -m launch train` imports beyond torch (trainer/, launch/, DeepSpeed's engine).
LOOP_MODULES = ("deepspeed", "pydantic", "yaml", "tokenizers", "numpy", "matplotlib", "tqdm")


# ------------------------------------------------------------------------------------ prepare (here)


def prepare(out: Path, recipe_name: str = "gpt-tiny", overrides: list[str] | None = None) -> dict:
    """Tokenise the recipe's data as the training loop does and write train.bin, val.bin and
    plan.json to `out`. Needs the project's environment (trainer: tokenizers, pydantic, PyYAML)."""
    import numpy as np

    from trainer.evaluation import gzip_bits_per_byte
    from trainer.loop import _prepare_data
    from trainer.model_setup import build_model
    from trainer.recipe import load_recipe

    overrides = list(overrides or [])
    recipe = load_recipe(recipe_name, overrides)
    data = _prepare_data(recipe, main_first=True)
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe, data.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(data.train_tokens.dtype)
    for name, tokens in (("train.bin", data.train_tokens), ("val.bin", data.val_tokens)):
        np.asarray(tokens).astype(dtype.newbyteorder("<")).tofile(out / name)
    o, t, p = recipe.optim, recipe.train, recipe.parallel
    plan = {
        "format": PLAN_FORMAT, "recipe": recipe_name, "overrides": overrides,
        "model": {k: v for k, v in model.config.to_dict().items() if k != "extra"},
        "params": model.num_params(),
        "data": {"seq_len": recipe.data.seq_len, "vocab_size": data.vocab_size, "eos_id": data.eos_id,
                 "dtype": dtype.name, "train_tokens": int(len(data.train_tokens)),
                 "val_tokens": int(len(data.val_tokens)), "val_bytes": data.val_bytes,
                 "gzip_bpb": gzip_bits_per_byte(data.val_text()), "cache_key": data.cache_key,
                 "source": data.manifest.get("source", {})},
        "optim": {k: getattr(o, k) for k in ("lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay",
                                             "beta1", "beta2", "eps", "grad_clip")},
        "train": {k: getattr(t, k) for k in ("max_steps", "eval_every", "eval_batches", "seed", "peak_tflops")},
        "parallel": {"micro_batch": p.micro_batch, "global_batch": p.global_batch},
    }
    (out / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    return plan


# ---------------------------------------------------------------- the loop's pieces, torch only


class Sampler:
    """trainer.data.ShardedSampler (indices=None), torch only: each epoch a randperm of
    `num_examples` from a generator seeded with seed + epoch, cut into global batches of
    batch_size x dp_world (remainder dropped); rank r takes the r-th chunk of each."""

    def __init__(self, num_examples: int, batch_size: int, dp_rank: int, dp_world: int, seed: int):
        self.n, self.bs, self.rank, self.world, self.seed = num_examples, batch_size, dp_rank, dp_world, seed
        self.global_batch = batch_size * dp_world
        if num_examples < self.global_batch:
            raise ValueError(f"{num_examples} examples cannot fill one global batch of {self.global_batch}")
        self.epoch = self.position = 0
        self._perm, self._perm_epoch = None, -1

    def next_indices(self) -> list[int]:
        if self.position + self.global_batch > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        if self._perm_epoch != self.epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            self._perm_epoch = self.epoch
        start = self.position + self.rank * self.bs
        self.position += self.global_batch
        return self._perm[start:start + self.bs].tolist()


def eval_sample(num_blocks: int, batch_size: int, max_batches: int | None) -> list[int]:
    """trainer.data.eval_sample: every block, or max_batches x batch_size blocks spread evenly
    (block floor(j * n / m))."""
    if max_batches is None or max_batches * batch_size >= num_blocks:
        return list(range(num_blocks))
    m = max_batches * batch_size
    return [j * num_blocks // m for j in range(m)]


def lr_multiplier(optim: dict, max_steps: int, step: int) -> float:
    """trainer.ds_config.lr_lambda: linear warm-up from 1/warmup to 1, then cosine (or constant)
    down to min_lr_ratio at max_steps; `step` is the 0-based optimizer step."""
    warmup = min(optim["warmup_steps"], max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if optim["schedule"] == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return optim["min_lr_ratio"] + (1 - optim["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float) -> list[dict]:
    """trainer.model_setup.param_groups: decay on matrices, not on biases, norms or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def read_tokens(path: Path, dtype: str) -> torch.Tensor:
    """A little-endian uint16/uint32 token file as an int64 tensor (no NumPy needed)."""
    raw = bytearray(path.read_bytes())
    if dtype == "uint16":
        t = torch.frombuffer(raw, dtype=torch.int16).to(torch.int32) & 0xFFFF
    elif dtype == "uint32":
        t = torch.frombuffer(raw, dtype=torch.int32).to(torch.int64) & 0xFFFFFFFF
    else:
        raise ValueError(f"token dtype {dtype!r}")
    if sys.byteorder != "little":  # pragma: no cover
        raise SystemExit("token files are little-endian; this machine is not")
    return t.to(torch.int64)


class Blocks:
    """trainer.data.TokenBlocks: example i = tokens[i*seq : i*seq + seq + 1], x and y shifted."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        self.offsets = torch.arange(seq_len + 1, device=tokens.device)

    def __len__(self) -> int:
        return self.n

    def get(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.tensor(idx, dtype=torch.int64, device=self.tokens.device)
        rows = self.tokens[i[:, None] * self.seq + self.offsets]
        return rows[:, :-1], rows[:, 1:]


# ----------------------------------------------------------------------------- train (torch only)


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def train(plan_dir: Path, out: Path, device: str = "cuda", precision: str = "bf16", steps: int | None = None,
          kernels: str | None = None, budget_s: float | None = None, results: Path | None = None,
          note: str = "") -> dict:
    """Train the plan's model on its tokens (see the module docstring); returns the summary and
    writes summary.json and metrics.jsonl to `out` (and the section to `results`) on rank 0.
    Launched by torchrun (WORLD_SIZE > 1): DDP over nccl on CUDA, gloo on CPU."""
    from model import GPT, GPTConfig
    from model.flops import peak_flops

    t_start = time.perf_counter()
    plan = json.loads((plan_dir / "plan.json").read_text())
    if plan.get("format") != PLAN_FORMAT:
        raise SystemExit(f"{plan_dir / 'plan.json'}: format {plan.get('format')}, expected {PLAN_FORMAT}")
    rank, world, local_rank = _dist_env()
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1:
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                             **({"device_id": dev} if dev.type == "cuda" else {}))
    tr, opt_cfg, d = plan["train"], plan["optim"], plan["data"]
    max_steps = steps or tr["max_steps"]
    seq, micro = d["seq_len"], plan["parallel"]["micro_batch"]
    global_batch = plan["parallel"]["global_batch"] or micro * world
    if global_batch % (micro * world):
        raise SystemExit(f"global batch {global_batch} is not a multiple of {micro} x {world} ranks")
    gas = global_batch // (micro * world)

    train_blocks = Blocks(read_tokens(plan_dir / "train.bin", d["dtype"]).to(dev), seq)
    val_blocks = Blocks(read_tokens(plan_dir / "val.bin", d["dtype"]).to(dev), seq)
    cfg = dict(plan["model"])
    if kernels:
        cfg["kernels"] = kernels
    torch.manual_seed(tr["seed"])
    model = GPT(GPTConfig(**cfg))  # on the CPU from the seed, as the loop builds it
    flops_per_token = model.flops_per_token(seq)
    n_params = model.num_params()
    model.to(dev).train()
    kernels_used = kernels_note(cfg.get("kernels", "torch"), dev)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if dev.type == "cuda" else None) \
        if world > 1 else model
    fused = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.AdamW(param_groups(model, opt_cfg["weight_decay"]), lr=opt_cfg["lr"],
                            betas=(opt_cfg["beta1"], opt_cfg["beta2"]), eps=opt_cfg["eps"], **fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(opt_cfg, max_steps, s))
    sampler = Sampler(len(train_blocks), micro, rank, world, tr["seed"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    peak_device, peak_source = peak_flops(dev, tr.get("peak_tflops"), dtype)
    peak = peak_device * world
    tokens_per_step = global_batch * seq

    @torch.no_grad()
    def evaluate(max_batches: int | None) -> tuple[float, int]:
        model.eval()
        idx = eval_sample(len(val_blocks), micro, max_batches)
        batches = [idx[s:s + micro] for s in range(0, len(idx), micro)]
        total = torch.zeros(2, dtype=torch.float64, device=dev)
        for i in range(math.ceil(len(batches) / world)):
            j = i * world + rank
            if j < len(batches):
                x, y = val_blocks.get(batches[j])
                with autocast():
                    loss = model(x, targets=y)
                total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), dtype=torch.float64,
                                                                              device=dev)])
        if world > 1:
            torch.distributed.all_reduce(total)
        model.train()
        return float(total[0] / total[1]), int(total[1])

    def bpb(loss: float) -> float:
        return loss / math.log(2) * d["val_tokens"] / d["val_bytes"]

    stop = {"signal": None}

    def on_term(signum, frame):
        stop["signal"] = signum

    old_term = signal.signal(signal.SIGTERM, on_term)
    rows: list[dict] = []
    ema = None
    times: list[float] = []
    step, last_loss, t_train = 0, float("nan"), time.perf_counter()
    stopped = None
    while step < max_steps:
        t0 = time.perf_counter()
        lr = sched.get_last_lr()[0]
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for micro_step in range(gas):
            x, y = train_blocks.get(sampler.next_indices())
            sync = world == 1 or micro_step == gas - 1
            with (nullcontext() if sync else net.no_sync()), autocast():
                loss = net(x, targets=y)
            (loss / gas).backward()
            loss_sum += loss.detach().double()
        if opt_cfg["grad_clip"]:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg["grad_clip"]))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                             if p.grad is not None]))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_loss = loss_sum / gas
        if world > 1:
            torch.distributed.all_reduce(step_loss)
            step_loss /= world
        last_loss = float(step_loss)  # waits for the step, as the loop's .item() does
        step += 1
        dt = time.perf_counter() - t0
        times.append(dt)
        tps = tokens_per_step / dt
        ema = tps if ema is None else 0.9 * ema + 0.1 * tps
        rows.append({"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                     "mfu": flops_per_token * tps / peak if peak else None})
        if step % tr["eval_every"] == 0 and step < max_steps:
            loss_v, n = evaluate(tr["eval_batches"])
            rows.append({"step": step, "val_loss": loss_v, "val_bpb": bpb(loss_v), "val_tokens": n})
        over_budget = budget_s is not None and time.perf_counter() - t_start > budget_s
        flag = torch.tensor([1.0 if (stop["signal"] or over_budget) else 0.0], device=dev)
        if world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and step < max_steps:
            stopped = "SIGTERM" if stop["signal"] else f"time budget {budget_s:g} s"
            break
    train_s = time.perf_counter() - t_train
    signal.signal(signal.SIGTERM, old_term)
    val_loss, val_tokens = evaluate(tr["eval_batches"])
    covered = len(eval_sample(len(val_blocks), micro, tr["eval_batches"])) == len(val_blocks)
    full_loss, full_tokens = (val_loss, val_tokens) if covered else evaluate(None)
    rows.append({"step": step, "val_loss": val_loss, "val_bpb": bpb(val_loss), "val_tokens": val_tokens,
                 "val_loss_full": full_loss, "val_bpb_full": bpb(full_loss), "val_tokens_full": full_tokens})
    steady = times[1:] or times
    summary = {
        "ran": "bench/gpu_train.py (plain PyTorch loop)", "recipe": plan["recipe"], "overrides": plan["overrides"],
        "steps": step, "max_steps": max_steps, "stopped": stopped, "params": n_params,
        "precision": precision + (" autocast (fp32 weights and AdamW)" if precision == "bf16" else ""),
        "kernels": kernels_used, "ranks": world, "backend": torch.distributed.get_backend() if world > 1 else None,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "micro_batch": micro, "global_batch": global_batch, "seq_len": seq,
        "final_train_loss": last_loss, "final_val_loss": val_loss, "val_tokens": val_tokens,
        "val_loss_full": full_loss, "val_tokens_full": full_tokens, "val_bpb": bpb(val_loss),
        "val_bpb_full": bpb(full_loss), "gzip_bpb": d["gzip_bpb"], "ln_vocab": math.log(d["vocab_size"]),
        "tokens_per_s": ema, "tokens_per_s_mean": tokens_per_step * len(steady) / sum(steady) if steady else None,
        "flops_per_token": flops_per_token, "mfu": flops_per_token * ema / peak if peak and ema else None,
        "peak_flops": peak_device, "peak_flops_source": peak_source, "train_s": train_s,
        "total_s": time.perf_counter() - t_start,
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if results is not None:
            write_section(results, section(summary, note))
    if world > 1:
        torch.distributed.destroy_process_group()
    return summary


def kernels_note(mode: str, dev: torch.device) -> str:
    """model.kernels and what it means here: with auto/fused, whether the fused library loads
    (ops whose inputs it does not cover still use the PyTorch reference, see model/kernels/ops.py)."""
    if mode == "torch":
        return "torch (PyTorch reference ops)"
    from model.kernels import build

    try:
        build.load(dev.type)
    except Exception as e:  # noqa: BLE001 - reported in the results
        if mode == "fused":
            raise
        return f"auto: fused {dev.type} kernels unavailable ({str(e).splitlines()[0][:160]}), PyTorch reference ops"
    return f"{mode}: fused {dev.type} kernels loaded"


# ------------------------------------------------------------------------------------- the report


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def section(s: dict, note: str = "") -> str:
    """The results file's marked section for a summary (ours from summary.json, or `train`'s)."""
    ranks = s.get("ranks", 1)
    lines = [SECTION_BEGIN, f"## Full training run: {s['recipe']}, {s['precision']}, {ranks} "
             f"{'rank' if ranks == 1 else 'ranks'}", ""]
    if note:
        lines += [note, ""]
    steps = f"{s['steps']} of {s['max_steps']}" + (f" (stopped early: {s['stopped']})" if s.get("stopped") else "")
    mfu = "n/a" if s.get("mfu") is None else f"{s['mfu']:.2%}"
    rows = [
        ("ran", s["ran"]),
        ("recipe and overrides", f"`{s['recipe']}` {' '.join(s.get('overrides') or []) or '(none)'}"),
        ("device", f"{s.get('device', '?')} x {ranks}" + (f", {s['backend']}" if s.get("backend") else "")),
        ("precision, kernels", f"{s['precision']}, model.kernels={s.get('kernels', '?')}"),
        ("steps", steps),
        ("final val loss (fixed sample)", f"{_fmt(s['final_val_loss'], '.4f')} over {s['val_tokens']:,} tokens"),
        ("val loss, full split", f"{_fmt(s['val_loss_full'], '.4f')} over {s['val_tokens_full']:,} tokens"),
        ("bits per byte (full split) / gzip -9", f"{_fmt(s['val_bpb_full'], '.3f')} / {_fmt(s['gzip_bpb'], '.3f')}"),
        ("final train loss", _fmt(s["final_train_loss"], ".4f")),
        ("tokens/s (EMA, as the loop's summary)", _fmt(s["tokens_per_s"], ",.0f")),
        ("MFU per device", f"{mfu} of {s['peak_flops'] / 1e12:.3f} TFLOP/s ({s['peak_flops_source']})"),
    ]
    if s.get("tokens_per_s_mean") is not None:
        rows.insert(-1, ("tokens/s (mean of steps 2..N)", _fmt(s["tokens_per_s_mean"], ",.0f")))
    if s.get("train_s") is not None:
        rows.append(("wall time", f"{s['train_s']:.1f} s training, {s['total_s']:.1f} s in all"))
    elif s.get("total_s") is not None:
        rows.append(("wall time", f"{s['total_s']:.1f} s in all (the run's process)"))
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), SECTION_END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this script's marked section of `path` (other sections stay), or append it."""
    from record_losses import write_marked_section  # bench/ is this script's first path entry

    write_marked_section(path, text, SECTION_BEGIN, SECTION_END)


def loop_summary(run_dir: Path, recipe: str, overrides: list[str], ranks: int, command: list[str]) -> dict:
    """Our loop's summary.json in the section's terms."""
    import yaml  # our loop ran, so its modules are here

    s = json.loads((run_dir / "summary.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cuda = torch.cuda.is_available()
    return {**s, "ran": f"our loop: `{shlex.join(command)}`", "recipe": recipe, "overrides": overrides,
            "max_steps": cfg["train"]["max_steps"], "ranks": ranks, "precision": cfg["train"]["precision"],
            "kernels": cfg["model"]["kernels"], "backend": cfg["launch"]["backend"] if ranks > 1 else None,
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"}


# ------------------------------------------------------------------------------------ gpu-check


def missing_loop_modules() -> list[str]:
    return [m for m in LOOP_MODULES if importlib.util.find_spec(m) is None]


def gpu_check(plan_dir: Path, out: Path, results: Path, device: str, steps: int | None = None,
              budget_s: float | None = None, procs: int | None = None, kernels: str | None = None) -> int:
    """The GPU check's training run (see the module docstring): our loop when it can run here,
    else the plain loop, with one line in the results saying so. 2 ranks when `procs` (default:
    the number of GPUs, at most 2) is 2; `kernels` overrides model.kernels. Returns the exit status."""
    plan_file = plan_dir / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else None
    if procs is None:
        procs = min(2, torch.cuda.device_count()) if device == "cuda" else 1
    procs = max(1, procs)
    recipe = plan["recipe"] if plan else "gpt-tiny"
    overrides = list(plan["overrides"]) if plan else []
    missing = missing_loop_modules()
    out.mkdir(parents=True, exist_ok=True)
    # `timeout` signals the whole process group: the child stops training, evaluates and writes the
    # section; this process waits for it (and reports a failure) instead of dying first.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not missing:
        layout = (["launch.backend=nccl" if device == "cuda" else "launch.backend=gloo",
                   f"launch.procs_per_node={procs}"] if procs > 1 else [])
        precision = ["train.precision=bf16"] if procs == 1 else []  # 2 ranks: auto (bf16 on a GPU that has it)
        args = [*overrides, *layout, *precision, *([f"train.max_steps={steps}"] if steps else []),
                *([f"model.kernels={kernels}"] if kernels else []), f"run.output_dir={out / 'runs'}",
                "run.name=gpu-check-train", "tracking.wandb=disabled", "train.progress=false"]
        cmd = [sys.executable, "-m", "launch", "train", recipe, *args]
        print("our loop:", shlex.join(cmd), flush=True)
        shutil.rmtree(out / "runs" / "gpu-check-train", ignore_errors=True)  # a fresh run, not a resume
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
        took = time.perf_counter() - t0
        run_dir = out / "runs" / "gpu-check-train"
        if rc != 0 or not (run_dir / "summary.json").exists():
            write_section(results, f"{SECTION_BEGIN}\n## Full training run: FAILED\n\nour loop "
                                   f"`{shlex.join(cmd)}` exited with {rc}\n{SECTION_END}\n")
            return rc or 1
        summary = loop_summary(run_dir, recipe, [*overrides, *layout, *precision], procs, cmd)
        text = section({**summary, "total_s": took})
        write_section(results, text)
        print(text, end="")
        return 0
    if plan is None:
        msg = (f"our loop cannot run here (this Python lacks {', '.join(missing)}) and the plain loop's inputs "
               f"are missing: no {plan_file} (make it with `.venv/bin/python bench/gpu_train.py prepare "
               f"{plan_dir}` and carry that folder)")
        write_section(results, f"{SECTION_BEGIN}\n## Full training run: NOT RUN\n\n{msg}\n{SECTION_END}\n")
        print(msg, file=sys.stderr)
        return 2
    what = (f"{procs} ranks of torch DDP over {'nccl' if device == 'cuda' else 'gloo'} (torchrun)" if procs > 1
            else "1 process")
    note = (f"**Our training loop (`python -m launch train {recipe}`) cannot run on this machine: its Python "
            f"lacks {', '.join(missing)}.** What ran instead: `bench/gpu_train.py train`, a plain-PyTorch loop "
            f"over the same model, tokens, init, data order, AdamW groups, schedule and evaluation sample "
            f"(see its docstring), bf16 autocast, {what}; data: {plan['data']['train_tokens']:,} train / "
            f"{plan['data']['val_tokens']:,} val tokens prepared by `gpu_train.py prepare` (cache "
            f"{plan['data']['cache_key'][:12]}).")
    print(note, flush=True)
    cmd = [str(Path(__file__).resolve()), "train", "--plan", str(plan_dir), "--out", str(out / "gpu-train"),
           "--device", device, "--precision", "bf16", "--results", str(results), "--note", note,
           *(["--steps", str(steps)] if steps else []), *(["--budget", str(budget_s)] if budget_s else []),
           *(["--kernels", kernels] if kernels else [])]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd]
    else:
        cmd = [sys.executable, *cmd]
    rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
    if rc != 0:
        write_section(results, f"{SECTION_BEGIN}\n## Full training run: FAILED\n\n{note}\n\n"
                               f"`{shlex.join(cmd)}` exited with {rc}\n{SECTION_END}\n")
        return rc
    print(results.read_text().split(SECTION_BEGIN, 1)[-1].split(SECTION_END, 1)[0], flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenise a recipe's data and write plan.json (project environment)")
    p.add_argument("out", type=Path)
    p.add_argument("--recipe", default="gpt-tiny")
    p.add_argument("overrides", nargs="*")
    t = sub.add_parser("train", help="the plain-PyTorch loop over a prepared plan (torch only)")
    t.add_argument("--plan", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    t.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    t.add_argument("--steps", type=int, help="stop after this many steps (default: the plan's train.max_steps)")
    t.add_argument("--kernels", choices=["auto", "fused", "torch"], help="default: the plan's model.kernels")
    t.add_argument("--budget", type=float, help="stop training after this many seconds (SIGTERM does too)")
    t.add_argument("--results", type=Path, help="markdown file that gets the marked section")
    t.add_argument("--note", default="", help="a line for the section")
    g = sub.add_parser("gpu-check", help="our loop if it can run here, else the plain loop; writes the section")
    g.add_argument("--plan", type=Path, default=REPO / "build" / "gpu-data")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--results", type=Path, required=True)
    g.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    g.add_argument("--steps", type=int)
    g.add_argument("--budget", type=float)
    g.add_argument("--procs", type=int, help="default: the number of GPUs, at most 2 (1 on CPU)")
    g.add_argument("--kernels", choices=["auto", "fused", "torch"], help="default: the recipe's model.kernels")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        plan = prepare(a.out, a.recipe, a.overrides)
        print(f"{a.out}: {plan['data']['train_tokens']:,} train / {plan['data']['val_tokens']:,} val tokens, "
              f"{plan['params'] / 1e6:.2f}M parameters ({' '.join([a.recipe, *a.overrides])})")
        return 0
    if a.cmd == "train":
        train(a.plan, a.out, a.device, a.precision, a.steps, a.kernels, a.budget, a.results, a.note)
        return 0
    return gpu_check(a.plan, a.out, a.results, a.device, a.steps, a.budget, a.procs, a.kernels)


if __name__ == "__main__":
    # The project's rank exit (trainer/rank_exit.py), loaded by path: the GPU machine's Python may
    # lack what the trainer package needs, and that file needs nothing.
    spec = importlib.util.spec_from_file_location("rank_exit", REPO / "trainer" / "rank_exit.py")
    rank_exit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rank_exit)
    launched = rank_exit.is_launched_rank()  # a torchrun rank (asked before the run sets anything)
    code = main()
    if launched:
        rank_exit.end_process(code)  # see there
    sys.exit(code)
