"""Gossip over torch.distributed: one mixing step between the members of a process group.

The group holds one member per replica (e.g. the ranks that hold the same shard in every replica);
member ``i`` (its rank in the group) is node ``i`` of the mixing matrix ``W`` (`agents.sync.mixing`:
row i = the weights node i gives to each node's value). A step is point-to-point only: node i sends
its tensors to the nodes k with ``W[k, i] > 0`` and receives from the nodes j with ``W[i, j] > 0``
(k, j != i); nodes with a zero weight exchange nothing. The tensors of one call are flattened into
one buffer per (dtype, device), so a step is one message per neighbour and dtype.

Two steps:

* `gossip_average_` -- plain gossip ``x_i <- sum_j W[i, j] x_j`` with a doubly stochastic ``W``
  (keeps the replicas' mean; over a connected topology it converges to it);
* `push_sum_average_` -- push-sum with a column-stochastic ``W`` (directed graphs): each node also
  carries a scalar weight ``w_i``; the tensors hold the node's *estimate* ``z_i = x_i / w_i``.

Every message goes through `agents.sync.ring.isend`/`irecv`, so the bytes a step sends (payload:
``numel * element_size`` of every message, the push-sum weight included) are counted in the shared
counter of the sync strategies (`agents.sync.ring.comm_bytes`, `SentBytes`); `gossip_average_` also
returns what it sent.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from .mixing import check_mixing_matrix
from .ring import irecv, isend


def _as_list(tensors) -> list[torch.Tensor]:
    ts = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    for t in ts:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"gossip mixes floating-point tensors only, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    return ts


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16 accumulate in fp32


def _buckets(tensors: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """[(tensors, flat contiguous copy of them)] per (dtype, device), in first-seen order."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return [(ts, torch.cat([t.detach().reshape(-1) for t in ts])) for ts in groups.values()]


