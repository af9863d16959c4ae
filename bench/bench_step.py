"""Full training step of the project's GPT (fused kernels, PyTorch references, torch.compile)
against a plain-PyTorch GPT-2 of the same shape, side by side in one process.

No DeepSpeed: imports only torch and this repo's `model` package (plus bench/plain_gpt.py, a
nanoGPT-style GPT written independently of our model code).  Rows (all from the same initial
weights, the same batches and the same optimizer):

    plain              plain GPT, eager
    plain-compile      plain GPT, torch.compile
    ours-torch         model.GPT, kernels=torch (PyTorch reference ops), eager
    ours-fused         model.GPT, kernels=fused, eager
    ours-fused-compile model.GPT, kernels=fused, torch.compile
    ours-torch-compile model.GPT, kernels=torch, torch.compile (only with --rows)

One step = forward + loss, backward, clip_grad_norm_(1.0), AdamW step, zero_grad(set_to_none).
CUDA: GPT-2 124M (12 layers, d768, 12 heads, vocab 50304, seq 1024, batch 32) with float32 weights,
bf16 autocast and AdamW(fused=True).  CPU: a small shape (4 layers, d256, seq 256, batch 8, vocab
50304) in float32 with AdamW(foreach=True).  Rows are timed round-robin (one step of each row in
turn, every other round in reverse order, so background load and position effects hit all of them
alike); the median over --repeats rounds after --warmup steps.

MFU = tokens/s * (6 * N + 12 * n_layer * d_model * seq) / peak FLOP/s, N = weights used in matmuls
(every nn.Linear weight; the tied embedding counted once, as the output head).
Peak: `model.flops.peak_flops`, the GPU's datasheet dense bf16 peak, or on CPU a matmul ceiling
measured on the threads (in the rows' dtype: float32).

Before timing, the plain GPT and ours (kernels=torch, and fused) compute the loss of one batch in
float32 from the same weights: plain and ours/torch must agree (logits and loss), or the script
exits with an error.  A row that fails (a torch.compile error, kernels that do not build) gets its
error in the note column instead of stopping the run.  --budget S (or SIGTERM, e.g. from
`timeout`) stops preparing further rows / timing further repeats and writes what it has.

The table is printed and written as the marked `bench_step` section of bench/results/<device>.md
(the same file and device name as bench/bench_kernels.py; run that first, it rewrites its file):

    python bench/bench_step.py                     # CUDA when present, else CPU
    python bench/bench_step.py --device cuda --budget 200
    python bench/bench_step.py --quick             # tiny shape, few repeats (smoke test)
    python bench/bench_step.py --profile           # and one step per row by kernel family (torch.profiler)
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import re
import signal
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_kernels import _loadavg, device_slug  # noqa: E402
from plain_gpt import PlainConfig, PlainGPT, to_ours_state_dict  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402
from model.flops import peak_flops  # noqa: E402
from model.kernels import build, memprof  # noqa: E402

# --budget: a compiled row is not started with less than this left (compile + warm-up, with the
# timing and memory passes after it), and the timing stops at the budget after MIN_REPEATS rounds.
COMPILE_RESERVE_S = {"cuda": 75.0, "cpu": 45.0}
MIN_REPEATS = 3

SECTION_BEGIN = "<!-- bench_step:begin -->"
SECTION_END = "<!-- bench_step:end -->"


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    model: str  # "plain" | "ours"
    kernels: str | None
    compile: bool


ROWS = {r.key: r for r in (
    RowSpec("plain", "plain PyTorch GPT, eager", "plain", None, False),
    RowSpec("plain-compile", "plain PyTorch GPT, torch.compile", "plain", None, True),
    RowSpec("ours-torch", "ours, kernels=torch, eager", "ours", "torch", False),
    RowSpec("ours-fused", "ours, kernels=fused, eager", "ours", "fused", False),
    RowSpec("ours-fused-compile", "ours, kernels=fused, torch.compile", "ours", "fused", True),
    RowSpec("ours-torch-compile", "ours, kernels=torch, torch.compile", "ours", "torch", True),
)}
DEFAULT_ROWS = "plain,plain-compile,ours-torch,ours-fused,ours-fused-compile"


class Interrupted(BaseException):
    """SIGTERM arrived (the time limit of the caller): stop and write what was measured."""


@dataclass
class Row:
    spec: RowSpec
    step: object = None  # closure running one training step
    model: object = None
    opt: object = None
    times_ms: list = field(default_factory=list)
    step_ms: float | None = None
    tokens_s: float | None = None
    mfu: float | None = None
    peak_mib: float | None = None
    notes: list = field(default_factory=list)


# ------------------------------------------------------------------------------------- helpers


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}".replace("|", "/")


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _state_bytes(model, opt) -> int:
    """Parameters + optimizer state of one row (grads are freed between steps)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in opt.state.values():
        n += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return n


