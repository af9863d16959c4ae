"""Allocation measurement for tests and benchmarks.

CPU: torch's CPU allocator is invisible to tracemalloc, so the allocation/free events recorded by
`torch.profiler` (profile_memory=True) are replayed in time order: `peak` is the highest net
allocation over the call, `largest` the biggest single allocation.  CUDA: the caching allocator's
own counters (`torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class AllocStats:
    peak: int  # bytes above the level at the start of the call
    largest: int  # biggest single allocation in bytes (CPU); 0 when unknown (CUDA)


def cpu_alloc_stats(fn: Callable[[], object]) -> AllocStats:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
        mem = sorted(
            ((e.start_ns(), e.nbytes()) for e in events
             if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
        )
    except AttributeError as e:  # profiler internals changed
        raise RuntimeError(f"cannot read allocation events from torch.profiler in torch {torch.__version__}") from e
    cur = peak = largest = 0
    for _, n in mem:
        cur += n
        peak = max(peak, cur)
        largest = max(largest, n)
    return AllocStats(peak=peak, largest=largest)


def cuda_alloc_stats(fn: Callable[[], object], device=None) -> AllocStats:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return AllocStats(peak=torch.cuda.max_memory_allocated(device) - base, largest=0)


def alloc_stats(fn: Callable[[], object], device: torch.device | str = "cpu") -> AllocStats:
    device = torch.device(device)
    return cuda_alloc_stats(fn, device) if device.type == "cuda" else cpu_alloc_stats(fn)
