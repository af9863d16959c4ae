"""agents.sync.mixing and agents.sync.gossip.

Pure: every topology's matrix against an independent construction (numpy / networkx), stochasticity
and symmetry, spectra (numpy eigenvalues), exact consensus of the one-peer exponential graph after
log2(n) rounds, connectivity against networkx, push-sum's conservation laws and convergence.
Multi-process (8 gloo processes, one spawn for the module): gossip_average_ and push_sum_average_
over process groups of non-contiguous ranks against the pure reference, with the bytes they send
(counted by agents.sync.ring's shared counter)."""

from __future__ import annotations

import math
from fractions import Fraction

import networkx as nx
import numpy as np
import pytest
import torch
import torch.distributed as dist

from agents.sync.mixing import (
    TOPOLOGIES,
    check_mixing_matrix,
    gossip_step,
    graph_connected,
    is_connected,
    is_symmetric_topology,
    mixing_matrix,
    period,
    push_sum_estimate,
    push_sum_step,
    torus_shape,
)

SIZES = list(range(1, 18))


def _doubly(w: torch.Tensor, tol=1e-14):
    assert w.dtype == torch.float64 and (w >= 0).all()
    assert torch.allclose(w.sum(0), torch.ones(len(w), dtype=torch.float64), rtol=0, atol=tol)
    assert torch.allclose(w.sum(1), torch.ones(len(w), dtype=torch.float64), rtol=0, atol=tol)


def _prod(mats) -> np.ndarray:
    """The matrix of applying mats[0], then mats[1], ...: mats[-1] @ ... @ mats[0]."""
    p = np.eye(len(mats[0]))
    for m in mats:
        p = m.numpy() @ p
    return p


# --------------------------------------------------------------------------------------- validation


def test_bad_arguments_raise_one_clear_line():
    with pytest.raises(ValueError, match=r"^unknown topology 'star'; allowed: exponential, random, ring, torus$"):
        mixing_matrix("star", 4)
    for bad in (0, -3, 2.0, True, "4"):
        with pytest.raises(ValueError, match=r"^n \(the number of nodes\) must be an integer >= 1, got"):
            mixing_matrix("ring", bad)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        mixing_matrix("exponential", 4, step=-1)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        mixing_matrix("random", 4, seed=-1)
    with pytest.raises(ValueError, match="unknown topology"):
        is_connected("mesh", 4)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        is_connected("ring", 0)
    with pytest.raises(ValueError, match="row 1 sums to"):
        check_mixing_matrix([[1.0, 0.0], [0.5, 0.25]], cols=False)
    with pytest.raises(ValueError, match="column 0 sums to"):
        check_mixing_matrix([[0.5, 0.0], [0.0, 1.0]], rows=False)
    with pytest.raises(ValueError, match="not symmetric"):
        check_mixing_matrix([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], symmetric=True)
    with pytest.raises(ValueError, match="non-negative"):
        check_mixing_matrix([[1.5, -0.5], [-0.5, 1.5]])
    with pytest.raises(ValueError, match="square"):
        check_mixing_matrix(torch.ones(2, 3) / 3)


def test_every_undirected_matrix_is_symmetric_and_doubly_stochastic():
    for topo in TOPOLOGIES:
        for n in SIZES:
            for t in range(5):
                w = mixing_matrix(topo, n, step=t, seed=3)
                assert w.shape == (n, n)
                if is_symmetric_topology(topo, n):
                    assert torch.equal(w, w.T), (topo, n, t)
                    _doubly(w)
                    check_mixing_matrix(w, symmetric=True)
                else:  # only the exponential graph over a non-power of two is directed
                    assert topo == "exponential" and n & (n - 1) != 0
                    check_mixing_matrix(w, rows=False)  # column-stochastic: what push-sum needs
                    assert not torch.equal(w, w.T)
    assert all(is_symmetric_topology(t, 1) for t in TOPOLOGIES)


# ----------------------------------------------------------------------------------------- topologies


