r"""Self-play of LLM agents in a two-player OpenSpiel game, with an exact average policy, measured by
NashConv (`make train RECIPE=game-kuhn`; agents.train hands every recipe with `env.name: openspiel`
here).

    every step:  play rl.episodes_per_step episodes of the env (agents.envs.games) in one batch: at each
                 env step, every running episode's acting player's prompt goes through one forward of
                 its model and the action is drawn from pi(. | I), the softmax over the legal actions'
                 tokens (agents.games.actions) -> the current policy's probabilities on EVERY
                 information state join the average policy (agents.games.tables.AveragePolicy,
                 reach-weighted: fictitious play's mixture of strategies) -> per agent, REINFORCE with
                 the entropy term on the sampled decisions, one step of its engine.
    every train.eval_every steps and at the end: NashConv of the average policy (and of the current
                 policy, "last iterate") by OpenSpiel's exploitability.nash_conv.

The best-response learner is the policy itself, trained by the agents' objective J = E[G] + alpha H
(G: the player's return at the end of the episode, over the game's largest payoff so every game's
returns lie in [-1, 1]; A = G - the batch mean of that agent's returns; H the entropy of pi over the
legal actions; the loss summed over the agent's decisions and divided by the episodes). The average
policy is the exact running average over every information state rather than a network distilled
from play (NFSP's supervised average): the games have few states (Kuhn 12, Leduc 936), so the
average costs one forward over them per step and has no error of its own; a distilled average would
add a second model and an approximation to the thing being measured. The last iterate of
policy-gradient self-play cycles around a mixed equilibrium; its reach-weighted average converges
(tests/test_games_selfplay.py shows both in rock-paper-scissors).

`rl.average_weighting: linear` weighs iterate t by t in that average. `rl.best_response: exact` replaces
the whole step by full-width XFP with the LLM as the average policy (agents.games.xfp): every
rl.average_every steps OpenSpiel's exact best responses to the LLM's table join the average of all best
responses so far, XFP's target, and every step is one distillation step toward it (`distill_update`);
no episodes are played. `rl.best_response: psro` is the same loop with PSRO's target (agents.games.psro):
every rl.average_every steps exact best responses to the Nash mixture of a growing population join it,
and the LLM is distilled toward the new population's Nash mixture (the population is checkpointed).

Agents: player_0 and player_1 (the env's); `policy_of: player_0` on player_1 makes one shared
policy (one engine) for both seats. Checkpoints hold the engines, the step, the episode generator,
the average policy's sums and the training seconds: SIGKILL + train.resume=auto reproduces the
uninterrupted run bit for bit. Outputs: metrics.jsonl (`nash_conv`, `nash_conv_last`, per agent
return / entropy / loss; for games with one state per player, every action's average and current
probability), games.png (NashConv against steps and against training seconds), policy.json (the
average policy, every information state), summary.json (`nash_conv`, `nash_conv_last`, `train_s`;
for matrix games the equilibrium OpenSpiel's CFR+ finds and the average's largest distance to it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from trainer import checkpoint as ckpt
from trainer.dims import ParallelDims
from trainer.distributed import DistInfo
from trainer.errors import UsageError
from trainer.files import atomic_write_text
from trainer.recipe import recipe_to_dict
from trainer.resume import find_resume
from trainer.run_context import RunContext
from trainer.schema import Recipe

from ..envs import make_env
from ..envs.games import GameEnv, load_game
from ..learners import Agent, build_learners
from ..policy import AgentPolicy
from .actions import action_names, action_token_ids, game_tokenizer, legal_logprobs
from .psro import Population, meta_target, psro_iteration, psro_iterations_done
from .settings import check_game_settings
from .tables import AveragePolicy, InfoStates, nash_conv, write_policy_json
from .tracking import GameTracker
from .xfp import iterations_done, xfp_iteration

__all__ = ["Decisions", "distill_update", "play", "policy_table", "train_game"]

SEED_HIGH = 2**62
# The prompt is the information-state string alone: its last characters are the latest events, next to
# the position that predicts the action. Behind the agents' usual template ("{agent} ({role})\n...
# {agent}:") a from-scratch model's last position barely sees the card at first and the policy
# collapsed onto one action for every state (measured: Kuhn NashConv stuck at 0.667 in 100 steps).
GAME_TEMPLATE = "{observation}"


# ---- playing ----------------------------------------------------------------------------------------


class Decisions:
    """The decisions of one batch of episodes: per agent its rows (episode, prompt, legal mask,
    chosen action id), and every episode's returns."""

    def __init__(self, agents: list[str], episodes: int):
        self.rows: dict[str, list[tuple[int, list[int], list[bool], int]]] = {a: [] for a in agents}
        self.returns = np.zeros((episodes, len(agents)))


