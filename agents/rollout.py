r"""Batched rollouts of K episodes of a multi-agent text environment, and the token-level tensors the
objectives (`agents.rl.objectives`) take.

    policies = {"speaker": AgentPolicy("speaker", tok), "listener": AgentPolicy("listener", tok)}
    out = rollout(lambda: make_env("signaling"), policies, {"speaker": gpt, "listener": gpt},
                  episodes=64, generator=torch.Generator().manual_seed(0))
    sp = out.agents["speaker"]
    sp.returns, sp.success, sp.invalid_actions            # per episode
    steps = sp.step_tensors()                             # rewards / step_mask / acted, [K, S]
    batch = sp.token_batch()                              # input_ids / targets / mask / advantages, [N, T]
    batch.set_advantages(discounted_returns(steps.rewards, 0.9, steps.step_mask)[steps.acted])

One env step of the K episodes at a time. At every step, each running episode's acting agents
(`env.turn_agents` for the turn-based envs of agents.envs; for another ParallelEnv the agents whose
infos have "turn" true, all of them when infos have no "turn") format their observations into prompts
(`AgentPolicy.prompt_ids`, cut on the left to the room the context leaves after max_new_tokens), and
ALL those prompts of the step go through ONE call of a KV-cached continuous-batching
`model.generate.DecodeEngine` per model: agents whose model is the same object are batched together
(one engine per model, prompts of several agents in one call, each with its own sampling settings),
agents with different models are generated model by model. Agents that share a model and differ by
their LoRA adapter (`AgentPolicy(..., adapter=name)`, agents.lora) are in that one call too, each
prompt with its agent's adapter (the engine applies one adapter per row). `batch_agents=False` instead makes one call
per agent (the agent-by-agent baseline of bench/bench_rollout.py; same tokens). The actions
(`AgentPolicy.action_text`) go to `env.step`; episodes that end leave the batch while the others go on,
so episodes of different lengths finish independently. `Rollout.calls` lists every generation call
(its group and number of prompts).

Random numbers: episode k has a seed s_k (given as `seeds`, or drawn from `generator`, a
torch.Generator per rollout; torch's default generator when neither is given) and its own
`torch.Generator` seeded with s_k, from which it draws, in order, its env's reset seed and one seed per
action it samples (the request's own generator in the engine, which draws by inversion, one uniform
number per token). So what episode k does depends on s_k and the models only: the same seeds give the
same episodes, and a batch of K episodes gives, episode by episode, the actions of K rollouts of one
episode each with the same seeds. Bit for bit, that holds for the tokens (and so texts, rewards,
returns): the log-probabilities the engine reports are computed in a batched forward whose float32
rounding depends on the batch's shape (GEMM blocking), so they agree within ~1e-6, not exactly; a
sampled token could differ only if its uniform draw fell within that distance of a boundary of the
cumulative distribution (tests/test_rollout.py checks tokens for equality, log-probabilities within
1e-5, greedy rollouts, and the sampled frequencies against the softmax).

Rewards: `AgentRollout.rewards[k][t]` is the agent's reward from the env at step t of episode k (0 when
the env gave it none), `returns[k]` their plain sum (gamma is the objectives' business),
`dones[k][t]` termination or truncation, `success[k]` the final infos' "success" (None when the env
has none), `invalid_actions[k]` the final infos' "invalid_actions" (else the count of actions whose
step info said "invalid"). An exception in env.step stops the rollout with one line naming the env,
episode, step and acting agents.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.generate import DecodeEngine

from .policy import IGNORE_INDEX, AgentPolicy, build_inputs, unwrap_model

__all__ = ["SEED_HIGH", "Action", "AgentRollout", "Rollout", "StepTensors", "TokenBatch", "agents_per_model",
           "build_token_batch", "rollout"]

SEED_HIGH = 2**63 - 1


@dataclass
class Action:
    """One action an agent generated: at env step `step` of episode `episode`, from `prompt`, the
    generated `tokens` (a final eos/stop token included) with the engine's log-probabilities and
    entropies (of the distribution sampled from), the text the env received, why generation ended,
    and whether the env found the action invalid."""

    agent: str
    episode: int
    step: int
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    entropies: list[float]
    text: str
    finish_reason: str
    invalid: bool = False


@dataclass
class StepTensors:
    """Episode-step tensors of one agent, [K, S] (S the longest episode): rewards (float64),
    step_mask (the steps each episode has), acted (the steps where the agent acted; `x[acted]` lists
    them in (episode, step) order, the order of `AgentRollout.actions` and of `token_batch` rows),
    dones."""

    rewards: torch.Tensor
    step_mask: torch.Tensor
    acted: torch.Tensor
    dones: torch.Tensor


@dataclass
class TokenBatch:
    """Sequence-layout tensors of N actions (see `agents.policy.build_inputs`), all [N, T] except the
    per-row ones:

        input_ids     prompt + generated tokens, right-padded with pad_id
        targets       the generated token that the logits at each position predict, else ignore_index
        mask          targets != ignore_index (bool): the positions the objectives sum over
        advantages    float32 zeros to fill (`set_advantages`)
        old_logprobs  float32: the engine's log-probability of each target (0 off the mask)
        episode, step, prompt_lens, gen_lens   [N] long

    `agents.policy.token_logprobs(model, batch.input_ids, batch.targets)` gives the logprobs and
    entropies on this layout, with `batch.mask` as their mask."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    episode: torch.Tensor
    step: torch.Tensor
    prompt_lens: torch.Tensor
    gen_lens: torch.Tensor

    def set_advantages(self, per_row) -> torch.Tensor:
        """advantages[n, t] = per_row[n] on the mask, 0 elsewhere (per_row [N]); returns it."""
        a = torch.as_tensor(per_row, dtype=torch.float32).reshape(-1).to(self.mask.device)
        if a.numel() != self.mask.shape[0]:
            raise ValueError(f"set_advantages takes one value per row ({self.mask.shape[0]}), got {a.numel()}")
        self.advantages = torch.where(self.mask, a[:, None], torch.zeros((), dtype=torch.float32))
        return self.advantages

    def to(self, device) -> TokenBatch:
        return TokenBatch(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


def build_token_batch(actions: Sequence[Action], pad_id: int = 0, ignore_index: int = IGNORE_INDEX) -> TokenBatch:
    """The TokenBatch of `actions`, one row each in the order given."""
    ids, targets = build_inputs([a.prompt for a in actions], [a.tokens for a in actions], pad_id, ignore_index)
    mask = targets != ignore_index
    old = torch.zeros(mask.shape, dtype=torch.float32)
    for n, a in enumerate(actions):
        p = len(a.prompt)
        old[n, p - 1:p - 1 + len(a.tokens)] = torch.tensor(a.logprobs, dtype=torch.float32)
    long = torch.long
    return TokenBatch(ids, targets, mask, torch.zeros(mask.shape, dtype=torch.float32), old,
                      torch.tensor([a.episode for a in actions], dtype=long),
                      torch.tensor([a.step for a in actions], dtype=long),
                      torch.tensor([len(a.prompt) for a in actions], dtype=long),
                      torch.tensor([len(a.tokens) for a in actions], dtype=long))


@dataclass
class AgentRollout:
    """One agent's part of a rollout of K episodes (see the module docstring): actions in (episode,
    step) order, and per episode the rewards and done flags of every env step, the return, the
    success and the invalid actions."""

    agent: str
    actions: list[Action] = field(default_factory=list)
    rewards: list[list[float]] = field(default_factory=list)
    dones: list[list[bool]] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    success: list[bool | None] = field(default_factory=list)
    invalid_actions: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Generated tokens over all actions."""
        return sum(len(a.tokens) for a in self.actions)

    def step_tensors(self) -> StepTensors:
        """[K, S] rewards, step_mask, acted and dones (see StepTensors)."""
        K = len(self.rewards)
        S = max([len(r) for r in self.rewards], default=0)
        rewards = torch.zeros(K, S, dtype=torch.float64)
        mask = torch.zeros(K, S, dtype=torch.bool)
        dones = torch.zeros(K, S, dtype=torch.bool)
        acted = torch.zeros(K, S, dtype=torch.bool)
        for k, (r, d) in enumerate(zip(self.rewards, self.dones)):
            rewards[k, :len(r)] = torch.tensor(r, dtype=torch.float64)
            mask[k, :len(r)] = True
            dones[k, :len(d)] = torch.tensor(d, dtype=torch.bool)
        for a in self.actions:
            acted[a.episode, a.step] = True
        return StepTensors(rewards, mask, acted, dones)

    def token_batch(self, pad_id: int = 0, ignore_index: int = IGNORE_INDEX) -> TokenBatch:
        """`build_token_batch` of this agent's actions (rows in (episode, step) order)."""
        return build_token_batch(self.actions, pad_id, ignore_index)


@dataclass
class Rollout:
    """K episodes: per agent an AgentRollout; the episodes' seeds, their envs' reset seeds, their
    lengths in env steps and final infos; every generation call as (group, prompts) where group is
    the agents batched together (joined by "+"); generated tokens in all."""

    agents: dict[str, AgentRollout]
    seeds: list[int]
    env_seeds: list[int]
    lengths: list[int]
    final_infos: list[dict[str, dict]]
    calls: list[tuple[str, int]]

    @property
    def episodes(self) -> int:
        return len(self.seeds)

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.agents.values())