def test_ring_against_a_circulant():
    assert torch.equal(mixing_matrix("ring", 1), torch.ones(1, 1, dtype=torch.float64))
    assert torch.equal(mixing_matrix("ring", 2), torch.full((2, 2), 0.5, dtype=torch.float64))
    for n in range(3, 12):
        eye = np.eye(n)
        ref = (eye + np.roll(eye, 1, axis=1) + np.roll(eye, -1, axis=1)) / 3
        np.testing.assert_array_equal(mixing_matrix("ring", n).numpy(), ref)
        assert mixing_matrix("ring", n, step=9).equal(mixing_matrix("ring", n))  # static


def test_torus_against_networkx_grid():
    assert [torus_shape(n) for n in (1, 2, 4, 6, 7, 8, 9, 12, 16, 18)] == [
        (1, 1), (1, 2), (2, 2), (2, 3), (1, 7), (2, 4), (3, 3), (3, 4), (4, 4), (3, 6)]
    for n in SIZES + [25, 30]:
        rows, cols = torus_shape(n)
        g = nx.grid_2d_graph(rows, cols, periodic=True)  # simple graph: duplicate wrap edges merged
        a = nx.to_numpy_array(g, nodelist=[(r, c) for r in range(rows) for c in range(cols)])
        ref = (np.eye(n) + a) / (1 + a.sum(1, keepdims=True))
        np.testing.assert_allclose(mixing_matrix("torus", n).numpy(), ref, rtol=0, atol=1e-15)
    # A big grid: self and 4 neighbours at 1/5; a prime size is a 1 x n grid, i.e. the ring.
    w = mixing_matrix("torus", 16)
    assert all(sorted(row[row > 0].tolist()) == [0.2] * 5 for row in w)
    assert torch.equal(w[5].nonzero().flatten(), torch.tensor([1, 4, 5, 6, 9]))
    for p in (2, 3, 5, 7, 13):
        assert torch.equal(mixing_matrix("torus", p), mixing_matrix("ring", p))
    # 2 x 2: up = down and left = right, so each node has 2 distinct neighbours at 1/3.
    assert torch.equal(mixing_matrix("torus", 4),
                       torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.float64) / 3)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_exponential_power_of_two_reaches_exact_consensus_in_log2_rounds(n):
    L = int(math.log2(n))
    assert period("exponential", n) == max(1, L)
    for t in range(2 * max(L, 1)):
        w = mixing_matrix("exponential", n, step=t)
        if n > 1:
            k = t % L
            for i in range(n):  # i and i XOR 2^k average 1/2 - 1/2
                assert w[i].nonzero().flatten().tolist() == sorted({i, i ^ (1 << k)})
                assert w[i, i] == 0.5 and w[i, i ^ (1 << k)] == 0.5
    J = np.full((n, n), 1.0 / n)
    for start in range(max(L, 1)):  # any log2(n) consecutive rounds, from any phase
        p = _prod([mixing_matrix("exponential", n, step=start + s) for s in range(max(L, 1))])
        np.testing.assert_allclose(p, J, rtol=0, atol=1e-12)
        if L >= 2:  # one round fewer is not consensus: blocks of n/2 entries 2/n, the rest 0
            q = _prod([mixing_matrix("exponential", n, step=start + s) for s in range(L - 1)])
            np.testing.assert_allclose(np.abs(q - J), np.full((n, n), 1.0 / n), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [3, 5, 6, 7, 12])
def test_exponential_directed_one_peer_graph(n):
    L = math.ceil(math.log2(n))
    assert period("exponential", n) == L and not is_symmetric_topology("exponential", n)
    for t in range(2 * L):
        w = mixing_matrix("exponential", n, step=t)
        peer = [(i + 2 ** (t % L)) % n for i in range(n)]
        for i in range(n):  # node i keeps half and sends half to i + 2^k
            col = w[:, i]
            assert col[i] == 0.5 and col[peer[i]] == 0.5 and (col > 0).sum() == 2
        # One in-neighbour per node too: (I + cyclic shift)/2, so the rows also sum to 1.
        _doubly(w)
    # Not exact after a period, but converging to the mean: the period product's second largest
    # |eigenvalue| is < 1 (numpy), and 30 periods get within 1e-9 of the all-1/n matrix.
    p = _prod([mixing_matrix("exponential", n, step=s) for s in range(L)])
    J = np.full((n, n), 1.0 / n)
    assert np.abs(p - J).max() > 1e-3
    lam = sorted(np.abs(np.linalg.eigvals(p)), reverse=True)
    assert abs(lam[0] - 1) < 1e-12 and lam[1] < 1 - 1e-3
    np.testing.assert_allclose(np.linalg.matrix_power(p, 30), J, rtol=0, atol=1e-9)


