"""Sweep the fused kernels' launch shapes (LLMK_TUNE, see csrc/cuda_common.cuh) on one GPU.

For the norms (layer norm + bias + residual, RMS norm + residual) and cross-entropy at
bench_kernels.py's GPU sizes: forward and backward timed apart with CUDA events (median of
--repeats, settings timed round-robin so they share the machine's state), for each LLMK_TUNE
setting below, and a torch.profiler table of the default setting's kernels (what the GPU spends
in each launch of one fused step, against the step's wall time).  The fastest forward and
backward settings are marked; they become the kernels' defaults by hand (in the .cu launchers).

    python bench/kernel_sweep.py --out bench/results          # on a GPU machine, ~1 min
    python bench/kernel_sweep.py --device cpu --quick         # smoke test (CPU kernels: LLMK_TUNE has no effect)

Writes <out>/<device>-sweep.md and prints it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_kernels import cases, device_slug  # noqa: E402
from model.kernels import build, get_ops  # noqa: E402

# op -> LLMK_TUNE settings tried ("" = the built-in launch shapes)
SETTINGS = {
    "layer_norm+residual": ["", "norm_fwd_threads=128", "norm_fwd_threads=256", "norm_fwd_hoist=1",
                            "norm_fwd_threads=256,norm_fwd_hoist=1",
                            "norm_bwd_blocks=1", "norm_bwd_blocks=4", "norm_bwd_threads=256",
                            "norm_bwd_threads=256,norm_bwd_blocks=4"],
    "rms_norm+residual": ["", "norm_fwd_threads=128", "norm_fwd_threads=256", "norm_fwd_hoist=1",
                          "norm_fwd_threads=256,norm_fwd_hoist=1",
                          "norm_bwd_blocks=1", "norm_bwd_blocks=4", "norm_bwd_threads=256",
                          "norm_bwd_threads=256,norm_bwd_blocks=4"],
    "cross_entropy": ["", "ce_fwd_unroll=4", "ce_fwd_threads=256", "ce_fwd_unroll=4,ce_fwd_threads=256",
                      "ce_fwd_threads=128", "ce_bwd_unroll=4", "ce_bwd_gy=1", "ce_bwd_gy=4",
                      "ce_bwd_unroll=4,ce_bwd_gy=8"],
}


class Timer:
    """Elapsed device time of a callable (CUDA events; wall clock on CPU)."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn) -> float:
        if self.device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        import time
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def _closures(case, ops, dtype, device):
    kw, grad_keys = case.make(dtype, device)
    leaves = {k: (v.detach().requires_grad_() if k in grad_keys else v) for k, v in kw.items()}
    inputs = [leaves[k] for k in grad_keys]
    fn = case.fused(ops)
    probe = fn(**leaves)
    outs = probe if isinstance(probe, tuple) else (probe,)
    ups = [torch.randn_like(o) for o in outs]
    state = {}

    def fwd():
        out = fn(**leaves)
        state["outs"] = out if isinstance(out, tuple) else (out,)

    def bwd():
        torch.autograd.grad(state.pop("outs"), inputs, ups)

    return fwd, bwd, case.nbytes(kw, torch.tensor([], dtype=dtype).element_size())


def sweep(case, ops, dtype, device, repeats, timer) -> list[dict]:
    fwd, bwd, nbytes = _closures(case, ops, dtype, device)
    rows = {s: {"setting": s or "(default)", "fwd": [], "bwd": []} for s in SETTINGS[case.name]}
    for _ in range(2):  # warm-up of every setting
        for s in rows:
            os.environ["LLMK_TUNE"] = s
            fwd()
            bwd()
    for _ in range(repeats):
        for s, r in rows.items():
            os.environ["LLMK_TUNE"] = s
            r["fwd"].append(timer(fwd))
            r["bwd"].append(timer(bwd))
    os.environ.pop("LLMK_TUNE", None)
    out = []
    for r in rows.values():
        f, b = statistics.median(r["fwd"]), statistics.median(r["bwd"])
        out.append({"setting": r["setting"], "fwd_ms": f, "bwd_ms": b, "step_ms": f + b,
                    "gbps": nbytes / ((f + b) * 1e-3) / 1e9})
    return out


def profile_default(case, ops, dtype, device) -> str:
    """The kernels of one default-setting step (fwd + bwd) as torch.profiler sees them."""
    from torch.profiler import ProfilerActivity, profile
    fwd, bwd, _ = _closures(case, ops, dtype, device)
    fwd()
    bwd()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fwd()
        bwd()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    lines = ["| kernel / op | calls | self time ms |", "|---|---:|---:|"]
    evs = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    evs.sort(key=lambda e: -getattr(e, key))
    for e in evs[:10]:
        lines.append(f"| `{e.key[:90]}` | {e.count} | {getattr(e, key) / 1e3:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 3 repeats")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 3
    try:
        build.load(args.device)
    except build.KernelBuildError as e:
        print(f"kernel_sweep: fused {args.device} kernels unavailable: {e}", file=sys.stderr)
        return 1
    ops = get_ops("fused")
    dtype = torch.bfloat16
    timer = Timer(args.device)
    name = device_slug(args.device)
    md = [f"# Kernel launch-shape sweep: {name}", "",
          f"torch {torch.__version__}, bf16, median of {args.repeats} per setting (settings timed round-robin), "
          "forward and backward timed apart (CUDA events). GB/s = bench_kernels.py's minimum bytes of a step / "
          "(fwd + bwd). Settings are LLMK_TUNE values (csrc/cuda_common.cuh); the best forward and backward "
          "are marked *.", ""]
    for case in cases(args.device, args.quick):
        if case.name not in SETTINGS:
            continue
        rows = sweep(case, ops, dtype, args.device, args.repeats, timer)
        bf = min(r["fwd_ms"] for r in rows)
        bb = min(r["bwd_ms"] for r in rows)
        md += [f"## {case.name} {case.shape}", "", "| LLMK_TUNE | fwd ms | bwd ms | fwd+bwd ms | GB/s |",
               "|---|---:|---:|---:|---:|"]
        for r in rows:
            f = f"{r['fwd_ms']:.3f}" + (" *" if r["fwd_ms"] == bf else "")
            b = f"{r['bwd_ms']:.3f}" + (" *" if r["bwd_ms"] == bb else "")
            md.append(f"| {r['setting']} | {f} | {b} | {r['step_ms']:.3f} | {r['gbps']:.1f} |")
            print(f"{case.name:22s} {r['setting']:40s} fwd {r['fwd_ms']:.3f} bwd {r['bwd_ms']:.3f} "
                  f"{r['gbps']:.0f} GB/s", flush=True)
        md += ["", "Default setting, one step under torch.profiler:", "",
               profile_default(case, ops, dtype, args.device), ""]
    text = "\n".join(md) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-sweep.md"
    path.write_text(text)
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