def _draw(g: torch.Generator) -> int:
    return int(torch.randint(0, SEED_HIGH, (1,), generator=g))


def _env_name(env) -> str:
    return str(getattr(env, "metadata", {}).get("name", type(env).__name__))


def _acting(env, infos) -> list[str]:
    turn = getattr(env, "turn_agents", None)
    if turn is not None:
        return list(turn)
    return [a for a in env.agents if infos.get(a, {}).get("turn", True)]


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def rollout(env: Callable[[], Any] | Sequence[Any], policies: Mapping[str, AgentPolicy],
            models: Mapping[str, Any] | Any, *, episodes: int | None = None,
            generator: torch.Generator | None = None, seeds: Sequence[int] | None = None,
            reset_options: Mapping | Sequence[Mapping | None] | None = None, max_steps: int = 1000,
            batch_agents: bool = True, max_len: int | None = None,
            env_seeds: Sequence[int] | None = None) -> Rollout:
    """Run K episodes to their ends with batched generation (see the module docstring).

    env: a callable making a new env (called K times) or a sequence of K envs (one per episode).
    policies: agent -> AgentPolicy, for every agent of the env. models: agent -> model, or one model
    for all (a model.GPT, or a wrapper holding it as `.module`), or a list of those, one per step of an
    episode, the last for every later step (a debate's critics answer from round 2 on). episodes: K
    (default: len(seeds), or the number of envs). generator / seeds: where the episode seeds come from
    (seeds wins). reset_options: options for every env's reset, or one per episode. max_steps: an episode still
    running after this many steps is an error. batch_agents: False = one generation call per agent
    instead of per model. max_len: the engines' positions per request (default: each model's
    max_seq_len). env_seeds: the envs' reset seeds, one per episode, instead of each episode's first
    draw (GRPO's groups: episodes of one initial state with their own action seeds); the draw is
    made either way, so the action seeds do not change."""
    envs = _make_envs(env, episodes, seeds)
    K = len(envs)
    if seeds is None:
        seeds = torch.randint(0, SEED_HIGH, (K,), generator=generator).tolist()
    seeds = [int(s) for s in seeds]
    if isinstance(reset_options, Mapping) or reset_options is None:
        options = [reset_options] * K
    else:
        options = list(reset_options)
        if len(options) != K:
            raise ValueError(f"rollout: reset_options has {len(options)} entries for {K} episodes; give one dict "
                             "for all or one per episode")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"rollout: max_steps must be an integer >= 1, got {max_steps!r}")

    agents = list(envs[0].possible_agents)
    _check_policies(policies, agents, _env_name(envs[0]))
    model_maps = _model_maps(models, agents)

    def model_at(agent: str, step: int):
        return model_maps[min(step, len(model_maps) - 1)][agent]

    # An engine per model object, with a slot per episode for each agent it serves at one step.
    per_model = _agents_per_model(model_maps)
    engines: dict[int, DecodeEngine] = {}

    def engine_for(m) -> DecodeEngine:
        if id(m) not in engines:
            engines[id(m)] = DecodeEngine(m, max_slots=K * per_model[id(m)], max_len=max_len)
        return engines[id(m)]

    out = {a: AgentRollout(a, rewards=[[] for _ in range(K)], dones=[[] for _ in range(K)]) for a in agents}
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    drawn = [_draw(g) for g in gens]
    if env_seeds is not None and len(env_seeds) != K:
        raise ValueError(f"rollout: env_seeds has {len(env_seeds)} entries for {K} episodes")
    env_seeds = drawn if env_seeds is None else [int(s) for s in env_seeds]
    obs: list[dict] = [{} for _ in range(K)]
    infos: list[dict] = [{} for _ in range(K)]
    for k, e in enumerate(envs):
        try:
            obs[k], infos[k] = e.reset(seed=env_seeds[k], options=options[k])
        except Exception as err:
            raise RuntimeError(f"env {_env_name(e)!r} raised in reset of episode {k} (seed {seeds[k]}): "
                               f"{_one_line(err)}") from err
    lengths = [0] * K
    final: list[dict] = [{} for _ in range(K)]
    calls: list[tuple[str, int]] = []
    active = [k for k in range(K) if envs[k].agents]
    invalid_seen = {a: [0] * K for a in agents}

    while active:
        # Every acting agent's prompt of this step, drawing each episode's sampling seeds in order.
        requests: list[tuple[int, str, list[int], Any]] = []
        # Generation groups: the requests of agents acting through one model object at this step (or of
        # each agent alone with batch_agents=False), called in the order of their first request.
        by_group: dict[Any, list[int]] = {}
        for k in active:
            for a in _acting(envs[k], infos[k]):
                if a not in policies:
                    raise ValueError(f"rollout: env {_env_name(envs[k])!r} asks agent {a!r} to act, which has no "
                                     f"policy; policies: {', '.join(policies)}")
                pol, m = policies[a], model_at(a, lengths[k])
                room = engine_for(m).max_len - pol.max_new_tokens
                by_group.setdefault((id(m),) if batch_agents else (id(m), a), []).append(len(requests))
                requests.append((k, a, pol.prompt_ids(obs[k][a], max_tokens=room),
                                 pol.sampling_params(seed=_draw(gens[k]))))
        completions: list[Any] = [None] * len(requests)
        for idx in by_group.values():
            k0, a0 = requests[idx[0]][0], requests[idx[0]][1]
            m = model_at(a0, lengths[k0])
            done = engine_for(m).generate([requests[i][2] for i in idx], [requests[i][3] for i in idx],
                                          adapters=[policies[requests[i][1]].adapter for i in idx])
            members = [a for a in agents if model_at(a, lengths[k0]) is m] if batch_agents else [a0]
            calls.append(("+".join(members), len(idx)))
            for i, c in zip(idx, done):
                completions[i] = c
        actions: dict[int, dict[str, Action]] = {k: {} for k in active}
        for (k, a, prompt, _), c in zip(requests, completions):
            actions[k][a] = Action(a, k, lengths[k], prompt, list(c.tokens), list(c.logprobs), list(c.entropies),
                                   policies[a].action_text(c.tokens), c.finish_reason)
        still = []
        for k in active:
            e, t = envs[k], lengths[k]
            try:
                obs[k], rewards, terms, truncs, infos[k] = e.step({a: x.text for a, x in actions[k].items()})
            except Exception as err:
                acting = ", ".join(actions[k]) or "none"
                raise RuntimeError(f"env {_env_name(e)!r} raised at episode {k} (seed {seeds[k]}), step {t}, "
                                   f"acting agent(s) {acting}: {_one_line(err)}") from err
            lengths[k] = t + 1
            for a in agents:
                out[a].rewards[k].append(float(rewards.get(a, 0.0)))
                out[a].dones[k].append(bool(terms.get(a, a not in infos[k]) or truncs.get(a, False)))
                if a in infos[k]:
                    final[k][a] = infos[k][a]
            for a, x in actions[k].items():
                x.invalid = bool(infos[k].get(a, {}).get("invalid", False))
                invalid_seen[a][k] += x.invalid
                out[a].actions.append(x)
            if e.agents:
                if lengths[k] >= max_steps:
                    raise RuntimeError(f"rollout: episode {k} (seed {seeds[k]}) of env {_env_name(e)!r} is still "
                                       f"running after max_steps={max_steps} steps")
                still.append(k)
        active = still

    for a in agents:
        r = out[a]
        r.actions.sort(key=lambda x: (x.episode, x.step))
        r.returns = [sum(rs) for rs in r.rewards]
        r.success = [final[k].get(a, {}).get("success") for k in range(K)]
        r.invalid_actions = [int(final[k].get(a, {}).get("invalid_actions", invalid_seen[a][k])) for k in range(K)]
    return Rollout(out, seeds, env_seeds, lengths, final, calls)