def test_random_matching_is_a_seeded_perfect_matching():
    for n in SIZES:
        for t in range(6):
            w = mixing_matrix("random", n, step=t, seed=11)
            assert torch.equal(w, mixing_matrix("random", n, step=t, seed=11))  # a function of (seed, step)
            idle = [i for i in range(n) if w[i, i] == 1]
            assert len(idle) == n % 2  # odd n: exactly one node idles
            for i in range(n):
                if i not in idle:
                    (j,) = [j for j in range(n) if j != i and w[i, j] > 0]
                    assert w[i, i] == w[i, j] == w[j, i] == w[j, j] == 0.5
    draws = {tuple(mixing_matrix("random", 8, step=t, seed=s).flatten().tolist())
             for t in range(6) for s in range(3)}
    assert len(draws) > 10  # steps and seeds change the matching
    # Every pair is eventually matched (what makes the random topology connected).
    seen = sum((mixing_matrix("random", 6, step=t) > 0).int() for t in range(200))
    assert (seen > 0).all()


# ------------------------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("topo", ["ring", "torus"])
def test_second_eigenvalue_below_one(topo):
    for n in range(2, 20):
        w = mixing_matrix(topo, n).numpy()
        lam = np.sort(np.linalg.eigvalsh(w))[::-1]  # symmetric: real spectrum
        assert abs(lam[0] - 1) < 1e-12 and max(abs(lam[1]), abs(lam[-1])) < 1 - 1e-6, (n, lam)
        if topo == "ring" and n >= 3:  # closed form of the circulant (1 + 2 cos(2 pi k / n)) / 3
            ref = np.sort((1 + 2 * np.cos(2 * np.pi * np.arange(n) / n)) / 3)[::-1]
            np.testing.assert_allclose(lam, ref, rtol=0, atol=1e-12)


def test_time_varying_products_contract():
    for n in (3, 4, 6, 8, 9):
        p = _prod([mixing_matrix("random", n, step=t, seed=5) for t in range(12)])
        lam = sorted(np.abs(np.linalg.eigvals(p)), reverse=True)
        assert abs(lam[0] - 1) < 1e-12 and lam[1] < 1
        # A single matching never mixes everything (n > 2): eigenvalue 1 has multiplicity > 1.
        lam1 = sorted(np.abs(np.linalg.eigvals(mixing_matrix("random", n, seed=5).numpy())), reverse=True)
        assert abs(lam1[1] - 1) < 1e-12


# -------------------------------------------------------------------------------------- connectivity


def test_connectivity():
    for topo in TOPOLOGIES:
        for n in SIZES:
            assert is_connected(topo, n)
    # Windows shorter than a period are not connected; a full period is.
    assert not is_connected("exponential", 8, steps=2) and is_connected("exponential", 8, steps=3)
    # Directed, n = 6: step 0 alone is the cycle i -> i + 1, already strongly connected.
    assert is_connected("exponential", 6, steps=1)
    assert not graph_connected(mixing_matrix("exponential", 6, step=1))  # i -> i + 2: two 3-cycles
    assert not is_connected("random", 6, steps=1) and is_connected("random", 2, steps=1)
    assert is_connected("random", 6, steps=50)
    # Disconnected and only weakly connected graphs, against networkx on random sparse digraphs.
    assert not graph_connected(torch.block_diag(mixing_matrix("ring", 3), mixing_matrix("ring", 4)))
    chain = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 1.0]])  # 0 -> 1 -> 2 only
    assert not graph_connected(chain) and graph_connected([chain, chain.T])
    rng = np.random.default_rng(0)
    answers = set()
    for _ in range(200):
        n = int(rng.integers(1, 8))
        a = (rng.random((n, n)) < 0.25).astype(float) + np.eye(n)
        ref = nx.is_strongly_connected(nx.from_numpy_array(a.T, create_using=nx.DiGraph))  # edge j -> i
        assert graph_connected(torch.tensor(a / a.sum(0))) == ref
        answers.add(ref)
    assert answers == {True, False}


