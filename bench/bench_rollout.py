"""Tokens/s of a batched multi-agent rollout (agents.rollout: all agents' prompts of an env step in
ONE DecodeEngine call, the agents sharing one model) against generating agent by agent with the same
model (`rollout(..., batch_agents=False)`: one engine call per agent per step), side by side in one run.

Workload: `Chorus`, a simultaneous-move text env defined here with 8 agents (every agent acts at every
step; 3 rounds; each agent reads the others' last messages), K episodes at once (K=1: the 8 agents of
one episode; K=4: 32 prompts per step). Policies: temperature 1, max_new_tokens 32, no newline stop
(a random model rarely writes one, and fixed lengths keep the work equal); both modes sample the
same tokens (checked: each request draws from its own seeded generator). Model: the default recipe's
size (4 layers, width 256, 8 heads), vocabulary = the BPE tokenizer trained here on env text.
Tokens/s = generated tokens / wall time of the whole rollout (prompt formatting, prefill, decoding,
env steps), median of interleaved rounds, alternating which mode goes first; CPU time beside it.

    python bench/bench_rollout.py [--rounds 5] [--threads N] [--episodes 1 4] [--quick]
                                  [--out bench/results/rollout-cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from pettingzoo import ParallelEnv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from record_losses import cpu_name, write_results  # noqa: E402  (bench/ is this script's first path entry)

from agents.envs import CHARSET, clean  # noqa: E402
from agents.envs.base import text_space  # noqa: E402
from agents.policy import AgentPolicy  # noqa: E402
from agents.rollout import rollout  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from trainer.data import train_bpe_tokenizer  # noqa: E402

N_AGENTS = 8


class Chorus(ParallelEnv):
    """Every agent speaks at every step for `rounds` steps; each sees the round and the others' last
    messages (cut to 24 characters). Reward 1 to an agent whose message contains the round number."""

    metadata = {"name": "chorus", "is_parallelizable": True}

    def __init__(self, n_agents: int = N_AGENTS, rounds: int = 3):
        self.possible_agents = [f"agent{i}" for i in range(n_agents)]
        self.rounds = rounds
        self.agents: list[str] = []
        self.observation_spaces = {a: text_space(512) for a in self.possible_agents}
        self.action_spaces = {a: text_space(256) for a in self.possible_agents}

    def observation_space(self, agent):
        return self.observation_spaces[agent]

    def action_space(self, agent):
        return self.action_spaces[agent]

    def _obs(self):
        others = "; ".join(f"{a}: {m}" for a, m in self.last.items())
        return {a: f"Round {self.t + 1} of {self.rounds}. Last: {others}" for a in self.agents}

    def reset(self, seed=None, options=None):
        self.t = 0
        self.agents = list(self.possible_agents)
        self.last = {a: "" for a in self.agents}
        return self._obs(), {a: {"turn": True} for a in self.agents}

    def step(self, actions):
        self.last = {a: clean(actions.get(a, ""), 24) if isinstance(actions.get(a), str) else "" for a in self.agents}
        rewards = {a: float(str(self.t + 1) in self.last[a]) for a in self.agents}
        self.t += 1
        done = self.t >= self.rounds
        obs = self._obs()
        infos = {a: {"turn": not done} for a in self.agents}
        terms = {a: done for a in self.agents}
        truncs = {a: False for a in self.agents}
        if done:
            self.agents = []
        return obs, rewards, terms, truncs, infos


def tokenizer(vocab: int):
    texts = [f"Round {r} of 3. Last: " + "; ".join(f"agent{i}: message {i * r} about {CHARSET[i * 7:i * 7 + 9]}"
                                                    for i in range(N_AGENTS)) for r in range(1, 40)]
    return train_bpe_tokenizer(texts, vocab)



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--episodes", type=int, nargs="+", default=[1, 4], help="K values (episodes at once)")
    ap.add_argument("--quick", action="store_true", help="tiny model, one round (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rollout-cpu.md"))
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else args.rounds
    command = "python bench/bench_rollout.py " + " ".join(sys.argv[1:] if argv is None else argv)

    tok = tokenizer(512)
    torch.manual_seed(0)
    if args.quick:
        cfg = GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, d_model=64, max_seq_len=256)
    else:
        cfg = GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=4, n_head=8, d_model=256, max_seq_len=256)
    model = GPT(cfg).eval()
    max_new = 8 if args.quick else 32
    policies = {a: AgentPolicy(a, tok, role="chorus member", temperature=1.0, max_new_tokens=max_new,
                               stop_at_newline=False) for a in Chorus().possible_agents}
    modes = {"batched (one call per step)": True, "agent by agent (8 calls per step)": False}

    def run(K, batch_agents):
        return rollout(Chorus, policies, model, episodes=K, generator=torch.Generator().manual_seed(K),
                       batch_agents=batch_agents)

    lines = ["# Multi-agent rollout: all agents in one batched generation vs agent by agent\n",
             f"Command: `{command.strip()}`  ",
             f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads (torch's default here: "
             f"{default_threads}), {platform.system()}, torch {torch.__version__}, Python "
             f"{platform.python_version()}, {os.cpu_count()} CPUs, 1-minute load average "
             f"{os.getloadavg()[0]:.1f} at the start (other processes share the CPUs)  ",
             f"Model: gpt2 style, {cfg.n_layer} layers, width {cfg.d_model}, {cfg.n_head} heads, vocabulary "
             f"{cfg.vocab_size}; env: Chorus, {N_AGENTS} agents acting at every step, 3 steps; temperature 1, "
             f"{max_new} new tokens per action; tokens/s = generated tokens / wall time of the whole rollout, "
             f"median of {rounds} interleaved round(s); CPU s = process CPU time.\n",
             "| episodes K | prompts per step | mode | calls per step | tokens | median s | tokens/s | "
             "median CPU s | ratio (wall) | ratio (CPU) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for K in args.episodes:
        ref = {name: run(K, b) for name, b in modes.items()}  # warm-up, and the tokens of both modes
        outs = list(ref.values())
        same = all([x.tokens for x in outs[0].agents[a].actions] == [x.tokens for x in outs[1].agents[a].actions]
                   for a in policies)
        tokens = outs[0].tokens
        assert tokens == outs[1].tokens
        times = {name: [] for name in modes}
        for r in range(rounds):
            order = list(modes) if r % 2 == 0 else list(modes)[::-1]
            for name in order:
                t0, c0 = time.perf_counter(), time.process_time()
                run(K, modes[name])
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
        med = {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
               for name, ts in times.items()}
        base = med["agent by agent (8 calls per step)"]
        for name, out in ref.items():
            steps = max(out.lengths)
            w, c = med[name]
            lines.append(f"| {K} | {N_AGENTS * K} | {name} | {len(out.calls) // steps} | {tokens} | {w:.3f} | "
                         f"{tokens / w:,.0f} | {c:.3f} | {base[0] / w:.2f}x | {base[1] / c:.2f}x |")
        b = med["batched (one call per step)"]
        summary.append(f"ratio K={K}: batched / agent by agent = {base[0] / b[0]:.2f}x in tokens/s "
                       f"({base[1] / b[1]:.2f}x in CPU time; {N_AGENTS} agents, same tokens in both modes: {same})")
    lines += ["", *[f"- {s}" for s in summary], ""]
    write_results(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
