"""Benchmark the fused kernels against PyTorch eager and torch.compile of the reference ops.

For every kernel and dtype: forward time and training-step time (forward + backward, median of
--repeats after warm-up), effective bandwidth of the step (the minimum bytes the op must move:
inputs read + outputs written, forward and backward, divided by the step time) and peak memory
of one step above the inputs (CPU: allocation events replayed from torch.profiler; CUDA:
torch.cuda.max_memory_allocated).  Writes a markdown table to bench/results/<device>.md and
prints it.

    python bench/bench_kernels.py                  # CPU sizes (or GPU sizes with --device cuda)
    python bench/bench_kernels.py --quick          # tiny sizes, 3 repeats (smoke test)
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model.kernels import build, get_ops, memprof, reference  # noqa: E402


@dataclass
class Case:
    name: str
    shape: str
    make: object  # (dtype, device) -> (kwargs, grad_keys)
    ref: object  # reference function
    fused: object  # ops -> function with the reference's signature
    nbytes: object  # (kwargs, elem_size) -> minimal bytes of one step
    extra_fused: dict = field(default_factory=dict)  # label -> ops -> function


def _rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


def cases(device: str, quick: bool) -> list[Case]:
    gpu = device == "cuda"
    if quick:
        N, D, F, V, NCE, rope = 64, 256, 512, 1000, 32, (1, 4, 32, 64)
    elif gpu:
        N, D, F, V, NCE, rope = 16384, 4096, 11008, 128256, 8192, (8, 32, 2048, 128)
    else:
        N, D, F, V, NCE, rope = 4096, 1024, 2816, 50257, 512, (4, 16, 512, 64)
    B, H, T, HD = rope

    def norm_inputs(with_bias):
        def make(dtype, dev):
            kw = dict(x=_rand((N, D), dtype, dev), residual=_rand((N, D), dtype, dev), weight=_rand(D, dtype, dev),
                      eps=1e-5)
            if with_bias:
                kw["bias"] = _rand(D, dtype, dev)
            return kw, [k for k in kw if k != "eps"]
        return make

    def ce_make(dtype, dev):
        return dict(logits=_rand((NCE, V), dtype, dev, 4.0), targets=torch.randint(0, V, (NCE,), device=dev)), [
            "logits"]

    def rope_make(dtype, dev):
        cos, sin = reference.rope_cache(T, HD, 10000.0, device=dev, dtype=dtype)
        q = _rand((B, T, H, HD), dtype, dev).transpose(1, 2)  # the model's transposed views
        k = _rand((B, T, H // 4, HD), dtype, dev).transpose(1, 2)
        return dict(q=q, k=k, cos=cos, sin=sin), ["q", "k"]

    return [
        Case("layer_norm+residual", f"{N}x{D}", norm_inputs(True), reference.layer_norm,
             lambda ops: ops.layer_norm, lambda kw, e: 8 * N * D * e),
        Case("rms_norm+residual", f"{N}x{D}", norm_inputs(False), reference.rms_norm,
             lambda ops: ops.rms_norm, lambda kw, e: 8 * N * D * e),
        Case("bias_gelu", f"{N}x{F}",
             lambda dt, dev: (dict(x=_rand((N, F), dt, dev), bias=_rand(F, dt, dev)), ["x", "bias"]),
             reference.bias_gelu, lambda ops: ops.bias_gelu, lambda kw, e: 5 * N * F * e),
        Case("swiglu", f"{N}x{F}",
             lambda dt, dev: (dict(gate=_rand((N, F), dt, dev), up=_rand((N, F), dt, dev)), ["gate", "up"]),
             reference.swiglu, lambda ops: ops.swiglu, lambda kw, e: 8 * N * F * e),
        Case("rope (GQA 4:1)", f"q {B}x{H}x{T}x{HD}", rope_make, reference.rope, lambda ops: ops.rope,
             lambda kw, e: 4 * (kw["q"].numel() + kw["k"].numel()) * e),
        Case("cross_entropy", f"{NCE}x{V}", ce_make, reference.cross_entropy, lambda ops: ops.cross_entropy,
             lambda kw, e: 3 * kw["logits"].numel() * e,
             extra_fused={"fused, in-place bwd": lambda ops: (
                 lambda logits, targets: ops.cross_entropy(logits, targets, inplace_backward=True))}),
    ]


@dataclass
class Row:
    kernel: str
    shape: str
    dtype: str
    impl: str
    fwd_ms: float | None = None
    step_ms: float | None = None
    gbps: float | None = None
    peak_mb: float | None = None
    note: str = ""


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


@dataclass
class Prepared:
    row: Row
    fwd: object
    step: object
    nbytes: int
    fwd_ms: list = field(default_factory=list)
    step_ms: list = field(default_factory=list)


def prepare(case: Case, label: str, fn, made, dtype, device, warmup) -> Prepared:
    """Autograd leaves for one implementation (sharing the input storage with the others, or a
    private copy for an op that overwrites its input), its forward-only and training-step
    closures, warmed up (torch.compile compiles here)."""
    kw, grad_keys = made
    private = "in-place" in label
    leaves = {k: ((v.detach().clone() if private else v.detach()).requires_grad_() if k in grad_keys else v)
              for k, v in kw.items()}
    inputs = [leaves[k] for k in grad_keys]
    probe = fn(**leaves)
    outs = probe if isinstance(probe, tuple) else (probe,)
    ups = [torch.randn_like(o) for o in outs]
    del probe, outs

    def fwd():
        with torch.no_grad():
            fn(**leaves)

    def step():
        out = fn(**leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, inputs, ups)

    for _ in range(warmup):
        fwd()
        step()
    _sync(device)
    row = Row(case.name, case.shape, str(dtype).replace("torch.", ""), label)
    return Prepared(row, fwd, step, case.nbytes(kw, torch.tensor([], dtype=dtype).element_size()))


def measure(prepared: list[Prepared], device, repeats) -> None:
    """Round-robin over the implementations so all see the same background load, then medians."""
    for _ in range(repeats):
        for p in prepared:
            p.fwd_ms.append(_time_ms(p.fwd, device))
            p.step_ms.append(_time_ms(p.step, device))
    for p in prepared:
        p.row.fwd_ms = statistics.median(p.fwd_ms)
        p.row.step_ms = statistics.median(p.step_ms)
        p.row.gbps = p.nbytes / (p.row.step_ms * 1e-3) / 1e9
        p.row.peak_mb = memprof.alloc_stats(p.step, device).peak / 2**20


def device_slug(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or "cpu"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*", "", name, flags=re.I)
        name = f"cpu-{name}-{torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def _loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return ""


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def to_markdown(rows: list[Row], header: list[str]) -> str:
    lines = [*header, "",
             "| kernel | shape | dtype | impl | fwd ms | fwd+bwd ms | GB/s (fwd+bwd) | peak MiB (fwd+bwd) | "
             "step vs eager | note |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    eager = {(r.kernel, r.dtype): r.step_ms for r in rows if r.impl == "eager"}
    for r in rows:
        base = eager.get((r.kernel, r.dtype))
        speed = f"{base / r.step_ms:.2f}x" if base and r.step_ms else "n/a"
        lines.append(f"| {r.kernel} | {r.shape} | {r.dtype} | {r.impl} | {fmt(r.fwd_ms, '.3f')} | "
                     f"{fmt(r.step_ms, '.3f')} | {fmt(r.gbps, '.1f')} | {fmt(r.peak_mb, '.1f')} | {speed} | "
                     f"{r.note} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtypes", default=None, help="comma list (default: float32,bfloat16 on CPU, bfloat16 on GPU)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--kernels", default="", help="substring filter on kernel names")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 3 repeats (smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("float32,bfloat16" if device == "cpu" else "bfloat16"))
              .split(",")]
    repeats = args.repeats or (3 if args.quick else (10 if device == "cpu" else 50))
    t0 = time.perf_counter()
    try:
        build.load(device)
        build_note = f"fused {device} kernels loaded in {time.perf_counter() - t0:.1f}s"
    except build.KernelBuildError as e:
        print(f"fused {device} kernels unavailable: {e}", file=sys.stderr)
        return 1
    ops = get_ops("fused")

    load_start = _loadavg()
    rows: list[Row] = []
    for case in cases(device, args.quick):
        if args.kernels and args.kernels not in case.name:
            continue
        for dtype in dtypes:
            impls = [("eager", case.ref)]
            if not args.no_compile:
                impls.append(("torch.compile", "compile"))
            impls.append(("fused", case.fused(ops)))
            impls += [(label, make(ops)) for label, make in case.extra_fused.items()]
            prepared, case_rows = [], []
            made = case.make(dtype, device)
            for label, fn in impls:
                t1 = time.perf_counter()
                try:
                    if fn == "compile":
                        torch._dynamo.reset()
                        fn = torch.compile(case.ref, dynamic=False)
                    p = prepare(case, label, fn, made, dtype, device, args.warmup)
                    if label == "torch.compile":
                        p.row.note = f"compile + warm-up {time.perf_counter() - t1:.0f}s"
                    prepared.append(p)
                    case_rows.append(p.row)
                except Exception as e:  # torch.compile without a working toolchain, etc.
                    row = Row(case.name, case.shape, str(dtype).replace("torch.", ""), label)
                    row.note = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                    traceback.print_exc(limit=2, file=sys.stderr)
                    case_rows.append(row)
            measure(prepared, device, repeats)
            del prepared, made
            for row in case_rows:
                rows.append(row)
                print(f"  {row.kernel:22s} {row.dtype:9s} {row.impl:20s} step {fmt(row.step_ms, '.3f')} ms  "
                      f"peak {fmt(row.peak_mb, '.1f')} MiB {row.note}", file=sys.stderr, flush=True)

    slug = device_slug(device) + ("-quick" if args.quick else "")
    load = _loadavg()
    load_note = (f" Host load average {load_start} at start, {load} at end (other processes share these "
                 "cores; timings are only comparable within one run)." if load_start else "")
    header = [f"# Fused kernel benchmark: {slug}", "",
              f"torch {torch.__version__}, device `{device}`"
              + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else
                 f", {torch.get_num_threads()} threads, CPU ISA build `{build.cpu_isa()}`")
              + f"; {build_note}; median of {repeats} (implementations timed round-robin) after {args.warmup} warm-up." + load_note,
              "fwd+bwd = forward and backward (autograd.grad w.r.t. all differentiable inputs). GB/s = minimum "
              "bytes the op moves (inputs + outputs, forward and backward) / step time. Peak = highest memory "
              "allocated during one step above the live inputs."]
    table = to_markdown(rows, header)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{slug}.md"
    # Keep the training-step section that bench_step.py writes into the same file.
    old = path.read_text() if path.exists() else ""
    step = re.search(r"<!-- bench_step:begin -->.*?<!-- bench_step:end -->\n?", old, re.S)
    path.write_text(table + ("\n" + step.group(0) if step else ""))
    print(table)
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
