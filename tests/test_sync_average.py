"""agents.sync.average: FedAvg of state dicts (n_i/n-weighted, float64 accumulation, strict checks)
and consensus_dist (relative RMS distance of the replicas to their mean) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.sync.average import consensus_dist, fedavg


def _replica(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    emb = torch.rand(6, 4, generator=g, dtype=torch.float32) * 2 - 1
    return {
        "emb.weight": emb,
        "head.weight": emb,  # tied to emb.weight
        "w64": torch.rand(3, 5, generator=g, dtype=torch.float64) * 2 - 1,
        "b16": (torch.rand(8, generator=g) * 2 - 1).to(torch.bfloat16),
        "step": torch.tensor(7, dtype=torch.int64),  # integer buffer, equal in every replica
        "mask": torch.tensor([True, False, True]),
    }


COUNTS = [1, 3, 12]


def test_fedavg_is_the_count_weighted_average_not_the_plain_mean():
    sds = [_replica(s) for s in range(3)]
    copies = [{k: v.clone() for k, v in sd.items()} for sd in sds]
    out = fedavg(sds, COUNTS)
    n = sum(COUNTS)
    assert list(out) == list(sds[0])
    for k in ("emb.weight", "w64", "b16"):
        ref64 = sum(c / n * sd[k].double() for c, sd in zip(COUNTS, sds))
        assert out[k].dtype == sds[0][k].dtype and out[k].shape == sds[0][k].shape, k
        # Accumulated in float64 and cast once: within half a unit in the last place of the dtype
        # (plus float64 noise) of the exact weighted sum; fp32 (and fp64) to 1e-7 absolute.
        half_ulp = torch.finfo(out[k].dtype).eps / 2 * ref64.abs() * (1 + 1e-9) + 1e-15
        assert ((out[k].double() - ref64).abs() <= half_ulp).all(), k
        if k != "b16":
            torch.testing.assert_close(out[k].double(), ref64, rtol=0, atol=1e-7)
        plain = sum(sd[k].double() for sd in sds) / len(sds)
        assert (out[k].double() - plain).abs().max() > 1e-2, f"{k}: weighting made no difference"
    assert out["head.weight"] is out["emb.weight"]  # tied in, tied out
    assert torch.equal(out["step"], sds[0]["step"]) and out["step"] is not sds[0]["step"]
    assert torch.equal(out["mask"], sds[0]["mask"])
    for sd, cp in zip(sds, copies):  # inputs untouched
        assert all(torch.equal(sd[k], cp[k]) for k in sd)


def test_fedavg_special_counts():
    sds = [_replica(s) for s in range(3)]
    # Only proportions matter; float counts (e.g. token fractions) are fine.
    a, b = fedavg(sds, [1, 3, 12]), fedavg(sds, [0.25, 0.75, 3.0])
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A zero count drops a replica.
    c, d = fedavg(sds, [0, 3, 12]), fedavg(sds[1:], [3, 12])
    assert all(torch.equal(c[k], d[k]) for k in c)
    # One replica: itself; equal counts: the plain mean.
    e = fedavg(sds[:1], [5])
    assert all(torch.equal(e[k], sds[0][k]) for k in e)
    f = fedavg(sds, torch.tensor([2, 2, 2]))
    torch.testing.assert_close(f["w64"], sum(sd["w64"] for sd in sds) / 3, rtol=0, atol=1e-15)


def test_fedavg_errors():
    sds = [_replica(s) for s in range(2)]
    with pytest.raises(ValueError, match=r"counts\[1\] = -1 is negative"):
        fedavg(sds, [2, -1])
    with pytest.raises(ValueError, match="counts sum to 0"):
        fedavg(sds, [0, 0])
    with pytest.raises(ValueError, match=r"counts\[0\] = nan"):
        fedavg(sds, [float("nan"), 1])
    with pytest.raises(ValueError, match="3 counts for 2 state dicts"):
        fedavg(sds, [1, 1, 1])
    with pytest.raises(ValueError, match="non-empty list"):
        fedavg([], [])

    def broken(key, value=None, drop=False):
        sd = dict(_replica(1))
        if drop:
            del sd[key]
        else:
            sd[key] = value
        return [sds[0], sd]

    with pytest.raises(ValueError, match="key 'w64' is missing from state_dicts\\[1\\]"):
        fedavg(broken("w64", drop=True), [1, 1])
    with pytest.raises(ValueError, match="key 'extra' is only in state_dicts\\[1\\]"):
        fedavg(broken("extra", torch.zeros(1)), [1, 1])
    with pytest.raises(ValueError, match="key 'w64' has shape \\(5, 3\\)"):
        fedavg(broken("w64", torch.zeros(5, 3, dtype=torch.float64)), [1, 1])
    with pytest.raises(ValueError, match="key 'w64' has dtype torch.float32"):
        fedavg(broken("w64", torch.zeros(3, 5)), [1, 1])
    with pytest.raises(ValueError, match="non-floating tensor 'step'"):
        fedavg(broken("step", torch.tensor(8)), [1, 1])
    with pytest.raises(ValueError, match="non-floating tensor 'mask'"):
        fedavg(broken("mask", torch.tensor([True, True, True])), [1, 1])


def test_consensus_dist_by_hand():
    t = torch.tensor
    # One parameter: mean [2, 0]; deviations +-[1, 0] -> RMS 1; ||mean|| = 2.
    assert consensus_dist([{"p": t([1.0, 0.0])}, {"p": t([3.0, 0.0])}]) == pytest.approx(0.5, abs=1e-15)
    # Several keys, three replicas: mean a=[1, 1], b=[3]; squared deviations 3, 3, 4 -> mean 10/3;
    # ||mean||^2 = 11. The integer buffer is checked, not measured.
    sds = [{"a": t([0.0, 0.0]), "b": t([2.0]), "n": t(1)},
           {"a": t([2.0, 2.0]), "b": t([2.0]), "n": t(1)},
           {"a": t([1.0, 1.0]), "b": t([5.0]), "n": t(1)}]
    assert consensus_dist(sds) == pytest.approx(math.sqrt(10 / 33), rel=1e-14)
    # Equal replicas: 0 (also with a zero mean); different replicas around a zero mean: inf.
    rep = _replica(3)
    assert consensus_dist([rep, {k: v.clone() for k, v in rep.items()}, rep]) == 0.0
    assert consensus_dist([{"p": torch.zeros(3)}] * 2) == 0.0
    assert consensus_dist([{"p": t([1.0])}, {"p": t([-1.0])}]) == math.inf
    with pytest.raises(ValueError, match="non-floating tensor 'n'"):
        consensus_dist([sds[0], {**sds[1], "n": t(2)}])


def test_consensus_dist_against_numpy():
    sds = [_replica(s) for s in range(4)]
    # Tied keys count once: the vector is emb, w64, b16 (each as float64).
    theta = np.stack([np.concatenate([sd[k].double().numpy().ravel() for k in ("emb.weight", "w64", "b16")])
                      for sd in sds])
    mean = theta.mean(0)
    ref = np.sqrt(((theta - mean) ** 2).sum(1).mean()) / np.linalg.norm(mean)
    assert consensus_dist(sds) == pytest.approx(float(ref), rel=1e-12)
    # FedAvg'd replicas agree exactly.
    avg = fedavg(sds, [1, 2, 3, 4])
    assert consensus_dist([avg] * 3) == 0.0


def test_package_exports():
    import agents.sync as sync
    from agents.sync import average, mixing

    assert sync.fedavg is average.fedavg and sync.mixing_matrix is mixing.mixing_matrix
