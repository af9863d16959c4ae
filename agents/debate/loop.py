r"""Multi-agent debate and multi-agent fine-tuning without ground truth (recipe debate-arith; the driver
`train_debate`, dispatched from agents.train for `env.name: debate_arith`).

The agents (agent_0 .. agent_{N-1}, env.args.agents = N, each `agents.<name>` its own full weights and
DeepSpeed engine, all started from the same base) debate problems a+b*c+d-e*f over R = env.args.rounds
rounds (agents.envs.debate_arith): one batched rollout (agents.rollout) per debate set, every round one
generation call per agent's model over every problem. Then, each of `debate.iterations` (K) times:

    1. debate `debate.train_problems` fresh problems (never the held-out ones, agents/debate/problems.py),
       sampling at each agent's temperature with seeds drawn from (seed, iteration);
    2. pseudo-label each problem by the majority of the last round (>= debate.min_votes votes, no tie):
       ground truth is never read for training;
    3. fine-tune each agent on its own responses that agree with the pseudo-label, round 1 as a generator,
       rounds 2..R as a critic that corrected or confirmed (agents/debate/selection.py), by cross-entropy
       on the response tokens (agents/debate/sft.py), its data order from its own generator;
    4. evaluate on the fixed held-out set and checkpoint.

Separate critics (debate.critics=separate, the multi-agent fine-tuning paper's generator and critic
models): N more engines critic_0.. (each from its agent's settings and the same base) answer in agent_i's
seat from round 2 on (the rollout's models per step); agent_i fine-tunes on its round-1 rows only,
critic_i on the rounds-2..R rows of that seat. Default shared: one set of weights plays both roles.

Baseline (debate.baseline, in the same run, side by side in metrics and summary): single-agent
self-training. One more engine, `single`, from the first agent's settings and the same base; per
iteration it samples S = debate.samples (default N x R, the debate's responses per problem, so both
generate about as many tokens: both counts are logged) answers to each of the same training problems,
takes the majority of its own samples as the pseudo-label and fine-tunes on its agreeing samples, the
same SFT settings.

Evaluation (iteration 0 = the base, then after every iteration), on the held-out problems with fixed
sampling seeds (the same at every evaluation; sampling, not greedy: greedy agents started from one base
would say the same thing): single = each agent's round-1 accuracy, averaged over agents; vote = the
plurality of round 1; debate = the plurality of round R; diversity = the fraction of agent pairs whose
round-1 answers differ. The baseline: baseline/single (the mean accuracy of N samples) and baseline/vote
(their plurality). Rows in metrics.jsonl keyed step = iteration, debate.png, summary.json with the table
and the issue's goals.

Checkpoints at every iteration boundary hold every engine (weights, optimizer, random stream) and the loop
state (iteration, SFT steps so far, token counts); everything an iteration draws comes from seeds fixed by
(seed, iteration), so SIGKILL anywhere in an iteration and `train.resume=auto` redo that iteration and
reproduce the uninterrupted run bit for bit on CPU. The fault hook RECIPES_FAULT_KILL_AFTER_STEP counts
SFT steps here (over the whole run), so a test can kill mid-iteration. `make export` writes one folder per
agent (the baseline's as `single/`): the agents checkpoint layout of agents.train.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from trainer import checkpoint as ckpt
from trainer import faults
from trainer.dims import ParallelDims
from trainer.distributed import DistInfo
from trainer.errors import UsageError
from trainer.files import atomic_write_text
from trainer.recipe import recipe_to_dict
from trainer.resume import find_resume
from trainer.run_context import RunContext
from trainer.schema import Recipe

from ..envs import make_env
from ..envs.debate_arith import majority
from ..learners import build_learners
from ..policy import AgentPolicy
from ..rollout import SEED_HIGH, agents_per_model, rollout
from . import problems
from .selection import debate_rows, single_rows
from .sft import sft_batches, sft_step
from .tracking import DebateTracker

__all__ = ["train_debate"]

SINGLE = "single"
EVAL_OFFSET = 1_000_003


def _key(*parts: int) -> int:
    """A 62-bit seed from integers (the same in every process, unlike a salted hash)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") % (2**62)


