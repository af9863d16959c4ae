"""The strategies by which replicas agree, as the training loop's `Synchronizer`s.

Every rank belongs to one replica (R groups of consecutive ranks, `ParallelDims`); inside a replica
DeepSpeed reduces over the replica's data-parallel ranks as usual. Across replicas a strategy talks
over the cross-replica group (the ranks at the same place in every replica, so each exchange is
shard by shard: tensor-parallel slices meet their own slices), through hooks on the replica's
`Stepper`:

- `ring` (gradients, after backward): our ring all-reduce of the replica-averaged gradients,
  divided by R, so every replica applies the job's mean gradient, as `allreduce` would. DeepSpeed's
  own reduction covers only the replica, never the job.
- `local_sgd` (weights, after every `every` steps): the plain mean of the replicas' weights.
- `fedavg`: the mean weighted by each replica's training samples n_i / n (or equally).
- `diloco`: the replicas' mean delta from the last global weights is an outer gradient, applied to
  the global weights by SGD with (Nesterov) momentum (`sync.outer`); with lr 1 and momentum 0 it is
  `local_sgd`.
- `gossip`: one step of averaging with graph neighbours (`mixing_matrix(sync.topology, R, round)`).
- `hybrid`: DeepSpeed inside each replica and `sync.across` across them (the composition above with
  replicas of several ranks, e.g. one per node).

`sync.compress` applies to what crosses replicas (ring gradients, diloco deltas), with error
feedback.

ZeRO inside a replica. The exchange is shard by shard: the ranks of a cross-replica group sit at
the same place in their replicas, so under ZeRO-1/2 they hold the same partition, and only that
partition crosses replicas; no rank ever gathers the full model to average it.
- ZeRO-0: gradients are the parameters' `.grad` (the replica's mean, DeepSpeed's reduction over
  the replica done); weights are the parameters themselves (fp32).
- ZeRO-1/2: gradients are this rank's partition of the replica's mean gradient, which DeepSpeed's
  optimizer keeps after the last backward (`averaged_gradients`) and reads in its step to take
  the global norm, clip and update: reducing it across replicas there gives the engine's own
  arithmetic on the job's mean gradient. Weights are the optimizer's fp32 master partition
  (`single_partition_of_fp32_groups`); after they change, `update_lp_params` copies them to the
  model's parameters and all-gathers them inside the replica, as DeepSpeed's own step does.
- ZeRO-3: the same, per sub-group: its gradient partitions (`averaged_gradients`, read by its norm
  and step) and its fp32 partitions (`fp32_partitioned_groups_flat`), copied to the parameters'
  own partitions after a change (`_reassign_or_swap_out_partitioned_parameters`, its step's own
  last move). With optimizer offload DeepSpeed keeps those elsewhere: refused before training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.errors import UsageError
from trainer.schema import Recipe

from . import ring
from .checks import check_sync, replica_count
from .gossip import gossip_average_, unflatten_
from .mixing import mixing_matrix

GRADIENT_STRATEGIES = ("ring",)
# Compressions whose payload of a slice is the slice's payload: summed chunk by chunk by its owner.
CHUNKED = ("int8", "fp16")
WEIGHT_STRATEGIES = ("local_sgd", "fedavg", "diloco", "gossip")


def build_synchronizer(recipe: Recipe, world_size: int):
    """The recipe's strategy (None for `allreduce`: DeepSpeed's own reduction over every rank).
    Raises UsageError (one line, exit 2) for settings that cannot run (agents/sync/checks.py)."""
    kind = check_sync(recipe, world_size)
    if kind is None:
        return None
    replicas = replica_count(recipe, recipe.train_world(world_size))
    if kind == "parameter_server":
        from .ps_sync import ParameterServerSync

        return ParameterServerSync(recipe, replicas)
    if kind in GRADIENT_STRATEGIES:
        return RingGradients(recipe, replicas)
    return WeightAveraging(recipe, replicas, kind)


class _Strategy:
    exchanges_gradients = False

    def __init__(self, recipe: Recipe, replicas: int):
        self.recipe, self.replicas = recipe, replicas
        self.sent_before = 0  # bytes sent in earlier segments of the run (a resume)
        self.sent_at_start = ring.comm_bytes()
        self.ef = None
        if recipe.sync.compress != "none":
            from .compress import ErrorFeedback

            c = recipe.sync.compress
            self.ef = ErrorFeedback(c, ratio=recipe.sync.compress_ratio if c == "topk" else None,
                                    rank=recipe.sync.compress_rank if c == "powersgd" else None,
                                    seed=recipe.train.seed)

    def attach(self, stepper, replica, sample_counts: list[int]) -> None:
        self.dims, self.engine = replica.dims, replica.engine
        self.group = self.dims.cross_replica_group
        self.params = [p for p in replica.module.parameters() if p.requires_grad]
        self.zero = self.recipe.parallel.zero_stage
        self.optimizer = self.engine.optimizer if self.zero else None
        self.counts = list(sample_counts)

    # ---- what this rank exchanges (see "ZeRO inside a replica" above) -------------------------

    def grad_shards(self) -> list[torch.Tensor]:
        """This rank's part of the replica's mean gradient, as tensors that the update reads."""
        if not self.zero:
            grads = [p.grad for p in self.params]
            if any(g is None for g in grads):
                raise RuntimeError(f"sync.strategy={self.recipe.sync.strategy}: a trainable parameter has no gradient "
                                   "after backward")
            return grads
        opt, out = self.optimizer, []
        for i in range(len(opt.fp16_groups if self.zero == 3 else opt.bit16_groups)):
            part = opt.averaged_gradients.get(i)
            if not isinstance(part, list):  # a 16-bit run accumulates in a compact fp32 buffer instead
                raise UsageError(f"sync.strategy={self.recipe.sync.strategy} with parallel.zero_stage={self.zero} "
                                 "exchanges the optimizer's gradient partitions: it needs train.precision=fp32")
            out.extend(part)
        return out

    def weight_shards(self) -> list[torch.Tensor]:
        """This rank's part of the replica's weights, where the next update starts from."""
        if self.zero == 3:
            return list(self.optimizer.fp32_partitioned_groups_flat)
        return self.params if not self.zero else list(self.optimizer.single_partition_of_fp32_groups)

    def weights_changed(self) -> None:
        """After `weight_shards` were written: make the model's parameters follow (collective over
        the replica's data-parallel ranks under ZeRO)."""
        if self.zero == 3:
            for i in range(len(self.optimizer.fp16_groups)):
                self.optimizer._reassign_or_swap_out_partitioned_parameters(i)
        elif self.zero:
            self.optimizer.update_lp_params()

    def comm_bytes(self) -> int:
        return self.sent_before + ring.comm_bytes() - self.sent_at_start

    def close(self) -> None:
        """Nothing outside the loop to release (see trainer.sync.Synchronizer.close)."""

    def log_row(self, step: int) -> dict:
        return {"comm_bytes": self.comm_bytes()}

    def state_dict(self) -> dict:
        return {"comm_bytes": self.comm_bytes(), "ef": self.ef.state_dict() if self.ef is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.sent_before, self.sent_at_start = state["comm_bytes"], ring.comm_bytes()
        if self.ef is not None:
            self.ef.load_state_dict(state["ef"])

    @torch.no_grad()
    def consensus_dist(self) -> float:
        """Relative RMS distance of the replicas' weights to their mean: sqrt(mean_i |theta_i -
        mean|^2) / |mean| (diagnostic collectives, not counted in comm_bytes)."""
        params = self.weight_shards()
        if self.dims.tp > 1 and not self.zero:  # each tensor once: slices on every tp rank, replicated ones on tp rank 0
            params = [p for p in params if getattr(p, "tensor_model_parallel", True)]
        flat = _flat(params).double()
        mean = flat.clone()
        dist.all_reduce(mean, group=self.group)
        mean /= self.replicas
        sq = torch.stack([(flat - mean).pow(2).sum(), mean.pow(2).sum()])
        dist.all_reduce(sq[:1], group=self.group)
        if self.dims.tp > 1:  # shards of one model: sum their squares
            dist.all_reduce(sq, group=self.dims.tp_group)
        if self.zero and self.dims.dp > 1:  # ZeRO partitions of one model (with tp: replicated tensors once per tp rank)
            dist.all_reduce(sq, group=self.dims.dp_group)
        return float((sq[0] / self.replicas).sqrt() / sq[1].sqrt()) if sq[1] > 0 else 0.0

    # ---- exchange over the cross-replica group ------------------------------------------------

    def _sum(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """The sum over replicas of `flat` (compressed with error feedback when asked)."""
        if self.ef is None:
            ring.ring_all_reduce(flat, self.group)
            return flat
        if self.recipe.sync.compress in CHUNKED:
            return self._two_phase_sum(flat, name)
        return self.ef.exchange(name, flat, all_reduce_fn=self._ring_sum, all_gather_fn=self._ring_gather)

    # ---- two-phase compressed sum (int8, fp16, bf16) ------------------------------------------

    def _two_phase_sum(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """The sum over replicas of `flat`, compressed both ways with error feedback on both sides
        (the scheme of DeepSpeed's 1-bit compressed all-reduce): each replica compresses chunk j of
        its tensor (its own residual per chunk) and sends it to replica j (an all-to-all: (R-1)/R of
        the tensor); replica j sums the R decompressed pieces of its chunk in float32, in replica
        order, compresses the sum (a second residual) and sends it to every replica (an all-gather:
        (R-1)/R). Every replica decompresses the same payloads, so all end with the same bits; each
        rank sends 2(R-1)/R of the tensor in the compressed dtype, as a ring all-reduce sends in
        fp32. (Gathering every replica's compressed tensor instead costs (R-1) of it.)"""
        from .compress import decompress, make_compressor

        n_rep, me = self.replicas, dist.get_rank(self.group)
        bounds = _chunk_bounds(flat.numel(), n_rep)
        mine = [self.ef.step(f"{name}/to{j}", flat[a:b])[0] for j, (a, b) in enumerate(bounds)]
        a, b = bounds[me]
        template = make_compressor(self.recipe.sync.compress).compress(torch.zeros(b - a))
        parts = self._exchange(lambda j: mine[j], lambda j: template, sources=range(n_rep), me=me)
        total = torch.zeros(b - a, dtype=torch.float32)
        for j in range(n_rep):  # a fixed order: every owner's sum is computed the same way
            total += decompress(parts[j]).float()
        summed, _ = self.ef.step(f"{name}/sum", total)
        chunks = self._exchange(lambda j: summed,
                                lambda j: make_compressor(self.recipe.sync.compress).compress(
                                    torch.zeros(bounds[j][1] - bounds[j][0])),
                                sources=range(n_rep), me=me)
        out = torch.empty_like(flat)
        for j, (a, b) in enumerate(bounds):
            out[a:b] = decompress(chunks[j]).to(out.dtype)
        return out

    def _exchange(self, payload_for, template_from, sources, me):
        """Send `payload_for(j)` to every other replica j and receive from each replica j a payload
        shaped like `template_from(j)`; returns {j: payload} (this replica's own included)."""
        import dataclasses

        got, reqs = {me: payload_for(me)}, []
        for j in sources:
            if j == me:
                continue
            peer = dist.get_global_rank(self.group, j)
            out = payload_for(j)
            for tag, key in enumerate(sorted(out.tensors)):
                reqs.append(ring.isend(out.tensors[key].contiguous(), peer, self.group, tag=tag))
            t = template_from(j)
            bufs = {key: torch.empty_like(v) for key, v in t.tensors.items()}
            for tag, key in enumerate(sorted(bufs)):
                reqs.append(ring.irecv(bufs[key], peer, self.group, tag=tag))
            got[j] = dataclasses.replace(t, tensors=bufs)
        for r in reqs:
            r.wait()
        return got

    def _ring_sum(self, t: torch.Tensor) -> torch.Tensor:
        ring.ring_all_reduce(t, self.group)
        return t

    def _ring_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every replica's `t` (same shape everywhere), passed around the ring: R-1 sends of |t|."""
        r, n = dist.get_rank(self.group), self.replicas
        out = [None] * n
        out[r] = t.contiguous()
        nxt, prv = dist.get_global_rank(self.group, (r + 1) % n), dist.get_global_rank(self.group, (r - 1) % n)
        for k in range(n - 1):
            send_idx, recv_idx = (r - k) % n, (r - k - 1) % n
            buf = torch.empty_like(out[send_idx])
            reqs = [ring.isend(out[send_idx], nxt, self.group), ring.irecv(buf, prv, self.group)]
            for q in reqs:
                q.wait()
            out[recv_idx] = buf
        return out


def _chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` contiguous chunks of n elements (sizes differ by at most one)."""
    base, extra = divmod(n, parts)
    starts = [j * base + min(j, extra) for j in range(parts + 1)]
    return list(zip(starts[:-1], starts[1:]))


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


class RingGradients(_Strategy):
    """`ring`: the job's mean gradient from our ring all-reduce (see the module docstring)."""

    exchanges_gradients = True

    def attach(self, stepper, replica, sample_counts):
        super().attach(stepper, replica, sample_counts)
        stepper.after_backward.append(self._reduce)

    @torch.no_grad()
    def _reduce(self, stepper) -> None:
        grads = self.grad_shards()
        if self.recipe.sync.compress == "powersgd":
            # Low rank needs the matrices' own shapes: one stream per parameter (vectors go dense).
            for i, g in enumerate(grads):
                summed = self.ef.exchange(f"grads/{i}", g.float(), all_reduce_fn=self._ring_sum,
                                          all_gather_fn=self._ring_gather)
                g.copy_(summed.div_(self.replicas).view_as(g))
            return
        total = self._sum(_flat(grads), "grads")
        unflatten_(grads, total.div_(self.replicas))


class WeightAveraging(_Strategy):
    """local_sgd, fedavg, diloco and gossip: the replicas' weights mix every `sync.every` steps."""

    def __init__(self, recipe: Recipe, replicas: int, kind: str):
        super().__init__(recipe, replicas)
        self.kind, self.every, self.steps, self.rounds = kind, recipe.sync.every, 0, 0
        self.global_weights = self.momentum = None  # diloco

    def attach(self, stepper, replica, sample_counts):
        super().attach(stepper, replica, sample_counts)
        if not self.zero and any(p.dtype != torch.float32 for p in self.params):
            raise UsageError(f"sync.strategy={self.kind} averages the weights DeepSpeed keeps on the parameters: "
                             "it needs train.precision=fp32 with parallel.zero_stage=0 (or ZeRO-1/2, whose fp32 "
                             "master weights are averaged)")
        if self.kind == "diloco":
            self.global_weights = _flat(self.weight_shards())
            self.momentum = torch.zeros_like(self.global_weights)
        stepper.after_step.append(self._after_step)

    def _after_step(self, stepper, result) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.sync_now()

    @torch.no_grad()
    def sync_now(self) -> None:
        shards = self.weight_shards()
        flat = _flat(shards)
        if self.kind == "gossip":
            m = mixing_matrix(self.recipe.sync.topology, self.replicas, step=self.rounds, seed=self.recipe.train.seed)
            gossip_average_(flat, group=self.group, matrix=m)
        elif self.kind == "diloco":
            flat = self._outer_step(flat)
        else:
            if self.kind == "fedavg" and self.recipe.sync.weights == "samples":
                share = self.counts[self.dims.replica] / sum(self.counts)
            else:
                share = 1.0 / self.replicas
            flat = self._sum(flat.mul_(share), "weights")
        unflatten_(shards, flat)
        self.weights_changed()
        self.rounds += 1

    def _outer_step(self, flat: torch.Tensor) -> torch.Tensor:
        """DiLoCo: outer gradient = the replicas' mean delta theta_global - theta_i; SGD with
        (Nesterov) momentum on the global weights, which every replica then takes."""
        o = self.recipe.sync.outer
        delta = self._sum(self.global_weights - flat, "delta").div_(self.replicas)
        self.momentum.mul_(o.momentum).add_(delta)
        step = delta.add(self.momentum, alpha=o.momentum) if o.nesterov else self.momentum
        self.global_weights.sub_(step, alpha=o.lr)
        return self.global_weights.clone()

    def log_row(self, step: int) -> dict:
        return {**super().log_row(step), "consensus_dist": self.consensus_dist()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "steps": self.steps, "rounds": self.rounds,
                "global_weights": self.global_weights, "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.steps, self.rounds = state["steps"], state["rounds"]
        self.global_weights, self.momentum = state["global_weights"], state["momentum"]