def unflatten_(ts: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy consecutive slices of `flat` back into the tensors `ts` (the inverse of concatenating them)."""
    off = 0
    for t in ts:
        n = t.numel()
        t.copy_(flat[off:off + n].view_as(t))
        off += n


def _setup(group, matrix, rank_in_group, *, rows: bool):
    if not dist.is_initialized():
        raise RuntimeError("gossip needs torch.distributed to be initialised")
    group = group if group is not None else dist.group.WORLD
    size, me = dist.get_world_size(group), dist.get_rank(group)
    if me < 0:
        raise ValueError("this process is not a member of the gossip group")
    if rank_in_group is not None and rank_in_group != me:
        raise ValueError(f"rank_in_group={rank_in_group} but this process is rank {me} of the group")
    try:
        m = check_mixing_matrix(matrix, rows=rows, cols=True)
    except ValueError as e:
        hint = " (a column-stochastic matrix of a directed graph needs push_sum_average_)" if rows else ""
        raise ValueError(f"{e}{hint}") from None
    if m.shape[0] != size:
        raise ValueError(f"mixing matrix is {m.shape[0]} x {m.shape[0]} but the group has {size} members")
    ins = [j for j in range(size) if j != me and m[me, j] > 0]  # whose values row `me` mixes in
    outs = [k for k in range(size) if k != me and m[k, me] > 0]  # who mixes in ours
    return group, m, me, ins, outs


def _exchange(group, payload: list[torch.Tensor], ins: list[int], outs: list[int]
              ) -> tuple[dict[int, list[torch.Tensor]], int]:
    """Send every payload tensor to each of ``outs`` and receive the same layout from each of ``ins``
    (group ranks), all posted before any is waited on; return {in-peer: its tensors} and the bytes
    sent. Message t of a pair carries tag t."""
    works, received, sent = [], {}, 0
    for k in outs:
        for tag, buf in enumerate(payload):
            works.append(isend(buf, dist.get_global_rank(group, k), group=group, tag=tag))
            sent += buf.numel() * buf.element_size()
    for j in ins:
        received[j] = [torch.empty_like(buf) for buf in payload]
        for tag, buf in enumerate(received[j]):
            works.append(irecv(buf, dist.get_global_rank(group, j), group=group, tag=tag))
    for w in works:
        w.wait()
    return received, sent


@torch.no_grad()
def gossip_average_(tensors: torch.Tensor | Iterable[torch.Tensor], group=None, matrix=None,
                    rank_in_group: int | None = None) -> int:
    """One plain gossip step, in place: ``x_me <- sum_j W[me, j] x_j`` for every tensor of
    ``tensors`` (floating-point; one tensor or an iterable such as ``model.parameters()``), where
    ``me`` is this process's rank in ``group`` (None: the default group) and ``x_j`` the same tensor
    on group member j. ``matrix`` (``group size`` square) must be doubly stochastic and the same on
    every member; all members must call this with tensors of the same shapes and dtypes.
    ``rank_in_group``, when given, must equal this process's rank in the group (a check).
    Accumulates in at least float32 (float64 stays float64) and casts back. Returns the bytes this
    process sent (also counted by `agents.sync.ring.comm_bytes`)."""
    if matrix is None:
        raise ValueError("gossip_average_ needs the step's mixing matrix")
    ts = _as_list(tensors)
    group, m, me, ins, outs = _setup(group, matrix, rank_in_group, rows=True)
    buckets = _buckets(ts)
    received, sent = _exchange(group, [flat for _, flat in buckets], ins, outs)
    for b, (bts, flat) in enumerate(buckets):
        acc = flat.to(_acc_dtype(flat.dtype)) * float(m[me, me])
        for j in ins:
            acc.add_(received[j][b].to(acc.dtype), alpha=float(m[me, j]))
        unflatten_(bts, acc.to(flat.dtype))
    return sent


@torch.no_grad()
def push_sum_average_(tensors: torch.Tensor | Iterable[torch.Tensor], weight: float, group=None,
                      matrix=None, rank_in_group: int | None = None) -> float:
    """One push-sum step, in place, over a column-stochastic ``matrix`` (directed graphs allowed).

    This process is node ``me`` (its rank in ``group``) with push-sum weight ``w_me`` = ``weight``
    (1.0 at the start on every node) and ``tensors`` holding its estimate ``z_me = x_me / w_me`` (at
    the start: its own value). With ``x_j = w_j z_j`` the step is the push-sum update
    ``x_me <- sum_j W[me, j] x_j``, ``w_me <- sum_j W[me, j] w_j`` (node j pushes the share
    ``W[k, j]`` of its (x_j, w_j) to each k); the tensors are overwritten with the new estimate
    ``x_me / w_me`` and the new weight is returned. ``sum_j w_j`` stays equal to the group size and
    ``sum_j w_j z_j`` (the replicas' total) is conserved up to rounding; over a strongly connected
    sequence of graphs every estimate converges to the plain mean of the starting values. Each
    neighbour is sent the tensors (as they are) plus the weight as one float64 (8 bytes), counted by
    `agents.sync.ring.comm_bytes`."""
    if matrix is None:
        raise ValueError("push_sum_average_ needs the step's mixing matrix")
    weight = float(weight)
    if not weight > 0:
        raise ValueError(f"push-sum weight must be > 0, got {weight!r}")
    ts = _as_list(tensors)
    group, m, me, ins, outs = _setup(group, matrix, rank_in_group, rows=False)
    buckets = _buckets(ts)
    dev = buckets[0][1].device if buckets else torch.device("cpu")
    w_buf = torch.tensor([weight], dtype=torch.float64, device=dev)
    received, _ = _exchange(group, [flat for _, flat in buckets] + [w_buf], ins, outs)
    w_in = {j: float(received[j][-1]) for j in ins}
    new_w = float(m[me, me]) * weight + sum(float(m[me, j]) * w_in[j] for j in ins)
    if not new_w > 0:
        raise ValueError(f"push-sum: node {me} is left with weight {new_w!r} (row {me} of the matrix "
                         f"keeps and receives nothing); its estimate is undefined")
    for b, (bts, flat) in enumerate(buckets):
        acc = flat.to(_acc_dtype(flat.dtype)) * (float(m[me, me]) * weight)
        for j in ins:
            acc.add_(received[j][b].to(acc.dtype), alpha=float(m[me, j]) * w_in[j])
        unflatten_(bts, (acc / new_w).to(flat.dtype))
    return new_w