def _probabilities(agent: Agent, prompts, legal, tokens) -> torch.Tensor:
    with torch.no_grad():
        return legal_logprobs(agent.module, prompts, legal, tokens).double().exp()


def play(envs: list, env_seeds: list[int], agents: dict[str, Agent], tokens: dict[str, list[int]],
         num_actions: int, gen: torch.Generator, max_steps: int) -> Decisions:
    """One batch of episodes, env k reset with env_seeds[k]; each env step, one forward per model over
    every acting player's prompt, actions drawn with `gen` (one draw per decision, in episode order)."""
    names = list(agents)
    out = Decisions(names, len(envs))
    obs, infos = {}, {}
    for k, (env, s) in enumerate(zip(envs, env_seeds)):
        obs[k], infos[k] = env.reset(seed=int(s))
    running = list(range(len(envs)))
    for _ in range(max_steps):
        if not running:
            break
        acting = [(k, envs[k].turn_agents[0]) for k in running]
        prompts = {k: agents[a].policy.prompt_ids(obs[k][a]) for k, a in acting}
        legal = {k: [i in infos[k][a]["legal_action_ids"] for i in range(num_actions)] for k, a in acting}
        chosen: dict[int, int] = {}
        by_module: dict[int, list[tuple[int, str]]] = {}
        for k, a in acting:
            by_module.setdefault(id(agents[a].module), []).append((k, a))
        for group in by_module.values():
            rows = [k for k, _ in group]
            # Agents sharing a model share its forward; each row is scored with its agent's action tokens
            # (the same for every agent of a game's tokenizer).
            a0 = group[0][1]
            probs = _probabilities(agents[a0], [prompts[k] for k in rows],
                                   torch.tensor([legal[k] for k in rows]), tokens[a0])
            draws = torch.multinomial(probs, 1, generator=gen).squeeze(1).tolist()
            chosen.update(zip(rows, draws))
        for k, a in acting:
            out.rows[a].append((k, prompts[k], legal[k], chosen[k]))
            _step(envs[k], k, a, chosen[k], obs, infos, out, names)
        running = [k for k in running if envs[k].agents]
    return out


def _step(env, k: int, agent: str, action: int, obs: dict, infos: dict, out: Decisions, names: list[str]) -> None:
    """Play OpenSpiel action `action` for `agent` in episode k's env (by its name, as an agent writes it)."""
    obs[k], rewards, _, _, infos[k] = env.step({agent: env.state.action_to_string(env.player_of(agent), action)})
    for j, n in enumerate(names):
        out.returns[k, j] += rewards.get(n, 0.0)


def policy_table(space: InfoStates, agents: dict[str, Agent], state_prompts: dict[str, list],
                 tokens: dict[str, list[int]]) -> np.ndarray:
    """[states, actions] float64: every information state's pi, from the agent of the state's player
    (renormalised in float64 so each row sums to 1 to the last bit)."""
    table = np.zeros(space.legal.shape, dtype=np.float64)
    for name, (rows, prompts) in state_prompts.items():
        probs = _probabilities(agents[name], prompts, torch.from_numpy(space.legal[rows]), tokens[name]).numpy()
        table[rows] = probs / probs.sum(axis=1, keepdims=True)
    return table


