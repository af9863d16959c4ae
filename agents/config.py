"""Checks of a multi-agent recipe that need the agents layer (the schema, in trainer/, cannot import it).

`check_agents(recipe)` builds the recipe's environment once and compares: the env must exist and
accept `env.args`, and the recipe's `agents:` must name exactly the env's `possible_agents`. One
line (UsageError, exit 2) for anything else; the launcher calls it before any process starts.
"""

from __future__ import annotations

from trainer.errors import UsageError
from trainer.schema import SHARED_POLICY_KEYS, AgentSection, Recipe

from .games.settings import GAME_ENV, check_game_settings


def check_agents(recipe: Recipe, world: int | None = None) -> None:
    """`world`: the number of processes that will train (default: the recipe's launch.*)."""
    if not recipe.agents:
        return
    check_loop_settings(recipe, world or recipe.world_size())
    from .envs import make_env

    try:
        env = make_env(recipe.env.name, **recipe.env.args)
    except (ValueError, TypeError) as e:
        raise UsageError(f"env: {e}") from None
    if recipe.env.name == GAME_ENV:
        check_game_settings(recipe, world or recipe.world_size())
    want, got = list(env.possible_agents), list(recipe.agents)
    if sorted(want) != sorted(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise UsageError(f"agents: env {recipe.env.name!r} has agents {', '.join(want)}; the recipe names "
                         f"{', '.join(got)}" + (f" (missing {', '.join(missing)})" if missing else "")
                         + (f" (unknown {', '.join(extra)})" if extra else ""))


def agent_settings(recipe: Recipe) -> dict[str, AgentSection]:
    """Every agent's settings, an agent with `policy_of` taking the keys of the policy it shares
    (trainer.schema.SHARED_POLICY_KEYS) from the agent that owns it."""
    out = {}
    for name, a in recipe.agents.items():
        if a.policy_of is not None:
            owner = recipe.agents[a.policy_of]
            a = a.model_copy(update={k: getattr(owner, k) for k in SHARED_POLICY_KEYS})
        out[name] = a
    return out


def optimizer_passes(a: AgentSection) -> int:
    """Optimizer steps an agent makes per batch of episodes: ppo_epochs for PPO, else one."""
    return a.ppo_epochs if a.algorithm == "ppo" else 1


def check_loop_settings(recipe: Recipe, world: int) -> None:
    """What the multi-agent loop (agents.train) supports: data parallel over `world` ranks with ZeRO 0-3,
    whole GRPO groups per rank, the same number of optimizer steps for the agents of one engine."""
    rl = recipe.rl
    if rl.episodes_per_step % (world * rl.group_size):
        raise UsageError(f"rl.episodes_per_step={rl.episodes_per_step} must be a multiple of the processes "
                         f"({world}) x rl.group_size ({rl.group_size})")
    p = recipe.parallel
    if p.tp > 1 or p.pp > 1:
        raise UsageError("agents: the multi-agent loop runs data parallel (parallel.tp = pp = 1) with ZeRO 0-3; "
                         f"got tp={p.tp} pp={p.pp}")
    if recipe.sync.strategy != "allreduce" or recipe.sync.replicas not in (None, 1):
        raise UsageError("agents: sync.* strategies apply to pre-training replicas; a multi-agent recipe keeps "
                         "sync.strategy: allreduce")
    # The LoRA agents over one base share one engine and so one optimizer step per pass: they must
    # make the same number of passes per batch (an Adam step moves a parameter whose gradient is 0).
    settings = agent_settings(recipe)
    engines: dict[str | None, list[str]] = {}
    for name, a in settings.items():
        if a.adapter == "lora" and a.trainable:
            engines.setdefault(a.init_from, []).append(name)
    for init_from, names in engines.items():
        counts = {n: optimizer_passes(settings[n]) for n in names}
        if len(set(counts.values())) > 1:
            raise UsageError(f"agents {', '.join(names)} train LoRA adapters on one base ({init_from}) with one "
                             "optimizer, so they make the same number of steps per batch; got "
                             + ", ".join(f"{n} {c}" for n, c in counts.items())
                             + " (ppo makes agents.<name>.ppo_epochs, reinforce and grpo 1)")
        owners = [n for n in names if settings[n].policy_of is None]
        if recipe.train.schedule == "alternating" and len(owners) > 1 and p.zero_stage > 0:
            # A frozen adapter's weights and Adam state are put back after its engine's step
            # (agents.schedule); ZeRO 1-3 keep them in flat partitions that cannot be put back per adapter.
            raise UsageError(f"train.schedule=alternating with LoRA agents {', '.join(owners)} on one base needs "
                             f"parallel.zero_stage=0 (got {p.zero_stage}); full-weight agents alternate under any stage")