# ------------------------------------------------------------------------------------------ push-sum


def _column_only(n: int) -> torch.Tensor:
    """A strongly connected directed graph with unequal out-degrees: node i sends to i+1; node 0 also
    to every other node. Uniform shares over (self + out-neighbours): column-stochastic, rows not."""
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        outs = {i, (i + 1) % n} | (set(range(n)) if i == 0 else set())
        for k in outs:
            w[k, i] = 1.0 / len(outs)
    return w


@pytest.mark.parametrize("n", [3, 5])
def test_push_sum_conserves_and_converges_where_plain_gossip_is_biased(n):
    w = _column_only(n)
    check_mixing_matrix(w, rows=False)
    assert (w.sum(1) - 1).abs().max() > 0.1  # not row-stochastic
    x0 = torch.randn(n, 4, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    mean = x0.mean(0)
    x, wt = x0.clone(), torch.ones(n, dtype=torch.float64)
    for _ in range(200):
        x, wt = push_sum_step(x, wt, w)
        assert abs(float(wt.sum()) - n) < 1e-12
        torch.testing.assert_close(x.sum(0), x0.sum(0), rtol=0, atol=1e-12)
    assert (wt - 1).abs().max() > 0.05  # the weights really moved
    est = push_sum_estimate(x, wt)
    torch.testing.assert_close(est, mean.expand_as(est), rtol=0, atol=1e-10)
    # Plain gossip with the same matrix is not row-stochastic: it neither averages nor keeps a mean.
    y = x0.clone()
    for _ in range(200):
        y = gossip_step(y, w)
    assert (y - mean).abs().max() > 1e-2


def test_push_sum_is_exact_in_exact_arithmetic():
    # Dyadic shares and integer values: float64 is exact here, so the sums are conserved bit for bit.
    # The same run in Fractions is the reference.
    n = 5
    x0 = torch.arange(1, n + 1, dtype=torch.float64) * 8 - 3
    x, wt = x0.clone(), torch.ones(n, dtype=torch.float64)
    fx, fw = [Fraction(int(v)) for v in x0], [Fraction(1)] * n
    for t in range(20):
        m = mixing_matrix("exponential", n, step=t)
        x, wt = push_sum_step(x, wt, m)
        fm = [[Fraction(float(m[i, j])) for j in range(n)] for i in range(n)]
        fx = [sum(fm[i][j] * fx[j] for j in range(n)) for i in range(n)]
        fw = [sum(fm[i][j] * fw[j] for j in range(n)) for i in range(n)]
        assert float(x.sum()) == float(x0.sum()) and float(wt.sum()) == n
        assert [Fraction(float(v)) for v in x] == fx and [Fraction(float(v)) for v in wt] == fw
    est = push_sum_estimate(x, wt)
    assert (est - x0.mean()).abs().max() < 1e-3  # converging (0.2 per period of 3)
    with pytest.raises(ValueError, match="column-stochastic"):
        push_sum_step(x[:2], wt[:2], torch.tensor([[0.5, 0.5], [0.5, 0.0]]))
    with pytest.raises(ValueError, match="must both have 5 nodes"):
        push_sum_step(x[:4], wt[:4], mixing_matrix("ring", 5))


# ------------------------------------------------------------------------------- multi-process (gloo)

WORLD = 8
# Groups of non-contiguous global ranks (group rank = position among the sorted members).
EXP_GROUPS = {2: [1, 6], 4: [0, 2, 5, 7], 8: list(range(8))}
PUSH_GROUPS = {3: [0, 4, 6], 5: [1, 2, 3, 5, 7]}
PUSH_STEPS = 60
SHAPES = {"a": ((5, 3), torch.float64), "b": ((7,), torch.float32), "c": ((2, 2), torch.float64)}


def _start_values(R: int, node: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * R + node)
    return [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) + 1
            for shape, dtype in SHAPES.values()]