def _seeds(seed: int, *key: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(_key(seed, *key))
    return torch.randint(0, SEED_HIGH, (n,), generator=gen).tolist()


def _critics(recipe: Recipe, names: list[str]) -> dict[str, str]:
    """agent -> its separate critic model's name (debate.critics=separate), else {}."""
    return {a: f"critic_{i}" for i, a in enumerate(names)} if recipe.debate.critics == "separate" else {}


def _full_recipe(recipe: Recipe, names: list[str], critic_of: dict[str, str]) -> Recipe:
    """The recipe with the engines the debate adds: the baseline and the separate critics, each with the
    settings of the agent it stands beside (after the agents, so the agents' engines and random streams
    are the same with or without them)."""
    agents = dict(recipe.agents)
    if recipe.debate.baseline:
        agents[SINGLE] = agents[names[0]]
    for a, c in critic_of.items():
        agents[c] = agents[a]
    # rl.kl_ref builds each engine's frozen starting policy (Agent.ref): debate.kl_base's reference
    kl_ref = recipe.debate.kl_base > 0
    return recipe.model_copy(update={"agents": agents, "rl": recipe.rl.model_copy(update={"kl_ref": kl_ref})})


def _play(env_args: dict, probs: list, policies: dict, models: dict, seeds: list[int], rounds: int,
          max_rows: int = 1024):
    """The debates of `probs` (episode k: problem k, sampling seed k) through the batched rollout, in chunks
    of episodes holding at most `max_rows` rows per model (the decode engines' KV caches). models: agent ->
    model, or a list of those per round (separate critics). Returns a namespace with `agents` (name ->
    .actions, episodes numbered over all chunks) and `final_infos`."""
    chunk = max(1, max_rows // max(agents_per_model(models, list(policies)).values()))
    actions: dict[str, list] = {a: [] for a in policies}
    finals: list[dict] = []
    for start in range(0, len(probs), chunk):
        part = probs[start:start + chunk]
        envs = [make_env("debate_arith", **env_args) for _ in part]
        with torch.no_grad():
            out = rollout(envs, policies, models, seeds=seeds[start:start + chunk],
                          reset_options=[{"problem": list(p)} for p in part], max_steps=rounds)
        for a, ar in out.agents.items():
            for x in ar.actions:
                x.episode += start
                actions[a].append(x)
        finals += out.final_infos
    return SimpleNamespace(agents={a: SimpleNamespace(actions=v) for a, v in actions.items()}, final_infos=finals)


def _tokens(out) -> int:
    return sum(len(x.tokens) for ar in out.agents.values() for x in ar.actions)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def train_debate(recipe: Recipe, dist: DistInfo) -> dict:
    """Debate, pseudo-label, fine-tune, K times (see the module docstring). One process."""
    dims = ParallelDims.build(dist.world_size, dist.rank)
    ctx = RunContext(recipe, dims, dist.device)
    env_args = dict(recipe.env.args)
    probe = make_env("debate_arith", **env_args)
    names, R, N = list(probe.possible_agents), probe.rounds, probe.n
    lo, hi = probe.min_operand, probe.max_operand
    d = recipe.debate
    for n, a in recipe.agents.items():
        if a.adapter != "none" or not a.trainable or a.policy_of is not None:
            raise UsageError(f"agents.{n}: debate agents train their own full weights (adapter: none, trainable: true, "
                             "no policy_of)")
    S = d.samples or N * R
    seed = recipe.env.seed if recipe.env.seed is not None else recipe.train.seed
    critic_of = _critics(recipe, names)
    full = _full_recipe(recipe, names, critic_of)
    cfg_dict = recipe_to_dict(recipe)
    resume_from, resume_meta = find_resume(recipe, ctx.checkpoints, ctx.group)
    agents, learners = build_learners(full, dims, dist.device)
    components = [lr.replica.name for lr in learners]
    learner_of = {lr.agents[0]: lr for lr in learners}
    if ctx.is_main:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.run_dir / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))
        (ctx.run_dir / "tokenizers").mkdir(exist_ok=True)
        for ag in agents.values():
            ag.policy.tokenizer.save(str(ctx.run_dir / "tokenizers" / f"{ag.name}.json"))

    heldout = problems.heldout(seed, d.heldout_problems, lo, hi)
    exclude = set(heldout)
    iteration, sft_count, tokens = 0, 0, Counter()
    if resume_from is not None:
        if resume_meta.get("components") != components:
            raise UsageError(f"checkpoint {resume_from} holds {resume_meta.get('components')}, this recipe trains "
                             f"{components}: resume with the same agents and debate.baseline")
        state = ckpt.load([lr.replica.component for lr in learners], resume_from, resume_meta, ctx.rank)
        iteration, sft_count, tokens = state["iteration"], state["sft_steps"], Counter(state["tokens"])
    tracker = DebateTracker.open(ctx, cfg_dict, iteration if resume_from is not None else None, names)

    debaters = {a: agents[a].policy for a in names}
    debate_models = {a: agents[a].module for a in names}
    if critic_of:  # round 1 by the agents, rounds 2..R by their critics, in the agents' seats
        debate_models = [debate_models, {a: agents[c].module for a, c in critic_of.items()}]
    single_policies: dict = {}
    if d.baseline:  # every sample is the single agent, prompted under the first agent's name
        sp = agents[SINGLE].policy
        single_policies = {f"agent_{j}": AgentPolicy(names[0], sp.tokenizer, temperature=sp.temperature,
                                                     top_p=sp.top_p, max_new_tokens=sp.max_new_tokens)
                           for j in range(max(S, N))}

    def play_single(probs, seeds, samples):
        pol = {f"agent_{j}": single_policies[f"agent_{j}"] for j in range(samples)}
        return _play({**env_args, "agents": samples, "rounds": 1}, probs, pol,
                     {a: agents[SINGLE].module for a in pol}, seeds, 1)

    def save(at: int) -> Path:
        loop_state = {"iteration": at, "sft_steps": sft_count, "tokens": dict(tokens)}
        meta = {"step": at, "config": cfg_dict, "agents": list(learner_of), "world_size": 1,
                "zero_stage": recipe.parallel.zero_stage, "tp": 1, "pp": 1,
                "model_config": learners[0].replica.model_config.to_dict(),
                "agent_model_configs": {n: lr.replica.model_config.to_dict() for n, lr in learner_of.items()},
                "lora": {}}
        return ctx.save([lr.replica.component for lr in learners], at, loop_state, meta)

    def evaluate(at: int) -> dict:
        out = _play(env_args, heldout, debaters, debate_models, _seeds(seed, EVAL_OFFSET, n=len(heldout)), R)
        finals = [f[names[0]] for f in out.final_infos]
        row = {"step": at, "iteration": at,
               "single": _mean(c for f in finals for c in f["first_round_correct"]),
               "vote": _mean(f["first_round_vote"] == f["expected"] for f in finals),
               "debate": _mean(f["success"] for f in finals),
               "diversity": _mean(f["diversity"] for f in finals)}
        for i, a in enumerate(names):
            row[f"agent/{a}/single"] = _mean(f["first_round_correct"][i] for f in finals)
            row[f"agent/{a}/final"] = _mean(f["answers"][-1][i] == f["expected"] for f in finals)
        if d.baseline:
            b = play_single(heldout, _seeds(seed, EVAL_OFFSET, 1, n=len(heldout)), N)
            bf = [f["agent_0"] for f in b.final_infos]
            row["baseline/single"] = _mean(c for f in bf for c in f["first_round_correct"])
            row["baseline/vote"] = _mean(f["success"] for f in bf)
            row["baseline/diversity"] = _mean(f["diversity"] for f in bf)
        return row

    if ctx.is_main:
        print(f"run: {ctx.run_dir}  debate: {N} agents x {R} rounds, {d.iterations} iterations of "
              f"{d.train_problems} problems, held-out {len(heldout)}"
              + (f"  separate critics: {', '.join(critic_of.values())}" if critic_of else "")
              + (f"  baseline: single-agent self-training, {S} samples per problem" if d.baseline else "")
              + (f"  resumed from {resume_from.name}" if resume_from else ""), flush=True)
    if resume_from is None:
        row = evaluate(0)
        tracker.log(row)
        _print(row)
    signals = ctx.watch_signals()
    while iteration < d.iterations:
        t0 = time.perf_counter()
        probs = problems.training(seed, iteration, d.train_problems, exclude, lo, hi)
        out = _play(env_args, probs, debaters, debate_models, _seeds(seed, iteration, n=len(probs)), R)
        rows, kinds = debate_rows(out.agents, len(probs), d.min_votes, critic_of, d.agent_data == "split")
        labels = [f[names[0]] for f in out.final_infos]
        stats = {"train/debate_tokens": _tokens(out),
                 "train/labelled": kinds[names[0]]["labelled"] / len(probs),
                 # measurement only: how often the pseudo-labels were right (never used for training)
                 "train/label_right": _label_right(labels, d.min_votes)}
        data = dict(rows)
        if d.baseline:
            sout = play_single(probs, _seeds(seed, iteration, 1, n=len(probs)), S)
            data[SINGLE], skinds = single_rows(sout.agents, len(probs), d.min_votes)
            stats["train/single_tokens"] = _tokens(sout)
            stats["baseline/labelled"] = skinds["labelled"] / len(probs)
            stats["baseline/rows"] = len(data[SINGLE])
        for i, (name, lr) in enumerate(learner_of.items()):
            gen = torch.Generator().manual_seed(_key(seed, iteration, 2, i))
            losses = []
            for batch in sft_batches(data[name], d.sft_epochs, d.sft_batch, gen):
                # debate.sft_tempered: each learner fits the distribution it samples from (agents/debate/sft.py)
                loss = sft_step(lr, batch, agents[name].ref, d.kl_base,
                                agents[name].policy.temperature if d.sft_tempered else 1.0)
                losses.append(loss)
                sft_count += 1
                faults.maybe_kill(faults.KILL_AFTER_STEP, sft_count)
            key = "baseline" if name == SINGLE else f"agent/{name}"
            stats[f"{key}/sft_loss"] = _mean(x for x in losses if x is not None) if losses else None
            stats[f"{key}/sft_steps"] = len(losses)
            if name != SINGLE:
                stats[f"{key}/rows"] = len(data[name])
            if name in names:  # per seat: with separate critics, corrected / confirmed are its critic's rows
                for kind in ("generator", "corrected", "confirmed"):
                    stats[f"{key}/{kind}"] = kinds[name][kind]
        tokens["debate"] += stats["train/debate_tokens"]
        tokens["single"] += stats.get("train/single_tokens", 0)
        iteration += 1
        row = {**evaluate(iteration), **stats, "iteration_s": time.perf_counter() - t0}
        tracker.log(row)
        _print(row)
        save(iteration)
        if ctx.is_main:
            tracker.plot()
        stop = signals.agreed(ctx.group)
        if stop and iteration < d.iterations:
            ctx.stop(iteration, stop, save)

    folder = ckpt.latest_checkpoint(ctx.checkpoints) if iteration else None
    folder = folder or save(iteration)  # K = 0: the base's agents
    summary = _summary(tracker.rows if ctx.is_main else [], ctx, names, d, S, tokens, folder)
    if ctx.is_main:
        tracker.plot()
        tracker.finish()
        atomic_write_text(ctx.run_dir / "summary.json", json.dumps(summary, indent=1))
        print(f"\nrun directory: {ctx.run_dir}\n" + summary["table"], flush=True)
    return summary


