"""Checks of a multi-agent recipe that need the agents layer (the schema, in trainer/, cannot import it).

`check_agents(recipe)` builds the recipe's environment once and compares: the env must exist and
accept `env.args`, and the recipe's `agents:` must name exactly the env's `possible_agents`. One
line (UsageError, exit 2) for anything else; the launcher calls it before any process starts.
"""

from __future__ import annotations

from trainer.errors import UsageError
from trainer.schema import Recipe


def check_agents(recipe: Recipe) -> None:
    if not recipe.agents:
        return
    from .envs import make_env

    try:
        env = make_env(recipe.env.name, **recipe.env.args)
    except (ValueError, TypeError) as e:
        raise UsageError(f"env: {e}") from None
    want, got = list(env.possible_agents), list(recipe.agents)
    if sorted(want) != sorted(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise UsageError(f"agents: env {recipe.env.name!r} has agents {', '.join(want)}; the recipe names "
                         f"{', '.join(got)}" + (f" (missing {', '.join(missing)})" if missing else "")
                         + (f" (unknown {', '.join(extra)})" if extra else ""))