def make_optimizer(model, device: str) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    kind = {"fused": True} if device == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, **kind)


def make_step(model, opt, batches, accum: int, device: str, amp: bool):
    """One optimizer step over `accum` micro-batches of the next batch."""
    params = [p for p in model.parameters()]
    counter = [0]

    def step():
        x, y = batches[counter[0] % len(batches)]
        counter[0] += 1
        for xm, ym in zip(x.chunk(accum), y.chunk(accum)):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
                loss = model(xm, ym)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _dynamo_counters():
    try:
        from torch._dynamo.utils import counters
        return counters
    except Exception:  # noqa: BLE001 - a torch without dynamo internals: no counts
        return None


def _compile_summary(counters) -> str:
    if counters is None:
        return ""
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"].get("unique_graphs", 0)
    reasons = "; ".join(sorted({re.sub(r"\s+", " ", str(r)).replace(" Explanation:", ":")[:140]
                                for r in counters["graph_break"]})[:2])
    return f"{graphs} graph(s), {breaks} graph break(s)" + (f" ({reasons})" if reasons else "")


def _fallbacks(caught) -> str:
    ops = sorted({str(w.message).split(": ")[1].split(" uses")[0] if " uses the PyTorch reference" in
                  str(w.message) else "" for w in caught} - {""})
    return ("PyTorch-reference fallback: " + ", ".join(ops)) if ops else ""


# --------------------------------------------------------------------------------------- models


def build_model(spec: RowSpec, plain: PlainGPT, ours_sd: dict, ours_cfg: dict, device: str):
    if spec.model == "plain":
        model = copy.deepcopy(plain)
    else:
        with torch.device(device):
            model = GPT(GPTConfig(style="gpt2", kernels=spec.kernels, **ours_cfg), init=False)
        model.load_state_dict(ours_sd, strict=True)
    model.train()
    return model


@torch.no_grad()
def initial_check(plain: PlainGPT, ours_sd: dict, ours_cfg: dict, batch, device: str, fused_ok: bool,
                  atol: float) -> tuple[list[str], dict]:
    """Loss of one batch in float32 from the same weights: plain vs ours (torch; fused if built)."""
    x, y = batch
    lines, losses = [], {}
    ref_logits = plain(x).float()
    losses["plain"] = plain(x, y).item()
    for kernels in ("torch", "fused") if fused_ok else ("torch",):
        with torch.device(device):
            ours = GPT(GPTConfig(style="gpt2", kernels=kernels, **ours_cfg), init=False)
        ours.load_state_dict(ours_sd, strict=True)
        ours.eval()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                logits = ours(x)
                losses[kernels] = ours(x, y).item()
        except Exception as e:  # noqa: BLE001 - the fused rows report it again
            lines.append(f"ours kernels={kernels}: {_short(e)}")
            continue
        rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
        dl = abs(losses[kernels] - losses["plain"])
        lines.append(f"ours kernels={kernels}: loss {losses[kernels]:.6f} (|diff| {dl:.1e}), "
                     f"logits max |diff| / max |logit| {rel:.1e}")
        if kernels == "torch" and (dl > atol or rel > 1e-4):
            raise SystemExit(f"initial loss check FAILED: plain {losses['plain']:.6f} vs ours/torch "
                             f"{losses['torch']:.6f} (logits rel diff {rel:.1e}): the models differ")
        del ours
    head = (f"initial loss (float32, same weights, {x.shape[0]}x{x.shape[1]} tokens): plain "
            f"{losses['plain']:.6f}, ln(vocab) = {math.log(plain.config.vocab_size):.6f}")
    return [head, *lines], losses