def _label_right(finals, min_votes) -> float:
    right = []
    for f in finals:
        label = majority(f["answers"][-1], min_votes)
        if label is not None:
            right.append(label == f["expected"])
    return _mean(right)


def _print(row: dict) -> None:
    text = (f"iteration {row['iteration']}: single {row['single']:.3f}  vote {row['vote']:.3f}  debate "
            f"{row['debate']:.3f}  diversity {row['diversity']:.3f}")
    if "baseline/vote" in row:
        text += f"  | baseline single {row['baseline/single']:.3f}  vote {row['baseline/vote']:.3f}"
    print(text, flush=True)


def _summary(rows: list[dict], ctx, names, d, S, tokens, folder) -> dict:
    evals = {}
    for r in rows:
        if "debate" in r:
            evals[r["iteration"]] = r
    table_rows = [evals[k] for k in sorted(evals)]
    keys = ["single", "vote", "debate", "diversity", "baseline/single", "baseline/vote"]
    per_iteration = [{k: r.get(k) for k in ["iteration", *keys]} for r in table_rows]
    first, last = (table_rows[0], table_rows[-1]) if table_rows else ({}, {})
    goals = {}
    if first:
        goals["debate_minus_single_before"] = first["debate"] - first["single"]
        goals["debate_beats_single_by_5_before"] = goals["debate_minus_single_before"] >= 0.05
        goals["diversity_ratio"] = (last["diversity"] / first["diversity"]) if first["diversity"] else None
        goals["diversity_kept_80"] = goals["diversity_ratio"] is not None and goals["diversity_ratio"] >= 0.8
        if "baseline/vote" in last:
            goals["debate_minus_baseline_after"] = last["debate"] - last["baseline/vote"]
            goals["beats_baseline_by_2_after"] = goals["debate_minus_baseline_after"] >= 0.02
    head = "| iteration | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1) + "\n"
    table = head + "".join("| " + " | ".join([str(r["iteration"])] + [
        "-" if r.get(k) is None else f"{r[k]:.3f}" for k in keys]) + " |\n" for r in per_iteration)
    return {"run_dir": str(ctx.run_dir), "agents": names, "iterations": d.iterations, "per_iteration": per_iteration,
            "final": per_iteration[-1] if per_iteration else None, "goals": goals, "baseline_samples": S,
            "generated_tokens": dict(tokens), "checkpoint": str(folder), "table": table,
            "per_agent": {a: {"single": last.get(f"agent/{a}/single"), "final": last.get(f"agent/{a}/final")}
                          for a in names}}
