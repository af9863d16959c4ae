r"""The multi-agent RL loop: several LLM agents, each with its own policy and DeepSpeed engine, trained
together in one environment (`make train RECIPE=marl-...`).

For each agent i the loop ascends  J(θⁱ) = E[Σ_t γⁱ^t r_tⁱ] + αⁱ·H(πⁱ)  (`agents.rl.objectives`):

    every step:  draw rl.episodes_per_step episode seeds from the run's generator (every rank draws all
                 of them; rank r plays its contiguous share, so the episodes do not depend on the
                 number of processes) -> one batched rollout of this rank's episodes (agents.rollout:
                 every acting agent's prompt of an env step in one KV-cached generation call per
                 model) -> per agent: discounted returns with its γ, advantages (a baseline over the
                 episodes of every rank, or GRPO's groups), the exact log-probabilities and entropies
                 of what it generated under autograd, its loss, backward and step of its own engine.

Engines: one `trainer.replica` per trainable agent over the same ranks (data parallel: DeepSpeed
averages each agent's gradients over the ranks, each rank holding its share of the episodes; the
loss is normalised by the global count over the number of ranks, so the mean is the global one);
ZeRO 0-3 work as for pre-training, as several engines in one process do in DeepSpeed-Chat. A frozen
agent (`trainable: false`) keeps a plain module and no optimizer. With `train.schedule: alternating`
the agents take turns to update, phase by phase (agents/schedule.py); the others act, frozen.

Where a policy starts (`agents.<name>.init_from`): a run directory of ours (its latest checkpoint,
consolidated, and its tokenizer.json), a Hugging Face folder (its tokenizer.json), or null (the
recipe's model.* from its seed, with `data.tokenizer`). The launcher resolves `recipe:<name>` to that
recipe's run, training it first when it has not finished (launch/agents_chain.py).

Checkpoints hold every trainable agent (weights, optimizer, its random stream) and the loop state
(step, the episode generator, moving-average baselines): SIGKILL + `train.resume=auto` reproduces
the uninterrupted run's metrics bit for bit on CPU (tests/test_marl_train.py).
Metrics: `agent/<name>/return|entropy|success|invalid|kl|loss` per step in metrics.jsonl (and W&B),
`agents.png` (return and entropy per agent), evaluation rows (greedy, fixed episodes; with
`env.eval_options` a second evaluation), summary.json with the team's success and each agent's figures.
With `env.eval_metrics` (keys of the env's final infos, e.g. traffic's mean_waiting_time and teleports)
each evaluation also averages those over its episodes (`eval_metric/<key>`; summary `eval_metrics`), and
an env with a `baseline_metrics(seed)` method (traffic: SUMO's fixed-time programme) is run once on the
same evaluation episodes: summary `baseline` and `eval_ratio` (evaluation / baseline, per key).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import yaml

from trainer import checkpoint as ckpt
from trainer import faults
from trainer.dims import ParallelDims
from trainer.distributed import DistInfo
from trainer.errors import TrainingStopped, UsageError
from trainer.files import atomic_write_text
from trainer.recipe import recipe_to_dict
from trainer.resume import find_resume
from trainer.run_context import RunContext
from trainer.schema import Recipe

from .config import check_agents
from .envs import make_env
from .games.settings import GAME_ENV
from .learners import Agent, build_learners, gather_objects, sum_over_ranks, update
from .rollout import SEED_HIGH, rollout
from .schedule import active_agents, phase_index
from .tracking import AgentTracker

__all__ = ["train_agents"]

EVAL_SEED_OFFSET = 1_000_003


# ---- episodes ---------------------------------------------------------------------------------------


def episode_seeds(gen: torch.Generator, episodes: int, group: int) -> tuple[list[int], list[int]]:
    """The step's episode seeds and env seeds (episodes of one GRPO group share their env seed)."""
    seeds = torch.randint(0, SEED_HIGH, (episodes,), generator=gen).tolist()
    groups = torch.randint(0, SEED_HIGH, (episodes // group,), generator=gen).tolist()
    return seeds, [groups[k // group] for k in range(episodes)]


def _share(items: list, dims: ParallelDims) -> list:
    n = len(items) // dims.dp
    return items[dims.dp_rank * n:(dims.dp_rank + 1) * n]


def _mean_or_none(total: float, count: float) -> float | None:
    return total / count if count else None


# ---- evaluation ---------------------------------------------------------------------------------------


def eval_seeds(recipe: Recipe, dims: ParallelDims) -> tuple[int, tuple[list[int], list[int]]]:
    """The evaluation's episode count and its (episode seeds, env seeds): the same at every evaluation."""
    n = recipe.env.eval_episodes
    n -= n % dims.dp
    gen = torch.Generator().manual_seed((recipe.env.seed or recipe.train.seed) + EVAL_SEED_OFFSET)
    return n, episode_seeds(gen, n, 1)


def evaluate(agents: dict[str, Agent], recipe: Recipe, dims: ParallelDims, options: dict | None,
             swap: dict[str, str] | None = None) -> dict:
    """Collective: env.eval_episodes fixed episodes (the same at every evaluation), greedy actions.
    swap: agent -> the agent whose policy (model and adapter) it acts with, prompts unchanged."""
    n, (seeds, env_seeds) = eval_seeds(recipe, dims)
    greedy, models = {}, {}
    for name, ag in agents.items():
        source = agents[(swap or {}).get(name, name)]
        p = copy.copy(ag.policy)
        p.temperature = 0.0
        p.adapter = source.policy.adapter
        greedy[name], models[name] = p, source.module
    env = _env_factory(recipe)
    with torch.no_grad():
        out = rollout(env, greedy, models, seeds=_share(seeds, dims),
                      env_seeds=_share(env_seeds, dims), reset_options=options or None,
                      max_steps=recipe.rl.max_env_steps)
    figures = _episode_figures(out, dims, n)
    if recipe.env.eval_metrics:
        figures["metrics"] = _final_info_means(out.final_infos, recipe.env.eval_metrics, dims)
    if recipe.env.eval_group_by:
        figures["success_by"] = _success_by(out, recipe.env.eval_group_by, dims)
    return figures


def _final_value(infos: dict[str, dict], key: str):
    """`key` of an episode's final infos (the first agent's info that has it), or None."""
    return next((info[key] for info in infos.values() if info.get(key) is not None), None)


def _final_info_means(finals: list[dict], keys: list[str], dims) -> dict[str, float | None]:
    """Collective: each key's mean over every rank's episodes (`finals`: one dict per episode, agent ->
    final info); None where no episode has it."""
    local = []
    for key in keys:
        values = [float(v) for f in finals if (v := _final_value(f, key)) is not None]
        local += [float(sum(values)), float(len(values))]
    tot = sum_over_ranks(local, dims)
    return {k: _mean_or_none(tot[2 * i], tot[2 * i + 1]) for i, k in enumerate(keys)}


def baseline_summary(recipe: Recipe, dims: ParallelDims, metrics: dict[str, float | None]) -> dict:
    """Collective: with env.eval_metrics, summary `eval_metrics` (the final evaluation's means) and, when
    the env has `baseline_metrics(seed)`, that baseline on the evaluation episodes' env seeds (each rank
    its share): `baseline` (the same keys' means) and `eval_ratio` (evaluation / baseline; None where
    the baseline is 0 or missing)."""
    keys = recipe.env.eval_metrics
    if not keys:
        return {}
    out = {"eval_metrics": metrics}
    env = _env_factory(recipe)()
    fn = getattr(env, "baseline_metrics", None)
    if fn is None:
        return out
    try:
        finals = [{"baseline": fn(s)} for s in _share(eval_seeds(recipe, dims)[1][1], dims)]
    finally:
        env.close()
    base = _final_info_means(finals, keys, dims)
    out["baseline"] = base
    out["eval_ratio"] = {k: (metrics[k] / base[k] if metrics.get(k) is not None and base[k] else None) for k in keys}
    return out


def _success_by(out, key: str, dims) -> dict[str, float]:
    """Team success per value of the final infos' `key` over every rank's episodes (collective)."""
    pairs = []
    for infos in out.final_infos:
        info = next(iter(infos.values()), {})
        if key in info and info.get("success") is not None:
            pairs.append((str(info[key]), bool(info["success"])))
    totals: dict[str, list[int]] = {}
    for value, ok in gather_objects(pairs, dims):
        t = totals.setdefault(value, [0, 0])
        t[0] += ok
        t[1] += 1
    return {v: wins / n for v, (wins, n) in sorted(totals.items())}


def _episode_figures(out, dims: ParallelDims, episodes: int) -> dict:
    """Team success and per agent return, success, invalid actions and per-token entropy (collective)."""
    names = list(out.agents)
    local = []
    for name in names:
        ar = out.agents[name]
        ents = [e for act in ar.actions for e in act.entropies]
        succ = [s for s in ar.success if s is not None]
        local += [sum(ar.returns), float(sum(succ)), float(len(succ)), float(sum(ar.invalid_actions)),
                  float(len(ar.actions)), float(sum(ents)), float(len(ents))]
    tot = sum_over_ranks(local, dims)
    per = {}
    for i, name in enumerate(names):
        ret, s, ns, inv, acts, ent, nt = tot[7 * i:7 * i + 7]
        per[name] = {"return": ret / episodes, "success": _mean_or_none(s, ns),
                     "invalid": _mean_or_none(inv, acts), "entropy": _mean_or_none(ent, nt)}
    team = [v["success"] for v in per.values() if v["success"] is not None]
    return {"success": team[0] if team else None, "agents": per}


def _env_factory(recipe: Recipe):
    return lambda: make_env(recipe.env.name, **recipe.env.args)


def _faulty(factory):
    """The test suite's env fault (trainer.faults ENV_RAISE_AT_STEP): envs whose step raises."""

    def make():
        env = factory()

        def step(actions):
            raise ValueError("injected env fault")

        env.step = step
        return env

    return make


# ---- the loop -------------------------------------------------------------------------------------------


def train_agents(recipe: Recipe, dist: DistInfo) -> dict:
    """Train every agent of `recipe` (see the module docstring). Collective over the world."""
    if recipe.env.name == GAME_ENV:  # two-player OpenSpiel games: self-play to an equilibrium
        from .games.selfplay import train_game

        return train_game(recipe, dist)
    if recipe.env.name == "debate_arith":  # debate and multi-agent fine-tuning (agents/debate/loop.py)
        from .debate.loop import train_debate

        return train_debate(recipe, dist)
    dims = ParallelDims.build(dist.world_size, dist.rank)
    check_agents(recipe, dist.world_size)  # the launcher checked already; a rank started otherwise checks here
    ctx = RunContext(recipe, dims, dist.device)
    cfg_dict = recipe_to_dict(recipe)
    is_main = ctx.is_main
    resume_from, resume_meta = find_resume(recipe, ctx.checkpoints, ctx.group)
    agents, learners = build_learners(recipe, dims, dist.device)
    names = [lr.replica.name for lr in learners]
    with_baseline = [ag for ag in agents.values() if ag.baseline is not None]
    if is_main:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ctx.run_dir / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))
        (ctx.run_dir / "tokenizers").mkdir(exist_ok=True)
        for ag in agents.values():  # what `make export` puts beside each agent's weights
            ag.policy.tokenizer.save(str(ctx.run_dir / "tokenizers" / f"{ag.name}.json"))
    ctx.barrier()

    gen = torch.Generator().manual_seed(recipe.env.seed if recipe.env.seed is not None else recipe.train.seed)
    step = 0
    if resume_from is not None:
        if resume_meta.get("components") != names:
            raise UsageError(f"checkpoint {resume_from} holds {resume_meta.get('components')}, this recipe trains "
                             f"{names}: resume with the same agents")
        loop_state = ckpt.load([lr.replica.component for lr in learners], resume_from, resume_meta, ctx.rank)
        step = loop_state["step"]
        gen.set_state(loop_state["episode_generator"])
        for ag in with_baseline:
            ag.baseline.load_state_dict(loop_state["baselines"][ag.name])
    tracker = AgentTracker.open(ctx, cfg_dict, step if resume_from is not None else None, list(agents))

    def save(at: int) -> Path:
        loop_state = {"step": at, "episode_generator": gen.get_state(),
                      "baselines": {ag.name: ag.baseline.state_dict() for ag in with_baseline}}
        full = [lr for lr in learners if not lr.lora]
        meta = {"step": at, "config": cfg_dict, "agents": list(agents), "world_size": dims.dp,
                "zero_stage": recipe.parallel.zero_stage, "tp": 1, "pp": 1,
                "model_config": learners[0].replica.model_config.to_dict(),
                # what `make export` needs: each full-weight agent's model, each LoRA engine's adapters
                "agent_model_configs": {lr.agents[0]: lr.replica.model_config.to_dict() for lr in full},
                "lora": {lr.replica.name: {"config": lr.replica.model_config.to_dict(), "adapters": lr.lora}
                         for lr in learners if lr.lora}}
        return ctx.save([lr.replica.component for lr in learners], at, loop_state, meta)

    def run_eval(at: int) -> dict:
        row = evaluate(agents, recipe, dims, None)
        flat = {"step": at, "eval_success": row["success"],
                **{f"eval/{n}/{k}": v for n, d in row["agents"].items() for k, v in d.items()},
                **{f"eval_metric/{k}": v for k, v in row.get("metrics", {}).items()}}
        if recipe.env.eval_options:
            opt = evaluate(agents, recipe, dims, recipe.env.eval_options)
            flat["eval_success_options"] = opt["success"]
            row["with_options"] = opt
        if recipe.env.eval_swap:
            row["swapped"] = evaluate(agents, recipe, dims, None, recipe.env.eval_swap)
            flat["eval_success_swapped"] = row["swapped"]["success"]
        tracker.log(flat)
        return row

    if is_main:
        who = ", ".join(f"{n} ({ag.settings.algorithm}, alpha {ag.settings.alpha}"
                        + (f", LoRA r={ag.settings.lora_rank}" if ag.adapter else "")
                        + (f", policy of {ag.policy_name}" if ag.policy_name != n else "")
                        + ("" if ag.learner else ", frozen") + ")" for n, ag in agents.items())
        print(f"run: {ctx.run_dir}  agents: {who}  env: {recipe.env.name}  processes: {dims.dp}"
              + (f"  resumed from {resume_from.name}" if resume_from else ""), flush=True)
    bar = None
    if is_main and recipe.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=recipe.train.max_steps, initial=step, desc="marl", unit="step", dynamic_ncols=True)

    def periodic_eval(at: int) -> None:
        ev = run_eval(at)
        if bar is not None:
            bar.write(f"step {at}: eval success {ev['success']}")
        if is_main:
            tracker.plot()

    signals = ctx.watch_signals()
    env = _env_factory(recipe)
    env_faults = faults.env_raise_steps()
    E, G = recipe.rl.episodes_per_step, recipe.rl.group_size
    stop_reason = None
    last = {}
    try:
        while step < recipe.train.max_steps:
            t0 = time.perf_counter()
            seeds, env_seeds = episode_seeds(gen, E, G)
            try:
                with torch.no_grad():
                    out = rollout(_faulty(env) if step + 1 in env_faults else env,
                                  {n: ag.policy for n, ag in agents.items()},
                                  {n: ag.module for n, ag in agents.items()}, seeds=_share(seeds, dims),
                                  env_seeds=_share(env_seeds, dims), max_steps=recipe.rl.max_env_steps)
            except RuntimeError as e:
                if not str(e).startswith("env "):
                    raise
                # The env's own failure: say where, keep the last checkpoint as it is (nothing is saved).
                kept = ckpt.latest_checkpoint(ctx.checkpoints, warn=lambda _: None)
                raise TrainingStopped(f"step {step + 1}: {e}; " + (f"the last checkpoint {kept} is kept, continue with "
                                      "train.resume=auto once the env is fixed" if kept else "no checkpoint yet"), 1) from None
            t_roll = time.perf_counter() - t0
            figures = _episode_figures(out, dims, E)
            updates = {}
            active = active_agents(recipe, step)  # None: everyone; else this phase's policy owners
            for lr in learners:
                updates.update(update(lr, agents, out, recipe, dims, E, active))
            step += 1
            dt = time.perf_counter() - t0
            tokens = sum_over_ranks([float(out.tokens)], dims)[0]
            row = {"step": step, "success": figures["success"], "tokens_per_s": tokens / dt,
                   "rollout_s": t_roll, "step_time_s": dt}
            if active is not None:
                row["phase"] = phase_index(recipe, step - 1)
            for n, d in figures["agents"].items():
                row.update({f"agent/{n}/{k}": v for k, v in d.items()})
                for k, v in updates.get(n, {}).items():
                    row[f"agent/{n}/{k}"] = v
                if n in updates:
                    row[f"agent/{n}/lr"] = _lr_of(agents[n])
            last = row
            if step % recipe.train.log_every == 0 or step == recipe.train.max_steps:
                tracker.log(row)
            if bar is not None:
                bar.set_postfix(success=f"{figures['success'] or 0:.2f}", refresh=False)
                bar.update(1)
            stop_signal = ctx.end_of_step(step, periodic_eval, save, signals)
            if stop_signal:
                stop_reason = stop_signal
                break
    finally:
        if bar is not None:
            bar.close()
    if stop_reason is not None:
        ctx.stop(step, stop_reason, save)

    folder = save(step)
    final = run_eval(step)
    summary = {
        "run_dir": str(ctx.run_dir), "steps": step, "env": recipe.env.name, "success": final["success"],
        # return, success, invalid: the greedy evaluation; entropy and KL: the sampling policy at the
        # last training step (a greedy rollout's tokens say little about the policy's spread)
        "agents": {n: {"return": d["return"], "success": d["success"], "invalid": d["invalid"],
                       "entropy": last.get(f"agent/{n}/entropy"), "kl": last.get(f"agent/{n}/kl"),
                       "train_return": last.get(f"agent/{n}/return")} for n, d in final["agents"].items()},
        "train_success": last.get("success"), "checkpoint": str(folder),
    }
    if "success_by" in final:
        summary["success_by"] = final["success_by"]
        summary["success_min_by"] = min(final["success_by"].values()) if final["success_by"] else None
    if "swapped" in final:
        summary["success_swapped"] = final["swapped"]["success"]
        summary["eval_swap"] = recipe.env.eval_swap
    if "with_options" in final:
        summary["success_with_eval_options"] = final["with_options"]["success"]
        summary["eval_options"] = recipe.env.eval_options
    summary.update(baseline_summary(recipe, dims, final.get("metrics", {})))
    if is_main:
        tracker.finish()
        atomic_write_text(ctx.run_dir / "summary.json", json.dumps(summary, indent=1))
        _print_summary(summary)
    return summary


def _lr_of(agent: Agent) -> float:
    """The agent's learning rate this step: a LoRA engine has one parameter group per training agent
    (in order), a full-weight engine's groups (decay, no decay) share one rate."""
    lrs = agent.learner.replica.engine.get_lr()
    return lrs[agent.learner.groups.index(agent.policy_name)] if agent.learner.lora else lrs[0]


def _print_summary(s: dict) -> None:
    lines = [f"\nrun directory:  {s['run_dir']}", f"team success:   {_fmt(s['success'])} (greedy, evaluation episodes)"]
    if s.get("success_by"):
        lines.append("success by value: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in s["success_by"].items()))
    if "success_swapped" in s:
        lines.append(f"with policies swapped {s['eval_swap']}: success {_fmt(s['success_swapped'])}")
    if "success_with_eval_options" in s:
        lines.append(f"with {s['eval_options']}: success {_fmt(s['success_with_eval_options'])}")
    if "eval_metrics" in s:
        lines.append("evaluation: " + ", ".join(f"{k} {_fmt(v)}" for k, v in s["eval_metrics"].items()))
    if "baseline" in s:
        lines.append("baseline:   " + ", ".join(f"{k} {_fmt(v)}" for k, v in s["baseline"].items())
                     + "  ratio: " + ", ".join(f"{k} {_fmt(v)}" for k, v in s["eval_ratio"].items()))
    for n, d in s["agents"].items():
        lines.append(f"  {n:<12} return {_fmt(d['return'])}  invalid {_fmt(d['invalid'])}  "
                     f"entropy {_fmt(d['entropy'])} nats/token while sampling  KL to the start {_fmt(d['kl'])}")
    print("\n".join(lines), flush=True)


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