# ------------------------------------------------------------------------------------------ main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny shape, 2 warm-up + 3 repeats (smoke test)")
    p.add_argument("--layers", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--batch", type=int, help="sequences per optimizer step")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches per step")
    p.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                   help="bf16 autocast (auto: on CUDA only)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: its default)")
    p.add_argument("--budget", type=float, default=0, help="soft time limit in seconds (0: none)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--profile", action="store_true",
                   help="after the timing, one step per row under torch.profiler: time by kernel family")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    shape = (dict(layers=2, d_model=64, heads=2, vocab=512, seq=32, batch=4) if args.quick else
             dict(layers=12, d_model=768, heads=12, vocab=50304, seq=1024, batch=32) if args.device == "cuda" else
             dict(layers=4, d_model=256, heads=4, vocab=50304, seq=256, batch=8))
    for k, v in shape.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.repeats is None:
        args.repeats = 3 if args.quick else (7 if args.device == "cpu" else 10)
    if args.batch % args.accum:
        p.error("--batch must be a multiple of --accum")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        p.error(f"unknown rows {bad}; known: {', '.join(ROWS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    amp = args.amp == "bf16" or (args.amp == "auto" and device == "cuda")
    t_start = time.perf_counter()
    load_start = _loadavg()

    def over_budget(reserve: float = 0.0) -> bool:
        return bool(args.budget) and time.perf_counter() - t_start > args.budget - reserve

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)

    # Fused kernels: built (or loaded from the cache) up front so the rows time steps, not builds.
    t0 = time.perf_counter()
    try:
        build.load(device)
        fused_ok, build_note = True, f"fused {device} kernels loaded in {time.perf_counter() - t0:.1f}s"
    except build.KernelBuildError as e:
        fused_ok, build_note = False, f"fused {device} kernels unavailable: {_short(e)}"
        print(build_note, file=sys.stderr)

    torch.manual_seed(args.seed)
    pcfg = PlainConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.d_model, vocab_size=args.vocab,
                       block_size=args.seq)
    with torch.device(device):
        plain = PlainGPT(pcfg)
    ours_cfg = dict(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                    max_seq_len=args.seq, dropout=0.0)
    ours_sd = to_ours_state_dict(plain)
    flops_tok = plain.flops_per_token(args.seq)
    with torch.device("meta"):
        ours_meta = GPT(GPTConfig(style="gpt2", kernels="torch", **ours_cfg), init=False)
    if ours_meta.flops_per_token(args.seq) != flops_tok:
        print(f"warning: FLOPs per token differ: plain {flops_tok}, ours {ours_meta.flops_per_token(args.seq)}",
              file=sys.stderr)
    n_params = sum(p.numel() for p in plain.parameters())

    g = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(4):
        b = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
        batches.append((b[:, :-1].contiguous(), b[:, 1:].contiguous()))
    check_n = min(2, args.batch)
    check_lines, _ = initial_check(plain, ours_sd, ours_cfg, (batches[0][0][:check_n], batches[0][1][:check_n]),
                                   device, fused_ok, atol=1e-4 if device == "cpu" else 1e-3)
    for line in check_lines:
        print(line, file=sys.stderr)

    peak, peak_note = peak_flops(torch.device(device), None)
    tokens_per_step = args.batch * args.seq
    rows = [Row(ROWS[k]) for k in args.rows]
    ready: list[Row] = []
    interrupted = ""
    counters = _dynamo_counters()
    from model.kernels import ops as kernel_ops

    # Eager rows first (seconds), then the compiled ones (about a minute each for GPT-2 124M on an
    # H200), ours before plain (the issue's headline ratio needs ours compiled most of all), so a
    # --budget or SIGTERM that cuts the preparation short costs the fewest and least useful rows.
    for row in sorted(rows, key=lambda r: (r.spec.compile, r.spec.compile and r.spec.model != "ours")):
        spec = row.spec
        if interrupted:
            row.notes.append(f"not run: {interrupted}")
            continue
        if spec.kernels == "fused" and not fused_ok:
            row.notes.append(f"n/a: {build_note}")
            continue
        if spec.compile and over_budget(reserve=COMPILE_RESERVE_S[device]):
            row.notes.append(f"not run: --budget {args.budget:.0f}s left no time for a compile")
            continue
        t1 = time.perf_counter()
        try:
            model = build_model(spec, plain, ours_sd, ours_cfg, device)
            opt = make_optimizer(model, device)
            run = torch.compile(model, mode=args.compile_mode) if spec.compile else model
            if counters is not None:
                counters.clear()
            kernel_ops.reset_warnings()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step = make_step(run, opt, batches, args.accum, device, amp)
                for _ in range(args.warmup):
                    step()
                _sync(device)
            row.model, row.opt, row.step = model, opt, step
            secs = time.perf_counter() - t1
            if spec.compile:
                row.notes.append(f"compile + warm-up {secs:.0f}s, {_compile_summary(counters)}")
            fb = _fallbacks(caught)
            if fb:
                row.notes.append(fb)
            ready.append(row)
        except Interrupted:
            interrupted = f"interrupted (SIGTERM) after {time.perf_counter() - t_start:.0f}s"
            row.notes.append(f"{interrupted} during {'compile + ' if spec.compile else ''}warm-up")
        except Exception as e:  # noqa: BLE001 - a failing row is reported, not fatal
            traceback.print_exc(limit=3, file=sys.stderr)
            row.notes.append(f"n/a: {_short(e)}")
            _free(device)
        print(f"  prepared {spec.key:20s} in {time.perf_counter() - t1:5.1f}s  {'; '.join(row.notes)}",
              file=sys.stderr, flush=True)

    # Round-robin timing: one step of each row in turn, --repeats rounds.
    done = 0
    try:
        for i in range(args.repeats if not interrupted else 1):
            if i >= MIN_REPEATS and over_budget():
                break
            for row in (ready if i % 2 == 0 else ready[::-1]):  # alternate the order: no row always first
                t1 = time.perf_counter()
                row.step()
                _sync(device)
                row.times_ms.append((time.perf_counter() - t1) * 1e3)
            done = i + 1
    except Interrupted:
        interrupted = interrupted or f"interrupted (SIGTERM) after {time.perf_counter() - t_start:.0f}s"
    for row in ready:
        n = min(done, len(row.times_ms)) or len(row.times_ms)
        if not n:
            continue
        row.step_ms = statistics.median(row.times_ms[:n])
        row.tokens_s = tokens_per_step / (row.step_ms * 1e-3)
        row.mfu = row.tokens_s * flops_tok / peak if peak else None

    # Peak memory of one more step (outside the timing): this row's parameters + optimizer state,
    # plus the highest allocation during the step above that (activations, gradients, temporaries).
    if not interrupted:
        try:
            for row in ready:
                if over_budget():
                    break
                extra = memprof.alloc_stats(row.step, device).peak
                row.peak_mib = (_state_bytes(row.model, row.opt) + extra) / 2**20
        except Interrupted:
            interrupted = f"interrupted (SIGTERM) after {time.perf_counter() - t_start:.0f}s"
        except Exception as e:  # noqa: BLE001 - profiler internals differ between torch versions
            print(f"peak memory not measured: {_short(e)}", file=sys.stderr)

    profile_md = []
    if args.profile and not interrupted and not over_budget():
        try:
            profile_md = profile_rows(ready, device)
        except Interrupted:
            interrupted = f"interrupted (SIGTERM) after {time.perf_counter() - t_start:.0f}s"
        except Exception as e:  # noqa: BLE001 - profiler internals differ between torch versions
            profile_md = [f"- kernel profile not taken: {_short(e)}"]

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    table = to_markdown(args, rows, device, amp, n_params, flops_tok, peak_note, build_note, check_lines,
                        done, load_start, interrupted, profile_md)
    print(table)
    if not args.no_write:
        slug = device_slug(device) + ("-quick" if args.quick else "")
        path = Path(args.out) / f"{slug}.md"
        write_section(path, table)
        print(f"written to the bench_step section of {path}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------- output


def fmt(v, spec, none="n/a"):
    return none if v is None else format(v, spec)


# Kernel families of the profile table (first match of the kernel's name, lower case).
KERNEL_FAMILIES = [
    ("matmuls (cuBLAS / CUTLASS)", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|matmul|addmm|\bmm\b")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot")),
    ("our fused kernels", re.compile(r"llmk_")),
    ("inductor (Triton)", re.compile(r"triton")),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach")),
    ("other", re.compile(r"")),
]


