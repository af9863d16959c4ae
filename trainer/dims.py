"""`ParallelDims`: how the ranks of a job are split, and every process group, made once.

A job's world is split into `replicas` equal groups of consecutive ranks. A replica holds one set of
weights (a model, an agent); inside it the ranks form a tensor x pipeline x data-parallel grid laid
out as DeepSpeed's `PipeModelDataParallelTopology` does it (axes pipe, data, model: the tensor-parallel
ranks of a group are consecutive, so they share a node's fast links). Across replicas, the ranks at
the same position form a cross-replica group (what a strategy that makes replicas agree talks over).

Every process group is created here, in the same order on every rank (`torch.distributed.new_group`
is collective over the whole world), and handed to whoever runs a collective: DeepSpeed gets them as
its `mpu` (`grid`), tensor parallelism gets `tp_group`, the loop's agreement collectives (the
non-finite-loss veto, the step's mean loss, the stop signal) get `dp_group` / `replica_group`. No
collective of one replica includes a rank of another, so replicas never wait on each other.

Pipeline parallelism: DeepSpeed 0.19.8's `PipelineModule` checks its topology against the whole
world and builds its groups over global ranks, so a pipeline-parallel layout needs a single replica;
its grid is DeepSpeed's own `PipelineParallelGrid`, created here and given to the module
(`parallelize`) instead of the one the module would build.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as tdist


class DimsError(ValueError):
    """A layout that cannot be built (one line, for the user)."""


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int  # global rank
    replicas: int
    tp: int
    pp: int
    dp: int  # data-parallel degree inside one replica
    replica: int  # index of this rank's replica
    tp_rank: int
    pp_rank: int
    dp_rank: int
    # DeepSpeed's model-parallel unit over this replica's ranks (see ReplicaGrid); None only for
    # dims built without process groups (`ParallelDims.plan`).
    grid: object | None = field(default=None, compare=False, repr=False)
    replica_group: object | None = field(default=None, compare=False, repr=False)
    cross_replica_group: object | None = field(default=None, compare=False, repr=False)
    # Every rank that trains (None: the world). A job whose last ranks serve parameters
    # (`servers` in `build`) keeps them out of the run's collectives.
    job_group: object | None = field(default=None, compare=False, repr=False)

    # ---- construction ------------------------------------------------------------------------

    @staticmethod
    def plan(world_size: int, rank: int, tp: int = 1, pp: int = 1, replicas: int = 1) -> ParallelDims:
        """The coordinates alone (no process group): checks the layout and places `rank`."""
        if replicas < 1 or world_size % replicas:
            raise DimsError(f"{world_size} processes cannot be split into {replicas} equal replicas")
        size = world_size // replicas
        if size % (tp * pp):
            raise DimsError(f"a replica of {size} processes is not divisible by tp={tp} x pp={pp}")
        if pp > 1 and replicas > 1:
            raise DimsError(f"pipeline parallelism (pp={pp}) needs a single replica: DeepSpeed's PipelineModule "
                            f"builds its process groups over the whole world (got {replicas} replicas)")
        dp = size // (tp * pp)
        local = rank % size
        # PipeModelDataParallelTopology: rank = (pipe * dp + data) * tp + model.
        return ParallelDims(world_size, rank, replicas, tp, pp, dp, rank // size,
                            tp_rank=local % tp, pp_rank=local // (tp * dp), dp_rank=(local // tp) % dp)

    @classmethod
    def build(cls, world_size: int, rank: int, tp: int = 1, pp: int = 1, replicas: int = 1,
              servers: int = 0) -> ParallelDims | None:
        """Collective over the whole world: `plan`, then every process group of the job.

        `servers`: the world's last ranks serve parameters (a parameter-server job) and train
        nothing; the replicas are made of the first world_size - servers ranks. A server rank
        takes part in creating the groups (a collective) and gets None."""
        workers = world_size - servers
        if servers < 0 or workers < 1:
            raise DimsError(f"{servers} server ranks leave no rank to train in a world of {world_size}")
        is_server = rank >= workers
        # A server rank creates the same groups as worker rank 0 would, and keeps none.
        d = cls.plan(workers, 0 if is_server else rank, tp, pp, replicas)
        world_size = workers
        if not tdist.is_initialized():
            raise DimsError("ParallelDims.build needs torch.distributed to be initialised (trainer.distributed)")
        size = d.replica_size
        replica_groups = [_new_group(range(r * size, (r + 1) * size)) for r in range(replicas)]
        cross_groups = [_new_group(range(i, world_size, size)) for i in range(size)]
        if pp > 1:
            from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

            grid = PipelineParallelGrid(topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=d.dp))
        else:
            grid = ReplicaGrid(d)
        job_group = _new_group(range(workers)) if servers else None
        if is_server:
            return None
        return ParallelDims(**{**d.__dict__, "grid": grid, "replica_group": replica_groups[d.replica],
                               "cross_replica_group": cross_groups[d.local_rank], "job_group": job_group})

    # ---- derived -----------------------------------------------------------------------------

    @property
    def replica_size(self) -> int:
        return self.world_size // self.replicas

    @property
    def local_rank(self) -> int:
        """Rank inside this replica."""
        return self.rank % self.replica_size

    @property
    def replica_ranks(self) -> range:
        return range(self.replica * self.replica_size, (self.replica + 1) * self.replica_size)

    @property
    def is_replica_main(self) -> bool:
        """The replica's first rank: it writes the replica's files and logs."""
        return self.local_rank == 0

    @property
    def is_pipeline(self) -> bool:
        return self.pp > 1

    @property
    def tp_group(self):
        return self.grid.get_slice_parallel_group() if self.tp > 1 else None

    @property
    def dp_group(self):
        return self.grid.get_data_parallel_group()

    def describe(self) -> str:
        s = f"dp={self.dp} tp={self.tp} pp={self.pp}"
        return s if self.replicas == 1 else f"replica {self.replica}/{self.replicas}: {s}"


def _new_group(ranks) -> object:
    # Every rank calls new_group for every group, in the same order (a collective over the world).
    return tdist.new_group(ranks=list(ranks))


class ReplicaGrid:
    """DeepSpeed's model-parallel unit (`mpu`) over one replica's ranks, without pipeline stages.

    DeepSpeed reduces gradients, clips by the global norm and partitions ZeRO state over
    `get_data_parallel_group()`, and sums norms over `get_model_parallel_group()`. Without an mpu it
    would use the whole world, which would mix replicas, so one is always passed. The groups are those
    DeepSpeed's `PipelineParallelGrid` would make for pp = 1 on a world of this replica's size, with
    ranks offset to the replica's. DeepSpeed 0.19.8 also keeps the mpu of the last engine built in a
    module global (`deepspeed.utils.groups.mpu`) and reads it in some paths after initialisation;
    `parallelize.bind_mpu` puts each engine's own back around its calls."""

    def __init__(self, d: ParallelDims):
        size, base = d.replica_size, d.replica * d.replica_size
        tp, dp = d.tp, d.dp
        self.global_rank = d.rank
        self._tp_rank, self._dp_rank = d.tp_rank, d.dp_rank
        self._tp, self._dp = tp, dp
        # All replicas' groups are created on every rank (new_group is a collective); this rank keeps its own.
        self._dp_group = self._mp_group = self._tp_group = self._pp_group = None
        for r in range(d.replicas):
            off = r * size
            for m in range(tp):  # data-parallel groups: same tensor-parallel rank
                g = _new_group(off + m + tp * i for i in range(dp))
                if off == base and m == d.tp_rank:
                    self._dp_group, self.dp_ranks = g, [off + m + tp * i for i in range(dp)]
            for i in range(dp):  # model-parallel (= tensor-parallel here) groups: same data-parallel rank
                ranks = [off + i * tp + m for m in range(tp)]
                g = _new_group(ranks)
                if off == base and i == d.dp_rank:
                    self._mp_group = self._tp_group = g
            for j in range(size):  # pipeline groups of one stage (DeepSpeed asks for them)
                g = _new_group([off + j])
                if off + j == d.rank:
                    self._pp_group = g

    def get_global_rank(self):
        return self.global_rank

    def get_data_parallel_group(self):
        return self._dp_group

    def get_data_parallel_world_size(self):
        return self._dp

    def get_data_parallel_rank(self):
        return self._dp_rank

    def get_data_parallel_group_ranks(self):
        return self.dp_ranks

    def get_model_parallel_group(self):
        return self._mp_group

    def get_model_parallel_world_size(self):
        return self._tp

    def get_model_parallel_rank(self):
        return self._tp_rank

    get_slice_parallel_group = get_tensor_model_parallel_group = get_model_parallel_group
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_rank = get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_pipe_parallel_group(self):
        return self._pp_group

    def get_pipe_parallel_world_size(self):
        return 1

    def get_pipe_parallel_rank(self):
        return 0

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank

    def get_stage_id(self):
        return 0
