"""What the game self-play loop (agents.games.selfplay) supports, checked before any process starts:
one process, full-weight agents, REINFORCE with a batch-mean baseline or none, the agents
updated together (train.schedule: simultaneous). One line (UsageError,
exit 2) otherwise. The game itself (unknown, not two players, not zero-sum) is the env's check."""

from __future__ import annotations

from trainer.errors import UsageError
from trainer.schema import Recipe

GAME_ENV = "openspiel"


def check_game_settings(recipe: Recipe, world: int) -> None:
    if world != 1:
        raise UsageError(f"env openspiel: game self-play runs in one process (the games are small); got {world} "
                         "processes (launch.procs_per_node=1)")
    if recipe.train.schedule != "simultaneous":
        raise UsageError(f"train.schedule={recipe.train.schedule}: game self-play updates its agents together every "
                         "step (train.schedule: simultaneous)")
    for name, a in recipe.agents.items():
        if a.policy_of is not None:
            continue
        if a.algorithm != "reinforce":
            raise UsageError(f"agents.{name}.algorithm={a.algorithm}: game self-play trains by reinforce (its "
                             "policy is a softmax over the legal actions' tokens)")
        if a.adapter != "none":
            raise UsageError(f"agents.{name}.adapter={a.adapter}: game self-play trains full-weight agents "
                             "(adapter: none)")
        if a.baseline not in ("mean", "none"):
            raise UsageError(f"agents.{name}.baseline={a.baseline}: game self-play has baselines mean and none")