def profile_rows(ready: list, device: str, top: int = 6) -> list[str]:
    """One more step of every timed row under torch.profiler: device time by kernel family side by
    side, and each compiled row's top kernels (where ours and plain torch.compile differ)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    fams, tops = {}, {}
    for row in ready:
        with profile(activities=acts) as prof:
            row.step()
            _sync(device)
        evs = [e for e in prof.key_averages() if getattr(e, key, 0) > 0
               and (device != "cuda" or e.device_type == DeviceType.CUDA)]
        if device != "cuda":  # CPU: the aten ops (self time), not the Python-level wrappers
            evs = [e for e in evs if "::" in e.key]
        by_fam = dict.fromkeys((name for name, _ in KERNEL_FAMILIES), 0.0)
        for e in evs:
            name = next(n for n, pat in KERNEL_FAMILIES if pat.search(e.key.lower()))
            by_fam[name] += getattr(e, key) / 1e3
        fams[row.spec.key] = by_fam
        if row.spec.compile:
            evs.sort(key=lambda e: -getattr(e, key))
            tops[row.spec.label] = [(e.key, e.count, getattr(e, key) / 1e3) for e in evs[:top]]
    what = "device" if device == "cuda" else "CPU (aten ops' self time)"
    lines = ["", f"Where one step's {what} time goes (ms, torch.profiler, one step per row after the timing):", "",
             "| kernel family | " + " | ".join(r.spec.label for r in ready) + " |",
             "|---|" + "---:|" * len(ready)]
    for name, _ in KERNEL_FAMILIES:
        lines.append(f"| {name} | " + " | ".join(f"{fams[r.spec.key][name]:.2f}" for r in ready) + " |")
    lines.append("| **all** | " + " | ".join(f"{sum(fams[r.spec.key].values()):.2f}" for r in ready) + " |")
    for label, items in tops.items():
        lines += ["", f"Top kernels, {label}:", "", "| kernel | calls | ms |", "|---|---:|---:|"]
        lines += [f"| `{k[:100]}` | {n} | {ms:.2f} |" for k, n, ms in items]
    return lines


def to_markdown(args, rows, device, amp, n_params, flops_tok, peak_note, build_note, check_lines, done,
                load_start, interrupted, profile_md=()) -> str:
    by_key = {r.spec.key: r for r in rows}
    base_eager = getattr(by_key.get("plain"), "tokens_s", None)
    base_comp = getattr(by_key.get("plain-compile"), "tokens_s", None)
    dev = (f"`cuda` ({torch.cuda.get_device_name()})" if device == "cuda"
           else f"`cpu`, {torch.get_num_threads()} threads")
    load = _loadavg()
    prec = "float32 weights, bf16 autocast" if amp else "float32"
    optim = "AdamW(fused=True)" if device == "cuda" else "AdamW(foreach=True)"
    lines = [
        SECTION_BEGIN,
        f"## Training step: plain PyTorch GPT vs ours (bench/bench_step.py{' --quick' if args.quick else ''})",
        "",
        f"torch {torch.__version__}, device {dev}; {build_note}. Shape: {args.layers} layers, d_model "
        f"{args.d_model}, {args.heads} heads, vocab {args.vocab}, seq {args.seq}, batch {args.batch}"
        + (f" ({args.accum} micro-batches)" if args.accum > 1 else "")
        + f" = {args.batch * args.seq} tokens/step, {n_params / 1e6:.1f}M parameters; {prec}; {optim}, "
        "clip_grad_norm 1.0. One step = forward + loss, backward, clip, optimizer step, zero_grad. "
        f"Median of {done} steps per row (rows timed round-robin) after {args.warmup} warm-up steps."
        + (f" Host load average {load_start} at start, {load} at end." if load_start else ""),
        f"MFU = tokens/s x {flops_tok / 1e6:.1f} MFLOP/token / peak; FLOP/token = 6 N + 12 n_layer d_model seq "
        f"(N = weights in matmuls: every nn.Linear weight, tied head once); peak: {peak_note}. "
        "Peak MiB = the row's parameters + AdamW state + the highest allocation during one step above them "
        + ("(torch.cuda.max_memory_allocated)." if device == "cuda" else
           "(CPU: allocation events replayed from torch.profiler)."),
        "",
        "| step | tokens/s | step ms | MFU | peak MiB | vs plain eager | vs plain compile | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio_e = f"{r.tokens_s / base_eager:.2f}x" if r.tokens_s and base_eager else "n/a"
        ratio_c = f"{r.tokens_s / base_comp:.2f}x" if r.tokens_s and base_comp else "n/a"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        lines.append(f"| {r.spec.label} | {fmt(r.tokens_s, ',.0f')} | {fmt(r.step_ms, '.1f')} | {mfu} | "
                     f"{fmt(r.peak_mib, ',.0f')} | {ratio_e} | {ratio_c} | {'; '.join(r.notes)} |")
    lines.append("")
    lines += [f"- {line}" for line in check_lines]
    ours_c = getattr(by_key.get("ours-fused-compile"), "tokens_s", None)
    if ours_c and base_comp:
        lines.append(f"- ours fused + torch.compile / plain torch.compile: {ours_c / base_comp:.2f}x "
                     "(issue #4 GPU goal: >= 1.15x for GPT-2 124M)")
    if interrupted:
        lines.append(f"- {interrupted}: rows without numbers were not measured.")
    lines += profile_md
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace this script's marked section of `path` (the kernel table stays), or append it."""
    from record_losses import write_marked_section  # bench/ is this script's first path entry

    write_marked_section(path, section, SECTION_BEGIN, SECTION_END)


if __name__ == "__main__":
    sys.exit(main())
