"""Gossip mixing matrices, the connectivity of their graphs, and push-sum.

Convention used everywhere in `agents.sync`: a mixing matrix ``W`` of a step is ``n x n`` float64 and
row ``i`` holds the weights node ``i`` gives to each node's value at that step::

    x_i  <-  sum_j W[i, j] * x_j          (the whole step: x <- W @ x)

``W[i, j] != 0`` for ``j != i`` means node ``j`` sends its value to node ``i`` at that step (an edge
``j -> i``). Column ``j`` therefore says how node ``j``'s value is split among the nodes.

* rows sum to 1 (row-stochastic): every node takes a weighted average of what it receives;
* columns sum to 1 (column-stochastic): nothing is created or lost, ``sum_i x_i`` is conserved;
* both (doubly stochastic): plain gossip keeps the mean and, over a connected graph, converges to it.

A directed graph whose matrix is only column-stochastic cannot be averaged by plain gossip (the
fixed point is a weighted, not the plain, mean); push-sum (`push_sum_step`) carries a weight with
each value and corrects that bias: the estimate ``x_i / w_i`` converges to the plain mean.

Topologies (`mixing_matrix`):

``ring``         node i averages with i-1 and i+1 (mod n), 1/3 each; n=2: 1/2 each; n=1: [[1]].
``torus``        a rows x cols grid with wrap-around, rows the largest divisor of n <= sqrt(n);
                 node i averages itself and its *distinct* grid neighbours (up, down, left, right)
                 with equal weight 1/(1 + degree). Degenerate sides collapse: a side of 1 adds no
                 neighbour, a side of 2 adds one (its up and down are the same node), >= 3 adds two.
                 The graph is regular, so the matrix is symmetric and doubly stochastic; for prime
                 n (a 1 x n grid) it is exactly the ring.
``exponential``  one-peer exponential graph, time-varying with period ``ceil(log2 n)``.
                 n a power of two: at step t node i averages 1/2-1/2 with ``i XOR 2^(t mod log2 n)``
                 (symmetric pairwise averaging); the product of any log2(n) consecutive steps is the
                 all-1/n matrix, i.e. exact consensus after log2(n) rounds.
                 Otherwise: the directed graph ``i -> (i + 2^(t mod ceil(log2 n))) mod n``; node i
                 keeps 1/2 of its value and sends 1/2 to that peer. The matrix is column-stochastic
                 (what push-sum needs) and not symmetric. Because every node also has exactly one
                 in-neighbour, ``W = (I + S)/2`` with a cyclic shift S, its rows sum to 1 as well:
                 it is doubly stochastic, so plain gossip also keeps the mean and converges to it,
                 only not in finitely many rounds. `is_symmetric_topology` says which case applies.
``random``       a random perfect matching per step, drawn from (seed, step) alone: each pair
                 averages 1/2-1/2; with n odd one node idles (its row is e_i). Symmetric, doubly
                 stochastic.
"""

from __future__ import annotations

import math

import numpy as np
import torch

TOPOLOGIES = ("exponential", "random", "ring", "torus")

_ATOL = 1e-12


# ----------------------------------------------------------------------------------------- validation


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n (the number of nodes) must be an integer >= 1, got {n!r}")
    return int(n)


def _check_topology(topology) -> str:
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; allowed: {', '.join(TOPOLOGIES)}")
    return topology


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return int(step)


def _is_pow2(n: int) -> bool:
    return n & (n - 1) == 0


def _log2_ceil(n: int) -> int:
    return (n - 1).bit_length()  # ceil(log2 n) for n >= 1 (0 for n = 1)


def as_matrix(matrix) -> torch.Tensor:
    """``matrix`` (tensor, array or nested list) as a CPU float64 tensor; ValueError unless square,
    finite and non-negative."""
    m = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"a mixing matrix must be square n x n with n >= 1, got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError("a mixing matrix must be finite")
    if (m < 0).any():
        raise ValueError("a mixing matrix must be non-negative")
    return m