def _gossip_worker(rank, world, out):
    from agents.sync import gossip
    from agents.sync.ring import SentBytes, comm_bytes

    groups = {("exp", R): dist.new_group(m) for R, m in EXP_GROUPS.items()}
    groups.update({("push", R): dist.new_group(m) for R, m in PUSH_GROUPS.items()})
    groups[("random", 5)] = dist.new_group(PUSH_GROUPS[5])
    res = {}
    for R, members in EXP_GROUPS.items():
        if rank not in members:
            continue
        g, me = groups[("exp", R)], dist.get_rank(groups[("exp", R)])
        ts = _start_values(R, me)
        before = comm_bytes()
        sent = [gossip.gossip_average_(ts, g, mixing_matrix("exponential", R, step=t), me)
                for t in range(int(math.log2(R)))]
        res[("exp", R)] = {"node": me, "values": [t.clone() for t in ts], "sent": sent,
                           "counted": comm_bytes() - before}
        if R == 4:
            with pytest.raises(ValueError, match="not row-stochastic.*push_sum_average_"):
                gossip.gossip_average_(ts, g, _column_only(4), me)
            with pytest.raises(ValueError, match="group has 4 members"):
                gossip.gossip_average_(ts, g, mixing_matrix("ring", 5))
    for R, members in PUSH_GROUPS.items():
        if rank not in members:
            continue
        g, me = groups[("push", R)], dist.get_rank(groups[("push", R)])
        runs = {}
        for name, mats in (("exponential", [mixing_matrix("exponential", R, step=t) for t in range(PUSH_STEPS)]),
                           ("column_only", [_column_only(R)] * PUSH_STEPS)):
            ts, w, hist = _start_values(R, me), 1.0, []
            with SentBytes() as sent:
                for m in mats:
                    w = gossip.push_sum_average_(ts, w, g, m)
                    hist.append(w)
            runs[name] = {"node": me, "values": [t.clone() for t in ts], "weights": hist,
                          "bytes": sent.bytes}
        res[("push", R)] = runs
    if rank in PUSH_GROUPS[5]:
        g = groups[("random", 5)]
        me = dist.get_rank(g)
        ts = [torch.nn.Parameter(t) for t in _start_values(5, me)]  # as model.parameters() would be
        m = mixing_matrix("random", 5, step=3, seed=7)
        res[("random", 5)] = {"node": me, "sent": gossip.gossip_average_(ts, g, m),
                              "values": [t.detach().clone() for t in ts]}
    torch.save(res, f"{out}/rank{rank}.pt")


def _spawn_forkserver(fn, world, *args):
    """tests.test_tensor_parallel.spawn's workers (same _entry: gloo, one thread, os._exit), but
    forked from a forkserver that imported torch and this module once: 8 fresh interpreters each
    importing torch took ~45 s on a loaded 2-core host, this ~6 s."""
    import multiprocessing
    import os

    import torch.multiprocessing as mp

    from launch.multiproc import free_port
    from tests.test_tensor_parallel import _entry

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the server (started here unless already running) passes it on
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", __name__])
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                           start_method="forkserver")
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="module")
def gossip_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("gossip")
    _spawn_forkserver(_gossip_worker, WORLD, str(out))
    merged: dict = {}
    for r in range(WORLD):
        for key, val in torch.load(out / f"rank{r}.pt", weights_only=False).items():
            merged.setdefault(key, []).append(val)
    return merged


def _by_node(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda e: e["node"])


def _stack_start(R: int) -> list[torch.Tensor]:
    return [torch.stack([_start_values(R, i)[k] for i in range(R)]) for k in range(len(SHAPES))]


def _bytes_per_message() -> dict:
    return {dt: sum(math.prod(s) * torch.empty(0, dtype=dt).element_size()
                    for s, d in SHAPES.values() if d == dt) for dt in (torch.float64, torch.float32)}


