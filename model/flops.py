"""One device's peak FLOP/s for MFU, and where the figure comes from (torch only: the training
loop and bench/bench_step.py share it). The FLOP count per token is `GPT.flops_per_token`."""

from __future__ import annotations

import time

import torch

# Dense bf16 peak (TFLOP/s) of GPUs we know, from their datasheets; used for MFU unless
# train.peak_tflops is set.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_flops(device: torch.device, override_tflops: float | None,
               dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """One device's peak FLOP/s for MFU and a phrase saying where the number comes from:
    `train.peak_tflops` when given; on CUDA the datasheet's dense bf16 peak of a known GPU; on
    CPU a measured ceiling (`measure_matmul_flops`: a large matmul in the run's `dtype` on the
    threads torch uses), since a theoretical figure from instruction-set flags and the clock
    overstates what the cores sustain (this project's 2-thread AMD EPYC: 332 GFLOP/s assumed,
    about 180 measured)."""
    if override_tflops:
        return override_tflops * 1e12, f"train.peak_tflops = {override_tflops:g} TFLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12, f"{key} datasheet bf16 dense peak {tf:g} TFLOP/s"
        return 0.0, f"unknown GPU {name!r}: set train.peak_tflops"
    return measure_matmul_flops(dtype=dtype)


def measure_matmul_flops(n: int = 1536, dtype: torch.dtype = torch.float32, budget_s: float = 0.5,
                         min_reps: int = 2, max_reps: int = 10) -> tuple[float, str]:
    """A measured ceiling for matmul work on this process's CPU threads: the best rate of
    repeated n x n x n matmuls (2 n^3 FLOPs each) after one warm-up, timed until `budget_s` has
    passed (at least `min_reps`, at most `max_reps`). n = 1536: 7.2 GFLOP a product, 40 ms at
    180 GFLOP/s (this project's 2-thread EPYC, where 1536 to 4096 reach the same rate within the
    noise), so the whole measurement stays near 0.5 s, and under 1 s on a machine four times
    slower or as busy. The best repetition, because anything else running on the machine only
    slows it."""
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)  # its own stream: the training RNG is untouched
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    t_start = time.perf_counter()
    torch.mm(a, b, out=out)  # warm-up: allocation, thread pool, packing buffers
    best, reps = 0.0, 0
    while reps < max_reps:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        t1 = time.perf_counter()
        best, reps = max(best, 2 * n**3 / (t1 - t0)), reps + 1
        if reps >= min_reps and t1 - t_start >= budget_s:
            break
    took = time.perf_counter() - t_start
    kind = {torch.float32: "sgemm", torch.bfloat16: "bf16 gemm"}.get(dtype, f"{dtype} gemm")
    return best, (f"measured CPU {kind} {n}x{n}x{n} on {threads} thread{'s' * (threads != 1)}, "
                  f"best of {reps} in {took:.2f} s: {best / 1e9:.1f} GFLOP/s")


def end_of_run_peak(device: torch.device, override_tflops: float | None, dtype: torch.dtype,
                    start: tuple[float, str]) -> tuple[float, str]:
    """The ceiling a run's final MFU is reported against: a measured CPU ceiling is measured again
    at the end and the higher of the two kept, since a machine shared with other work can be busier
    during the start-up measurement than during training (measured: 199 GFLOP/s at start-up, 233
    reached by the run, an MFU of 117%). A given or datasheet peak stays as it is."""
    if override_tflops or device.type != "cpu":
        return start
    again, source = measure_matmul_flops(dtype=dtype)
    return (again, source + " (at the end of the run, above the start's)") if again > start[0] else start