def check_mixing_matrix(matrix, *, rows: bool = True, cols: bool = True, symmetric: bool = False,
                        atol: float = 1e-10) -> torch.Tensor:
    """Validate ``matrix`` and return it as float64: non-negative and square; with ``rows`` every row
    sums to 1, with ``cols`` every column sums to 1, with ``symmetric`` it equals its transpose (all
    within ``atol``). Raises ValueError naming the first property that fails."""
    m = as_matrix(matrix)
    if rows:
        err = (m.sum(1) - 1).abs()
        if err.max() > atol:
            i = int(err.argmax())
            raise ValueError(f"mixing matrix is not row-stochastic: row {i} sums to {float(m[i].sum())!r}")
    if cols:
        err = (m.sum(0) - 1).abs()
        if err.max() > atol:
            j = int(err.argmax())
            raise ValueError(f"mixing matrix is not column-stochastic: column {j} sums to "
                             f"{float(m[:, j].sum())!r}")
    if symmetric and (m - m.T).abs().max() > atol:
        raise ValueError("mixing matrix is not symmetric")
    return m


# ------------------------------------------------------------------------------------------- topologies


def torus_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the torus over n nodes: rows the largest divisor of n with rows <= sqrt(n)."""
    n = _check_n(n)
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


def _ring(n: int) -> torch.Tensor:
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        nbrs = {i, (i - 1) % n, (i + 1) % n}
        for j in nbrs:
            w[i, j] = 1.0 / len(nbrs)
    return w


def _torus(n: int) -> torch.Tensor:
    rows, cols = torus_shape(n)
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        r, c = divmod(i, cols)
        nbrs = {i, ((r - 1) % rows) * cols + c, ((r + 1) % rows) * cols + c,
                r * cols + (c - 1) % cols, r * cols + (c + 1) % cols}
        for j in nbrs:
            w[i, j] = 1.0 / len(nbrs)
    return w


def _exponential(n: int, step: int) -> torch.Tensor:
    w = torch.zeros(n, n, dtype=torch.float64)
    if n == 1:
        w[0, 0] = 1.0
        return w
    k = step % _log2_ceil(n)
    for i in range(n):
        # Symmetric case: peer = i XOR 2^k, and i is the peer's peer. Directed case: i sends half of
        # its value to peer, so column i holds 1/2 at (i, i) and 1/2 at (peer, i).
        peer = i ^ (1 << k) if _is_pow2(n) else (i + (1 << k)) % n
        w[i, i] += 0.5
        w[peer, i] += 0.5
    return w


def _matching(n: int, step: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step)]))
    perm = rng.permutation(n).tolist()
    return [(perm[2 * p], perm[2 * p + 1]) for p in range(n // 2)]


def _random(n: int, step: int, seed: int) -> torch.Tensor:
    w = torch.eye(n, dtype=torch.float64)
    for a, b in _matching(n, step, seed):
        w[a, a] = w[b, b] = w[a, b] = w[b, a] = 0.5
    return w


def mixing_matrix(topology: str, n: int, step: int = 0, seed: int = 0) -> torch.Tensor:
    """The ``n x n`` float64 mixing matrix of ``topology`` at ``step`` (row i: the weights node i gives
    to each node's value; see the module docstring for each topology). ``seed`` matters only for
    ``random`` (the matching is a function of (seed, step) alone, the same on every process).
    ValueError for an unknown topology, ``n < 1`` or ``step < 0``."""
    topology, n, step = _check_topology(topology), _check_n(n), _check_step(step)
    if topology == "ring":
        return _ring(n)
    if topology == "torus":
        return _torus(n)
    if topology == "exponential":
        return _exponential(n, step)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return _random(n, step, seed)


def is_symmetric_topology(topology: str, n: int) -> bool:
    """Whether every step's matrix of ``topology`` over ``n`` nodes is symmetric (an undirected graph).
    Only ``exponential`` with n not a power of two is directed."""
    topology, n = _check_topology(topology), _check_n(n)
    return not (topology == "exponential" and not _is_pow2(n))


def period(topology: str, n: int) -> int | None:
    """Number of steps after which the matrices repeat: 1 for ``ring``/``torus``, ``ceil(log2 n)``
    (at least 1) for ``exponential``, None for ``random`` (a fresh matching every step)."""
    topology, n = _check_topology(topology), _check_n(n)
    if topology == "random":
        return None
    if topology == "exponential":
        return max(1, _log2_ceil(n))
    return 1


# ----------------------------------------------------------------------------------------- connectivity


def graph_connected(matrices) -> bool:
    """Whether the union over ``matrices`` (one matrix or a sequence) of the directed edges
    ``j -> i`` for ``W[i, j] != 0`` is strongly connected: every node's value eventually reaches every
    other node. For symmetric matrices this is plain connectivity."""
    if isinstance(matrices, torch.Tensor | np.ndarray) and np.ndim(matrices) == 2:
        matrices = [matrices]
    mats = [as_matrix(m) for m in matrices]
    if not mats:
        raise ValueError("graph_connected needs at least one matrix")
    n = mats[0].shape[0]
    if any(m.shape[0] != n for m in mats):
        raise ValueError("graph_connected: matrices of different sizes")
    adj = torch.zeros(n, n, dtype=torch.bool)
    for m in mats:
        adj |= m != 0

    def reaches_all(a: torch.Tensor) -> bool:  # from node 0 along edges a[i, j]: i -> j
        seen, stack = {0}, [0]
        while stack:
            i = stack.pop()
            for j in torch.nonzero(a[i]).flatten().tolist():
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        return len(seen) == n

    # adj[i, j]: j sends to i. Strongly connected iff node 0 reaches all and all reach node 0.
    return reaches_all(adj) and reaches_all(adj.T)


def is_connected(topology: str, n: int, seed: int = 0, steps: int | None = None) -> bool:
    """Whether ``topology`` over ``n`` nodes connects every node to every other over all its steps
    (the union of its graphs is strongly connected), so that gossip converges to consensus.

    Periodic topologies are checked over one period (or over steps ``0..steps-1`` when given).
    ``random`` over unboundedly many steps is connected with probability one (every pair is matched
    with positive probability each step), so without ``steps`` it returns True; with ``steps`` it
    checks the union of the matchings of steps ``0..steps-1`` for ``seed``. A configuration for which
    this is False must be refused: its replicas would never agree."""
    topology, n = _check_topology(topology), _check_n(n)
    if steps is None:
        steps = period(topology, n)
        if steps is None:
            return True
    steps = _check_step(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return graph_connected([mixing_matrix(topology, n, t, seed) for t in range(steps)])


# ------------------------------------------------------------------------------------ gossip, push-sum


def gossip_step(values: torch.Tensor, matrix) -> torch.Tensor:
    """One plain gossip step on all nodes at once: ``values[i]`` is node i's value (any trailing
    shape); returns ``W @ values`` computed in float64, cast back to ``values``' dtype."""
    m = as_matrix(matrix)
    if values.shape[0] != m.shape[0]:
        raise ValueError(f"values has {values.shape[0]} nodes, the matrix {m.shape[0]}")
    flat = values.reshape(values.shape[0], -1).to(torch.float64)
    return (m.to(flat.device) @ flat).reshape(values.shape).to(values.dtype)