def _make_envs(env, episodes, seeds) -> list:
    if callable(env) and not isinstance(env, Sequence):
        K = episodes if episodes is not None else (len(seeds) if seeds is not None else None)
        if K is None:
            raise ValueError("rollout: give episodes (or seeds) when env is a constructor")
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"rollout: episodes must be an integer >= 1, got {K!r}")
        envs = [env() for _ in range(K)]
    else:
        envs = list(env)
        if not envs:
            raise ValueError("rollout: no env given; pass a constructor with episodes=K or a list of K envs")
        if len({id(e) for e in envs}) != len(envs):
            raise ValueError("rollout: the same env object is given twice; each episode needs its own env")
        if episodes is not None and episodes != len(envs):
            raise ValueError(f"rollout: episodes={episodes} but {len(envs)} envs given")
    if seeds is not None and len(seeds) != len(envs):
        raise ValueError(f"rollout: {len(seeds)} seeds for {len(envs)} episodes; give one seed per episode")
    return envs


def _check_policies(policies, agents, env_name) -> None:
    if not isinstance(policies, Mapping):
        raise ValueError(f"rollout: policies must be a mapping agent -> AgentPolicy, got {type(policies).__name__}")
    unknown = [a for a in policies if a not in agents]
    if unknown:
        raise ValueError(f"rollout: policy for unknown agent {unknown[0]!r}; env {env_name!r} has agents: "
                         f"{', '.join(agents)}")
    missing = [a for a in agents if a not in policies]
    if missing:
        raise ValueError(f"rollout: no policy for agent {missing[0]!r}; env {env_name!r} has agents: {', '.join(agents)}")
    for a, p in policies.items():
        if not isinstance(p, AgentPolicy):
            raise ValueError(f"rollout: the policy of agent {a!r} must be an AgentPolicy, got {type(p).__name__}")