# ---- the update -------------------------------------------------------------------------------------


def _agent_loss(agent: Agent, module, rows, returns: np.ndarray, column: int, episodes: int, scale: float,
                tokens: list[int]) -> tuple[torch.Tensor, dict]:
    """REINFORCE with the entropy term over the agent's decisions (see the module docstring)."""
    episode_ids = [r[0] for r in rows]
    g = torch.tensor(returns[episode_ids, column] / scale, dtype=torch.float32)
    adv = g - g.mean() if agent.settings.baseline == "mean" else g
    logp = legal_logprobs(module, [r[1] for r in rows], torch.tensor([r[2] for r in rows]), tokens)
    chosen = logp[torch.arange(len(rows)), torch.tensor([r[3] for r in rows])]
    p = logp.exp()
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(dim=1)
    policy_loss = -(adv * chosen).sum() / episodes
    entropy_loss = -agent.settings.alpha * entropy.sum() / episodes
    return policy_loss + entropy_loss, {"policy_loss": float(policy_loss.detach()),
                                        "entropy_loss": float(entropy_loss.detach()),
                                        "entropy": float(entropy.detach().mean())}


def update(learner, agents: dict[str, Agent], batch: Decisions, episodes: int, scale: float,
           tokens: dict[str, list[int]]) -> dict[str, dict]:
    """One step of the learner's engine on the sum of its agents' losses."""
    names = list(agents)
    figures: dict[str, dict] = {}

    def loss_fn(engine, _):
        total = None
        for n in learner.agents:
            if not batch.rows[n]:
                continue
            loss, figures[n] = _agent_loss(agents[n], engine.module, batch.rows[n], batch.returns, names.index(n),
                                           episodes, scale, tokens[n])
            total = loss if total is None else total + loss
        return total

    return _step_on(learner, loss_fn, figures)


def _step_on(learner, loss_fn, figures: dict[str, dict]) -> dict[str, dict]:
    """One optimizer step of the learner's engine on `loss_fn` (in the learner's RNG stream); each of
    its agents' figures gain the step's loss (None when it was not finite)."""
    learner.stepper.loss_fn = loss_fn
    with learner.replica.component.rng.active():
        result = learner.stepper.run([None])
    for n in learner.agents:
        figures.setdefault(n, {})["loss"] = float(result.loss) if result.finite else None
    return figures


def distill_update(learner, agents: dict[str, Agent], state_prompts: dict[str, tuple[list, list]],
                   space: InfoStates, target: np.ndarray, tokens: dict[str, list[int]],
                   picks: dict[str, list[int]] | None = None) -> dict[str, dict]:
    """rl.best_response=exact or psro: one step of the learner's engine on the KL divergence from the XFP / PSRO target
    to the policy, averaged over its agents' information states (all, or per agent the positions
    `picks[agent]` in its list: rl.distill_states) (agents.games.xfp)."""
    figures: dict[str, dict] = {}
    chosen = {n: list(range(len(state_prompts[n][0]))) if picks is None else picks[n] for n in learner.agents}
    states = sum(len(chosen[n]) for n in learner.agents)

    def loss_fn(engine, _):
        total = None
        for n in learner.agents:
            rows = [state_prompts[n][0][j] for j in chosen[n]]
            prompts = [state_prompts[n][1][j] for j in chosen[n]]
            legal = torch.from_numpy(space.legal[rows])
            logp = legal_logprobs(engine.module, prompts, legal, tokens[n])
            q = torch.from_numpy(target[rows]).float()
            kl_rows = (q * (torch.log(q.clamp_min(1e-30)) - logp.masked_fill(~legal, 0.0))).sum(dim=1)
            loss = kl_rows.sum() / states
            figures[n] = {"kl": float(kl_rows.detach().mean())}
            total = loss if total is None else total + loss
        return total

    return _step_on(learner, loss_fn, figures)


# ---- the loop ---------------------------------------------------------------------------------------


