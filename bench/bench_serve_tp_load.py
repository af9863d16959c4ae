"""Memory of loading a model for serving: one process against each rank of `--tp N` (serve.loader).

A synthetic gpt2-style model (random weights; --layers, --width, --vocab) is saved once with torch.save, as a
run's float32 checkpoint file is. Then, each in a fresh process:
  - one process, as `python -m serve RUN` loads: torch.load, then serve.loader.build_module (the full GPT);
  - each of the N ranks of `--tp N`, as they load: torch.load of the memory-mapped file
    (serve.loader._mapped_loads), then build_module with a Shard (serve.tp.make_shard: the GPT built on the
    meta device, converted with the TP layers, only this rank's slices copied in).
Figures per process: peak resident memory during the load (VmHWM, anonymous and mapped-file pages) above the
resident memory just before it, and anonymous memory (RssAnon) after it, above the same point; the
parameter bytes the process holds. The checkpoint's pages of a memory-mapped load are file cache that the
kernel can drop, not memory of the process's own; they count in VmHWM while a rank reads them.

    python bench/bench_serve_tp_load.py [--tp 2] [--layers 8] [--width 1024] [--vocab 32768]
                                        [--out bench/results/serve-tp-load-cpu.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS", "RssAnon"):
            out[key] = int(line.split()[1]) / 1024
    return out


def worker(args) -> None:
    import torch

    from serve.loader import _mapped_loads, build_module
    from serve.tp import parameter_bytes

    config = json.loads(args.config)
    torch.set_num_threads(1)
    if args.mode == "shard":
        import torch.distributed as dist

        from serve.tp import make_shard

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.tp)
    gc.collect()
    before = _status()
    peak_anon = [before["RssAnon"]]
    done = threading.Event()

    def sample():  # the process's own memory at its highest during the load, read every millisecond
        while not done.wait(0.001):
            peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    if args.mode == "full":
        state = torch.load(args.file, map_location="cpu", weights_only=False)
        model = build_module(config, state)
    else:
        with _mapped_loads():
            state = torch.load(args.file, map_location="cpu", weights_only=False)
        model = build_module(config, state, shard=make_shard())
    del state
    gc.collect()
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    after = _status()
    print(json.dumps({"mode": args.mode, "rank": args.rank, "seconds": seconds,
                      "peak_mib": after["VmHWM"] - before["VmRSS"], "peak_anon_mib": peak_anon[0] - before["RssAnon"],
                      "anon_after_mib": after["RssAnon"] - before["RssAnon"],
                      "param_mib": parameter_bytes(model) / 2 ** 20}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # gloo's threads may abort at interpreter teardown (see tests/test_tensor_parallel.py)


def _run(cmd: list[str]) -> list[dict]:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--out", default="bench/results/serve-tp-load-cpu.md")
    p.add_argument("--worker", dest="mode", choices=["full", "shard"], help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return worker(args)

    import torch

    from launch.multiproc import free_port
    from model import GPT, GPTConfig

    config = {"style": "gpt2", "n_layer": args.layers, "d_model": args.width, "n_head": 16, "vocab_size": args.vocab,
              "max_seq_len": 256, "kernels": "torch"}
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "mp_rank_00_model_states.pt"
        torch.manual_seed(0)
        model = GPT(GPTConfig(**config))
        n_params = sum(p.numel() for p in model.parameters())
        torch.save(model.state_dict(), file)
        del model
        base = [sys.executable, __file__, "--file", str(file), "--config", json.dumps(config), "--tp", str(args.tp)]
        full = _run(base + ["--worker", "full"])
        port = str(free_port())
        procs = [subprocess.Popen(base + ["--worker", "shard", "--rank", str(r), "--port", port], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True) for r in range(args.tp)]
        ranks = [json.loads(x) for pr in procs for x in pr.communicate()[0].splitlines() if x.startswith("{")]
        size_mib = file.stat().st_size / 2 ** 20
    lines = [f"# Loading a model for tensor-parallel serving: memory per process ({args.tp} ranks)", "",
             f"`python bench/bench_serve_tp_load.py --tp {args.tp} --layers {args.layers} --width {args.width} "
             f"--vocab {args.vocab}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: a gpt2-style model of "
             f"{n_params / 1e6:.1f}M parameters ({args.layers} layers, width {args.width}, 16 heads, vocabulary "
             f"{args.vocab}), a float32 checkpoint file of {size_mib:.0f} MiB.", "",
             "Above what the process held just before the load: peak resident (VmHWM: mapped checkpoint pages "
             "included while they are read, page cache the kernel can drop), peak anonymous (the process's own "
             "memory, RssAnon read every millisecond during the load) and anonymous after the load (the state "
             "dict dropped).", "",
             "| process | load s | peak resident MiB | peak anonymous MiB | anonymous after MiB | parameters MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in full + ranks:
        who = "one process (no --tp)" if r["mode"] == "full" else f"--tp {args.tp}, rank {r['rank']}"
        lines.append(f"| {who} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | {r['peak_anon_mib']:.0f} | "
                     f"{r['anon_after_mib']:.0f} | {r['param_mib']:.0f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