def agents_per_model(models, agents: Sequence[str]) -> dict[int, int]:
    """id(model) -> the most agents it serves at one step of an episode, for rollout's `models` (a model, a
    mapping or a list per step): its decode engine holds that many slots per episode."""
    return _agents_per_model(_model_maps(models, list(agents)))


def _agents_per_model(model_maps: list[dict[str, Any]]) -> dict[int, int]:
    per: Counter = Counter()
    for model_of in model_maps:
        for m, c in Counter(id(g) for g in model_of.values()).items():
            per[m] = max(per[m], c)
    return dict(per)


def _model_maps(models, agents) -> list[dict[str, Any]]:
    """One agent -> model.GPT map per step (the last serves every later step)."""
    if isinstance(models, (list, tuple)):
        if not models:
            raise ValueError("rollout: models is an empty list; give a model, a mapping, or one per step")
        return [_models(m, agents) for m in models]
    return [_models(models, agents)]


def _models(models, agents) -> dict[str, Any]:
    if isinstance(models, Mapping):
        unknown = [a for a in models if a not in agents]
        if unknown:
            raise ValueError(f"rollout: model for unknown agent {unknown[0]!r}; agents: {', '.join(agents)}")
        missing = [a for a in agents if a not in models]
        if missing:
            raise ValueError(f"rollout: no model for agent {missing[0]!r}; give one per agent or one model for all")
        raw = dict(models)
    else:
        raw = {a: models for a in agents}
    out = {}
    for a, m in raw.items():
        gpt = unwrap_model(m)
        if not (hasattr(gpt, "config") and hasattr(gpt, "hidden_states")):
            raise ValueError(f"rollout: the model of agent {a!r} must be a model.GPT (or hold one as .module), "
                             f"got {type(m).__name__}")
        out[a] = gpt
    return out
