"""Tokens/s of a policy-gradient update (the multi-agent loop's `agent_update`: exact log-probabilities
and entropies of the generated tokens, the REINFORCE loss with the entropy term, backward and step
through the agent's DeepSpeed engine) against our pre-training step (`trainer.step.Stepper` with the
language-model loss) on the same model and the same [rows, T] token block, side by side in one run.

Both steps process rows x T tokens through the whole model; the policy-gradient step scores the
generated part only (`gen` tokens of each row, after a prompt) with the output head and computes the
exact entropy of the full next-token distribution there, while the pre-training step scores every
position. Tokens/s = rows x T / wall time of one step, median of interleaved rounds.

    python bench/bench_pg_step.py [--rows 32] [--prompt 40] [--gen 24] [--rounds 15] [--threads N]
                                  [--out bench/results/pg-step-cpu.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from record_losses import cpu_name, write_results  # noqa: E402  (bench/ is this script's first path entry)

from agents.policy import token_logprobs  # noqa: E402
from agents.rl import objectives as obj  # noqa: E402
from trainer.dims import ParallelDims  # noqa: E402
from trainer.distributed import init_distributed  # noqa: E402
from trainer.recipe import load_recipe  # noqa: E402
from trainer.replica import build_replica  # noqa: E402
from trainer.step import Stepper  # noqa: E402

VOCAB = 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--gen", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench/results/pg-step-cpu.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = init_distributed("gloo")
    dims = ParallelDims.build(1, 0)
    # the default recipe's model (4 layers, width 256), one micro-batch per step, constant lr
    recipe = load_recipe("gpt-tiny", ["train.progress=false", "tracking.wandb=disabled", "optim.schedule=constant",
                                      "optim.warmup_steps=0", f"parallel.micro_batch={args.rows}"])
    T = args.prompt + args.gen
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.rows, T), generator=g)
    lm_targets = torch.randint(0, VOCAB, (args.rows, T), generator=g)
    pg_targets = torch.full((args.rows, T), -100)
    pg_targets[:, args.prompt - 1:T - 1] = ids[:, args.prompt:]
    advantages = torch.randn(args.rows, generator=g)

    pre = build_replica(recipe, dims, dist.device, VOCAB, name="pretrain")
    pg = build_replica(recipe, dims, dist.device, VOCAB, name="agent")
    pre_step = Stepper(pre.engine, dims, dist.device)

    def pg_loss(engine, batch):
        x, y = batch
        pt = token_logprobs(engine.module, x, y)
        return obj.objective_loss("reinforce", pt.logprobs, pt.entropy, pt.mask, advantages, alpha=0.01,
                                  normalizer=args.rows)["loss"]

    pg_step = Stepper(pg.engine, dims, dist.device, loss_fn=pg_loss)
    times = {"pretrain": [], "policy_gradient": []}
    runs = {"pretrain": lambda: pre_step.run([(ids, lm_targets)]),
            "policy_gradient": lambda: pg_step.run([(ids, pg_targets)])}
    for _ in range(3):  # warm-up
        for fn in runs.values():
            fn()
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    tokens = args.rows * T
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    ratio = tps["policy_gradient"] / tps["pretrain"]
    lines = [
        f"rows {args.rows} x T {T} (prompt {args.prompt} + generated {args.gen}), model gpt-tiny "
        f"({pre.n_params / 1e6:.2f}M), {torch.get_num_threads()} threads, {cpu_name()}",
        "",
        f"| step | tokens/s (median of {args.rounds}) |",
        "|---|---|",
        f"| pre-training (Stepper, LM loss) | {tps['pretrain']:,.0f} |",
        f"| policy gradient (agent_update's loss: logprobs + exact entropy + REINFORCE) | "
        f"{tps['policy_gradient']:,.0f} |",
        "",
        f"**ratio policy gradient / pre-training: {ratio:.2f}x** (goal >= 0.9x)",
    ]
    cmd = "python bench/bench_pg_step.py " + " ".join(sys.argv[1:])
    write_results(args.out, "# Policy-gradient update against the pre-training step\n\n"
                  f"Command: `{cmd.strip()}`\n\n" + "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