@pytest.mark.dist
@pytest.mark.parametrize("R", sorted(EXP_GROUPS))
def test_gossip_exponential_exact_consensus_after_log2_rounds(gossip_runs, R):
    nodes = _by_node(gossip_runs[("exp", R)])
    assert [e["node"] for e in nodes] == list(range(R))
    L = int(math.log2(R))
    ref = _stack_start(R)
    for k, (_, dtype) in enumerate(SHAPES.values()):
        start_mean = ref[k].double().mean(0)
        got = torch.stack([e["values"][k] for e in nodes]).double()
        assert got.dtype == torch.float64 and nodes[0]["values"][k].dtype == dtype
        consensus_err = (got - got.mean(0)).abs().max()
        assert consensus_err <= 1e-6, (k, float(consensus_err))
        # Pairwise 1/2-1/2 sums are commutative and the halvings exact: the replicas agree bit for bit.
        assert torch.equal(got, got[:1].expand_as(got)), k
        drift = (got.mean(0) - start_mean).abs().max()
        assert drift <= (1e-7 if dtype == torch.float64 else 1e-6), (k, float(drift))
        torch.testing.assert_close(got, start_mean.expand_as(got), rtol=0,
                                   atol=1e-12 if dtype == torch.float64 else 1e-6)
        # And against the pure reference, round by round.
        x = ref[k]
        for t in range(L):
            x = gossip_step(x, mixing_matrix("exponential", R, step=t))
        torch.testing.assert_close(got, x.double(), rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    # One peer per round, one message per dtype holding exactly the payload.
    per_round = sum(_bytes_per_message().values())
    for e in nodes:
        assert e["sent"] == [per_round] * L and e["counted"] == per_round * L  # the shared counter


@pytest.mark.dist
@pytest.mark.parametrize("R", sorted(PUSH_GROUPS))
@pytest.mark.parametrize("graph", ["exponential", "column_only"])
def test_push_sum_on_directed_graphs(gossip_runs, R, graph):
    nodes = _by_node([e[graph] for e in gossip_runs[("push", R)]])
    assert [e["node"] for e in nodes] == list(range(R))
    weights = torch.tensor([e["weights"] for e in nodes], dtype=torch.float64)  # [R, steps]
    torch.testing.assert_close(weights.sum(0), torch.full((PUSH_STEPS,), float(R), dtype=torch.float64),
                               rtol=0, atol=1e-12)
    if graph == "column_only":
        assert (weights[:, -1] - 1).abs().max() > 0.05  # weights really differ from 1 there
    w_final = weights[:, -1]
    # Reference: the pure push-sum on the mass x = w * z from the same start.
    ref = _stack_start(R)
    for k, (_, dtype) in enumerate(SHAPES.values()):
        est = torch.stack([e["values"][k] for e in nodes]).double()
        mean = ref[k].double().mean(0)
        total = (est * w_final.reshape(-1, *[1] * (est.dim() - 1))).sum(0)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(total, ref[k].double().sum(0), rtol=0, atol=tol * 10)  # mass conserved
        torch.testing.assert_close(est, mean.expand_as(est), rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-5)
        x, w = ref[k].double(), torch.ones(R, dtype=torch.float64)
        for t in range(PUSH_STEPS):
            m = mixing_matrix("exponential", R, step=t) if graph == "exponential" else _column_only(R)
            x, w = push_sum_step(x, w, m)
        torch.testing.assert_close(est, push_sum_estimate(x, w), rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
        torch.testing.assert_close(w_final, w, rtol=0, atol=1e-12)
    # Bytes (agents.sync.ring's counter): per step, one message per dtype and the float64 weight to
    # each out-neighbour.
    per_msg = sum(_bytes_per_message().values()) + 8
    for i, e in enumerate(nodes):
        outs = [sum(1 for k in range(R) if k != i and m[k, i] > 0) for m in (
            [mixing_matrix("exponential", R, step=t) for t in range(PUSH_STEPS)] if graph == "exponential"
            else [_column_only(R)] * PUSH_STEPS)]
        assert e["bytes"] == per_msg * sum(outs)


@pytest.mark.dist
def test_gossip_random_matching_idle_node_sends_nothing(gossip_runs):
    nodes = _by_node(gossip_runs[("random", 5)])
    m = mixing_matrix("random", 5, step=3, seed=7)
    ref = [gossip_step(x, m) for x in _stack_start(5)]
    for k in range(len(SHAPES)):
        torch.testing.assert_close(torch.stack([e["values"][k] for e in nodes]), ref[k], rtol=0, atol=1e-6)
    idle = [i for i in range(5) if m[i, i] == 1]
    assert len(idle) == 1
    per_msg = sum(_bytes_per_message().values())
    assert [e["sent"] for e in nodes] == [0 if i in idle else per_msg for i in range(5)]
    assert torch.equal(torch.stack([e["values"][0] for e in nodes])[idle[0]], _stack_start(5)[0][idle[0]])
