"""A launcher job of several replicas, each training its own recipe on its own ranks (test driver).

    deepspeed --num_gpus 4 --no_local_rank --module tests.replica_job '<json>'

<json>: {"replicas": [[recipe, [overrides...]], ...], "nan_steps": {replica index: "3,4"}}. The world
is split into equal replicas (`ParallelDims.build(replicas=R)`); replica r runs `trainer.loop.train`
with its recipe over its own process groups. Fault injection (non-finite losses) can be aimed at one
replica. Exit status: 0, or the first TrainingStopped exit code of this rank.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from trainer import faults
    from trainer.dims import ParallelDims
    from trainer.distributed import destroy, init_distributed
    from trainer.errors import TrainingStopped
    from trainer.loop import train
    from trainer.recipe import load_recipe

    spec = json.loads(argv[0])
    dist = init_distributed("gloo")
    replicas = spec["replicas"]
    recipes = [load_recipe(name, overrides) for name, overrides in replicas]
    dims = ParallelDims.build(dist.world_size, dist.rank, recipes[0].parallel.tp, recipes[0].parallel.pp,
                              replicas=len(replicas))
    nan = spec.get("nan_steps", {}).get(str(dims.replica))
    if nan:
        os.environ[faults.NAN_STEPS] = nan
    code = 0
    try:
        train(recipes[dims.replica], dist, dims)
    except TrainingStopped as stop:
        print(f"replica {dims.replica} stopped: {stop}", file=sys.stderr, flush=True)
        code = stop.exit_code
    finally:
        destroy()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
