"""The sync settings a job is checked against before any process starts (`check_sync`).

Torch-free on purpose: the launcher's supervisor (`python -m launch train` with several processes)
refuses bad settings here and then only waits on its ranks, so it need not import torch (~1.5 s of
every multi-rank launch). The strategies themselves (agents/sync/strategies.py) build on these checks.
"""

from __future__ import annotations

from trainer.errors import UsageError
from trainer.schema import Recipe


def replica_count(recipe: Recipe, world_size: int) -> int:
    """`sync.replicas`; unset: one replica per node for `hybrid` (DeepSpeed inside a node, the
    strategy across nodes: replicas are consecutive ranks, as the launcher numbers a node's), else
    the data-parallel degree of the job (every model-parallel group a replica)."""
    if recipe.sync.replicas:
        return recipe.sync.replicas
    if recipe.sync.strategy == "hybrid":
        if recipe.launch.nodes < 2:
            raise UsageError("sync.strategy=hybrid on one node needs sync.replicas (groups of several ranks); "
                             "unset, it makes one replica per node of launch.nodes")
        return recipe.launch.nodes
    return recipe.dp_degree(world_size)


def check_sync(recipe: Recipe, world_size: int) -> str | None:
    """The kind of exchange between replicas (`sync.across` for hybrid), None for `allreduce` (DeepSpeed's
    own reduction over every rank). Raises UsageError (one line, exit 2) for settings that cannot run."""
    s = recipe.sync
    if s.strategy == "allreduce":
        return None
    if recipe.server_ranks() >= world_size:
        raise UsageError(f"sync.servers={recipe.server_ranks()} must be below the number of processes {world_size} "
                         "(launch.nodes x launch.procs_per_node): at least one rank must train")
    total, world_size = world_size, recipe.train_world(world_size)
    replicas = replica_count(recipe, world_size)
    dp = recipe.dp_degree(world_size)
    if dp % replicas:
        raise UsageError(f"sync.replicas={replicas} must divide the data-parallel degree {dp} (world {world_size} / "
                         f"(tp={recipe.parallel.tp} x pp={recipe.parallel.pp}))")
    if replicas < 2:
        raise UsageError(f"sync.strategy={s.strategy} needs sync.replicas >= 2 (got {replicas}); with one replica "
                         "use sync.strategy=allreduce")
    kind = s.across if s.strategy == "hybrid" else s.strategy
    if kind == "gossip":
        from .mixing import is_connected  # torch: a gossip job's supervisor pays for the check

        if not is_connected(s.topology, replicas, seed=recipe.train.seed):
            raise UsageError(f"sync.topology={s.topology} over {replicas} replicas is not connected: the replicas "
                             "would never agree; use ring, torus or exponential")
    if kind == "parameter_server":
        check_ps_settings(recipe, total, replicas)
    return kind


def check_ps_settings(recipe: Recipe, world_size: int, replicas: int) -> None:
    """UsageError (one line) for a parameter-server job that cannot run."""
    s = recipe.sync
    workers = world_size - s.servers
    if workers < 1:
        raise UsageError(f"sync.servers={s.servers} must be below the number of processes {world_size} "
                         "(launch.nodes x launch.procs_per_node): at least one rank must train")
    if replicas != workers:
        raise UsageError(f"sync.strategy=parameter_server: each of the {workers} worker ranks is its own replica; "
                         f"set sync.replicas={workers} (or leave it unset), got {replicas}")
    if workers < 2:
        raise UsageError("sync.strategy=parameter_server needs at least 2 workers (launch processes minus "
                         "sync.servers)")
    if 0 < s.staleness < workers - 1:
        raise UsageError(f"sync.staleness={s.staleness} cannot be guaranteed with {workers} workers applying one at a "
                         f"time (the first round alone is {workers - 1} versions late): use 0 (synchronous) or "
                         f">= {workers - 1}")
