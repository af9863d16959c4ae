"""Bus bandwidth of agents.sync.ring_all_reduce against gloo's own dist.all_reduce, side by side.

R processes (default 4, gloo on CPU, one thread each) all-reduce an fp32 tensor of each size; the
two implementations are interleaved (ring, gloo, gloo, ring, ring, gloo, ...: the order alternates
every iteration) on the same inputs, after --warmup untimed rounds of each. One timing = a barrier,
then the slowest rank's wall time for the call (the max over ranks). Reported: the median of
--iters timings of each, and the bus bandwidth 2(R-1)/R * S / t of an S-byte tensor (the bytes
each rank must send and receive in any bandwidth-optimal all-reduce, per second), and the ratio
ring / gloo. The ring's results are checked against gloo's (integer-valued inputs: equal bits),
and its bytes sent per rank against 2(R-1)/R * S.

    python bench/bench_ring.py                            # R = 4; 1, 16 and 64 MiB; 20 each
    python bench/bench_ring.py --procs 2 --sizes-mib 64 --iters 10
    python bench/bench_ring.py --segment-kib 256 1024 4096   # also sweep the ring's segment size
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launch.multiproc import free_port  # noqa: E402

MiB = 1 << 20


def _timed(fn, x: torch.Tensor) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn(x)
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the collective took as long as its slowest rank
    return dt.item()


def _worker(rank: int, world: int, port: int, args, out_queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from agents.sync.ring import SEGMENT_BYTES, SentBytes, ring_all_reduce

    segments = [k * 1024 for k in args.segment_kib] if args.segment_kib else [SEGMENT_BYTES]
    impls = [(f"ring {s // 1024} KiB" if len(segments) > 1 else "ring",
              lambda x, s=s: ring_all_reduce(x, segment_bytes=s)) for s in segments]
    impls.append(("gloo", dist.all_reduce))
    rows = []
    for mib in args.sizes_mib:
        n = int(mib * MiB) // 4
        g = torch.Generator().manual_seed(rank)
        src = torch.randint(-1000, 1001, (n,), generator=g).to(torch.float32)
        bufs = {name: torch.empty_like(src) for name, _ in impls}
        # Correctness and bytes, once per size, untimed.
        ref = src.clone()
        dist.all_reduce(ref)
        for name, fn in impls[:-1]:
            bufs[name].copy_(src)
            with SentBytes() as sent:
                fn(bufs[name])
            assert torch.equal(bufs[name], ref), f"{name} differs from dist.all_reduce at {mib} MiB"
            assert sent.bytes <= 2 * (world - 1) / world * src.nbytes + src.nbytes / world, sent.bytes
        times = {name: [] for name, _ in impls}
        for i in range(args.warmup + args.iters):
            order = impls if i % 2 == 0 else impls[::-1]
            for name, fn in order:
                bufs[name].copy_(src)
                t = _timed(fn, bufs[name])
                if i >= args.warmup:
                    times[name].append(t)
        rows.append((mib, {name: statistics.median(ts) for name, ts in times.items()},
                     {name: (min(ts), max(ts)) for name, ts in times.items()}))
    if rank == 0:
        out_queue.put(rows)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of gloo's threads (as the tests do)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x {os.cpu_count()} logical cores, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=4, help="processes (R)")
    ap.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 16, 64])
    ap.add_argument("--iters", type=int, default=20, help="timed calls of each implementation per size")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--segment-kib", type=int, nargs="*", help="ring segment sizes to compare (default: the module's)")
    args = ap.parse_args(argv)

    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"
    R = args.procs
    load0 = os.getloadavg()
    start = time.time()
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.spawn(_worker, args=(R, free_port(), args, q), nprocs=R, join=True)
    rows = q.get()
    load1 = os.getloadavg()

    print(f"machine: {_machine()}")
    print(f"R = {R} processes (gloo, 1 thread each), fp32, median of {args.iters} interleaved timings "
          f"after {args.warmup} warm-up; took {time.time() - start:.0f} s; load average "
          f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end")
    names = list(rows[0][1])
    bus = 2 * (R - 1) / R
    header = "| size | " + " | ".join(f"{n} ms (min-max)" for n in names) + " | " + \
        " | ".join(f"{n} bus GB/s" for n in names) + " | " + \
        " | ".join(f"{n} / gloo" for n in names if n != "gloo") + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(names) + len(names) - 1))
    for mib, med, span in rows:
        S = mib * MiB
        cells = [f"{med[n] * 1e3:.1f} ({span[n][0] * 1e3:.1f}-{span[n][1] * 1e3:.1f})" for n in names]
        cells += [f"{bus * S / med[n] / 1e9:.2f}" for n in names]
        cells += [f"**{med['gloo'] / med[n]:.2f}x**" for n in names if n != "gloo"]
        print(f"| {mib:g} MiB | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