def _with_game_tokenizer(recipe: Recipe, ctx: RunContext, game) -> Recipe:
    """A from-scratch policy (init_from null) without data.tokenizer reads the game's own tokenizer
    (agents.games.actions.game_tokenizer), written into the run directory."""
    if recipe.data.tokenizer or all(a.init_from for a in recipe.agents.values()):
        return recipe
    path = ctx.run_dir / "game_tokenizer.json"
    if ctx.is_main:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        game_tokenizer(game).save(str(path))
    ctx.barrier()
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"tokenizer": str(path)})})


def _matrix_equilibrium(game_name: str, params: dict) -> np.ndarray | None:
    """For a game with one information state per player: the equilibrium OpenSpiel's CFR+ reaches in
    2,000 iterations ([2, actions]), the reference of summary `max_abs_from_equilibrium`."""
    from open_spiel.python.algorithms import cfr

    game = load_game(game_name, params)
    space = InfoStates(game)
    if len(space) != 2:
        return None
    solver = cfr.CFRPlusSolver(game)
    for _ in range(2000):
        solver.evaluate_and_update_policy()
    avg = solver.average_policy()
    return np.stack([avg.action_probability_array[avg.state_lookup[s]] for s in space.strings])


def train_game(recipe: Recipe, dist: DistInfo) -> dict:
    """Self-play of the recipe's game (see the module docstring)."""
    check_game_settings(recipe, dist.world_size)
    dims = ParallelDims.build(dist.world_size, dist.rank)
    ctx = RunContext(recipe, dims, dist.device)
    env_args = dict(recipe.env.args)
    probe = make_env(recipe.env.name, **env_args)
    game = probe.game
    scale = probe.max_utility
    recipe = _with_game_tokenizer(recipe, ctx, game)
    cfg_dict = recipe_to_dict(recipe)
    resume_from, resume_meta = find_resume(recipe, ctx.checkpoints, ctx.group)
    agents, learners = build_learners(recipe, dims, dist.device)
    names = [lr.replica.name for lr in learners]
    for ag in agents.values():
        ag.policy = AgentPolicy(ag.name, ag.policy.tokenizer, template=GAME_TEMPLATE)
    space = InfoStates(game)
    average = AveragePolicy(space, recipe.rl.average_weighting)
    # exact (XFP) and psro: no episodes; the LLM is distilled toward a target that an exact oracle builds
    exact = recipe.rl.best_response in ("exact", "psro")
    population = Population(game, space) if recipe.rl.best_response == "psro" else None
    target = None  # the current XFP / PSRO target (its iteration: oracle_iterations())
    oracle_figures: dict = {}  # PSRO: the population's size, meta-game value and support

    def oracle_iterations() -> int:
        return psro_iterations_done(population) if population is not None else iterations_done(average)
    action_list = action_names(game)
    try:
        tokens = {n: action_token_ids(ag.policy.tokenizer, action_list) for n, ag in agents.items()}
    except ValueError as e:
        raise UsageError(f"agents: {e}") from None
    state_prompts = {}
    for n in agents:
        rows = [i for i in range(len(space)) if space.player[i] == GameEnv.player_of(n)]
        state_prompts[n] = (rows, [agents[n].policy.prompt_ids(space.strings[i]) for i in rows])
    if ctx.is_main:
        atomic_write_text(ctx.run_dir / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))
        (ctx.run_dir / "tokenizers").mkdir(exist_ok=True)
        for ag in agents.values():
            ag.policy.tokenizer.save(str(ctx.run_dir / "tokenizers" / f"{ag.name}.json"))

    gen = torch.Generator().manual_seed(recipe.env.seed if recipe.env.seed is not None else recipe.train.seed)
    step, train_s = 0, 0.0
    if resume_from is not None:
        if resume_meta.get("components") != names:
            raise UsageError(f"checkpoint {resume_from} holds {resume_meta.get('components')}, this recipe trains "
                             f"{names}: resume with the same agents")
        loop_state = ckpt.load([lr.replica.component for lr in learners], resume_from, resume_meta, ctx.rank)
        step, train_s = loop_state["step"], loop_state["train_s"]
        gen.set_state(loop_state["episode_generator"])
        average.load_state_dict(loop_state["average_policy"])
        if population is not None:
            population.load_state_dict(loop_state["psro_population"])
            if len(population):  # the equilibrium last solved, restored: the same target
                target, oracle_figures = meta_target(population, solve=False)
        elif exact and iterations_done(average):
            target = average.table()
    tracker = GameTracker.open(ctx, cfg_dict, step if resume_from is not None else None, list(agents))
    single_states = len(space) == 2  # a matrix game: log every action's probability

    def save(at: int) -> Path:
        loop_state = {"step": at, "episode_generator": gen.get_state(), "train_s": train_s,
                      "average_policy": average.state_dict()}
        if population is not None:
            loop_state["psro_population"] = population.state_dict()
        meta = {"step": at, "config": cfg_dict, "agents": list(agents), "world_size": dims.dp,
                "zero_stage": recipe.parallel.zero_stage, "tp": 1, "pp": 1,
                "model_config": learners[0].replica.model_config.to_dict(),
                "agent_model_configs": {lr.agents[0]: lr.replica.model_config.to_dict() for lr in learners},
                "lora": {}}
        return ctx.save([lr.replica.component for lr in learners], at, loop_state, meta)

    def average_table(current: np.ndarray) -> np.ndarray:
        """The measured policy: the exact average of the iterates, or (exact) the LLM's own table."""
        return current if exact else average.table()

    iteration_key = "psro_iteration" if population is not None else "xfp_iteration"

    def measure(at: int) -> dict:
        current = policy_table(space, agents, state_prompts, tokens)
        avg = average_table(current)
        row = {"step": at, "train_s": train_s, "nash_conv": nash_conv(game, space, avg),
               "nash_conv_last": nash_conv(game, space, current)}
        if exact and target is not None:  # the exact XFP / PSRO mixture the LLM is being fitted to
            row["nash_conv_target"] = nash_conv(game, space, target)
            row[iteration_key] = oracle_iterations()
        if single_states:
            for i in range(len(space)):
                for a in np.flatnonzero(space.legal[i]):
                    row[f"average/player_{space.player[i]}/{action_list[a]}"] = float(avg[i, a])
                    row[f"last/player_{space.player[i]}/{action_list[a]}"] = float(current[i, a])
        tracker.log(row)
        return row

    def periodic(at: int) -> None:
        row = measure(at)
        if ctx.is_main:
            tracker.plot()
            print(f"step {at}: NashConv {row['nash_conv']:.4f} (last iterate {row['nash_conv_last']:.4f}), "
                  f"{train_s:.0f} s", flush=True)

    if ctx.is_main:
        print(f"run: {ctx.run_dir}  game: {env_args.get('game')} ({len(space)} information states)  agents: "
              + ", ".join(f"{n} (alpha {ag.settings.alpha}" + (f", policy of {ag.policy_name}" if ag.policy_name != n
                                                                  else "") + ")" for n, ag in agents.items())
              + (f"  resumed from {resume_from.name}" if resume_from else "")
              + ("  best response: PSRO (double oracle, the LLM distilled toward the population's Nash mixture)"
                 if population is not None else
                 "  best response: exact (XFP, the LLM distilled toward the average)" if exact else ""), flush=True)
    if step == 0:
        measure(0)
    E = recipe.rl.episodes_per_step
    envs = [] if exact else [make_env(recipe.env.name, **env_args) for _ in range(E)]
    signals = ctx.watch_signals()
    stop_reason = None
    last: dict = {}
    while step < recipe.train.max_steps:
        t0 = time.perf_counter()
        figures = {}
        if exact:
            if step % recipe.rl.average_every == 0:  # the next XFP / PSRO iteration
                current = policy_table(space, agents, state_prompts, tokens)
                if population is not None:
                    target, oracle_figures = psro_iteration(population, current)
                else:
                    target, oracle_figures = xfp_iteration(game, space, average, current), {}
            picks = None
            if recipe.rl.distill_states is not None:
                picks = {n: torch.randperm(len(state_prompts[n][0]), generator=gen)[:recipe.rl.distill_states].tolist()
                         for n in agents}
            for lr in learners:
                figures.update(distill_update(lr, agents, state_prompts, space, target, tokens, picks))
        else:
            env_seeds = torch.randint(0, SEED_HIGH, (E,), generator=gen).tolist()
            batch = play(envs, env_seeds, agents, tokens, space.num_actions, gen, recipe.rl.max_env_steps)
            if step % recipe.rl.average_every == 0:  # sigma_t, the policy that played this step
                average.add(policy_table(space, agents, state_prompts, tokens))
            for lr in learners:
                figures.update(update(lr, agents, batch, E, scale, tokens))
        step += 1
        train_s += time.perf_counter() - t0
        row = {"step": step, "step_time_s": time.perf_counter() - t0}
        if exact:
            row[iteration_key] = oracle_iterations()
            if population is not None:
                row.update(oracle_figures)
        for j, n in enumerate(agents):
            if not exact:
                row[f"agent/{n}/return"] = float(batch.returns[:, j].mean())
            for k, v in figures.get(n, {}).items():
                row[f"agent/{n}/{k}"] = v
        last = row
        if step % recipe.train.log_every == 0 or step == recipe.train.max_steps:
            tracker.log(row)
        stop_signal = ctx.end_of_step(step, periodic, save, signals)
        if stop_signal:
            stop_reason = stop_signal
            break
    if stop_reason is not None:
        ctx.stop(step, stop_reason, save)

    folder = save(step)
    final = measure(step)
    table = average_table(policy_table(space, agents, state_prompts, tokens))
    summary = {"run_dir": str(ctx.run_dir), "steps": step, "env": recipe.env.name, "game": env_args.get("game"),
               "information_states": len(space), "nash_conv": final["nash_conv"],
               "nash_conv_last": final["nash_conv_last"], "train_s": train_s,
               "best_response": recipe.rl.best_response, "average_weighting": recipe.rl.average_weighting,
               "nash_conv_uniform": nash_conv(game, space, space.uniform()),
               "policy": str(ctx.run_dir / "policy.json"), "checkpoint": str(folder),
               "agents": {n: {k: last.get(f"agent/{n}/{k}") for k in (("kl", "loss") if exact else
                                                                        ("return", "entropy", "loss"))}
                          for n in agents}}
    if exact:
        summary["psro_iterations" if population is not None else "xfp_iterations"] = oracle_iterations()
        summary["nash_conv_target"] = final.get("nash_conv_target")
        if population is not None:
            summary["psro_population"] = len(population)
    if single_states:
        eq = _matrix_equilibrium(env_args.get("game"), env_args.get("params") or {})
        summary["equilibrium"] = {f"player_{space.player[i]}": [float(x) for x in eq[i]] for i in range(len(space))}
        summary["average_policy"] = {f"player_{space.player[i]}": [float(x) for x in table[i]] for i in range(len(space))}
        summary["max_abs_from_equilibrium"] = float(np.abs(table - eq).max())
    if ctx.is_main:
        write_policy_json(ctx.run_dir / "policy.json", env_args.get("game"), env_args.get("params") or {}, space, table,
                          {"steps": step, "nash_conv": final["nash_conv"]})
        tracker.plot()
        tracker.finish()
        atomic_write_text(ctx.run_dir / "summary.json", json.dumps(summary, indent=1))
        measured = "the LLM's own table" if exact else "the average policy"
        print(f"\nrun directory: {ctx.run_dir}\nNashConv of {measured} {summary['nash_conv']:.4f} (uniform "
              f"{summary['nash_conv_uniform']:.4f}, last iterate {summary['nash_conv_last']:.4f}) after {step} steps, "
              f"{train_s:.0f} s of training" + (f"\nlargest distance to the equilibrium "
                                                 f"{summary['max_abs_from_equilibrium']:.4f}" if single_states else ""),
              flush=True)
    return summary