def push_sum_step(values: torch.Tensor, weights: torch.Tensor, matrix) -> tuple[torch.Tensor, torch.Tensor]:
    """One push-sum step on all nodes at once.

    Node i holds ``(x_i, w_i)`` = ``(values[i], weights[i])`` (start: ``x_i`` its value, ``w_i = 1``)
    and sends the share ``W[k, i]`` of both to each node k (itself included); so ``matrix`` must be
    column-stochastic (rows need not sum to 1) and the step is ``x <- W @ x``, ``w <- W @ w``. The
    global ``sum_i x_i`` and ``sum_i w_i`` (= n from the start) are conserved exactly in exact
    arithmetic; node i's estimate of the mean is ``x_i / w_i`` (`push_sum_estimate`), which over a
    strongly connected sequence of graphs converges to the plain mean of the starting values.
    Computed in float64; returns (values, weights) in their input dtypes. ValueError unless the matrix
    is column-stochastic."""
    m = check_mixing_matrix(matrix, rows=False, cols=True)
    if weights.dim() != 1 or weights.shape[0] != m.shape[0] or values.shape[0] != m.shape[0]:
        raise ValueError(f"push_sum_step: values {tuple(values.shape)} and weights {tuple(weights.shape)} "
                         f"must both have {m.shape[0]} nodes along dim 0 (weights 1-D)")
    w = (m.to(weights.device) @ weights.to(torch.float64)).to(weights.dtype)
    return gossip_step(values, m), w


def push_sum_estimate(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each node's push-sum estimate ``x_i / w_i`` (weights broadcast over values' trailing dims)."""
    return values / weights.reshape(-1, *([1] * (values.dim() - 1))).to(values.dtype)
