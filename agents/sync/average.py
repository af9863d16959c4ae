"""Averaging whole replicas: FedAvg of state dicts, and how far replicas are from agreeing.

Both functions take the replicas' state dicts as a list (every dict with the same keys, each key with
the same shape and dtype in every dict) and treat a key by its dtype: floating-point (and complex)
tensors are parameters and are averaged / measured; every other tensor (integer or bool buffers such
as step counters or masks) and every non-tensor value must be equal in all dicts and is passed
through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

import torch


def _is_param(v) -> bool:
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def _check_dicts(state_dicts: Sequence[Mapping], what: str) -> list[str]:
    """Validate that the dicts agree in keys, shapes and dtypes; return the keys (first dict's order)."""
    if isinstance(state_dicts, Mapping) or not isinstance(state_dicts, Sequence) or not state_dicts:
        raise ValueError(f"{what}: state_dicts must be a non-empty list of state dicts")
    keys = list(state_dicts[0])
    ref = set(keys)
    for i, sd in enumerate(state_dicts[1:], 1):
        if not isinstance(sd, Mapping):
            raise ValueError(f"{what}: state_dicts[{i}] is a {type(sd).__name__}, not a state dict")
        if set(sd) != ref:
            missing, extra = sorted(ref - set(sd)), sorted(set(sd) - ref)
            key = (missing or extra)[0]
            raise ValueError(f"{what}: key {key!r} is {'missing from' if missing else 'only in'} "
                             f"state_dicts[{i}] (keys differ from state_dicts[0])")
    for k in keys:
        v0 = state_dicts[0][k]
        for i, sd in enumerate(state_dicts[1:], 1):
            v = sd[k]
            if isinstance(v0, torch.Tensor) != isinstance(v, torch.Tensor):
                raise ValueError(f"{what}: key {k!r} is a tensor in one state dict and not in another")
            if isinstance(v0, torch.Tensor):
                if v.shape != v0.shape:
                    raise ValueError(f"{what}: key {k!r} has shape {tuple(v.shape)} in state_dicts[{i}], "
                                     f"{tuple(v0.shape)} in state_dicts[0]")
                if v.dtype != v0.dtype:
                    raise ValueError(f"{what}: key {k!r} has dtype {v.dtype} in state_dicts[{i}], "
                                     f"{v0.dtype} in state_dicts[0]")
                if not _is_param(v0) and not torch.equal(v.to(v0.device), v0):
                    raise ValueError(f"{what}: non-floating tensor {k!r} ({v0.dtype}) differs between "
                                     f"state_dicts[0] and state_dicts[{i}]; only floating tensors are averaged")
            elif v != v0:
                raise ValueError(f"{what}: non-tensor value {k!r} differs between state_dicts[0] and "
                                 f"state_dicts[{i}]")
    return keys


def fedavg(state_dicts: Sequence[Mapping], counts: Sequence[Real]) -> dict:
    """The FedAvg average ``sum_i (n_i / n) * theta_i`` with ``n = sum_i n_i`` of ``state_dicts``
    (theta_i) weighted by ``counts`` (n_i: e.g. the samples or tokens each replica saw).

    Floating tensors are accumulated in float64 (complex128 for complex) and cast back to their dtype,
    on the device of ``state_dicts[0]``'s tensor; other tensors and non-tensor values must be equal in
    every dict and are returned from ``state_dicts[0]`` (tensors cloned). Keys keep the first dict's
    order; two keys sharing one tensor in ``state_dicts[0]`` (tied weights) share one in the result.
    A replica with ``n_i = 0`` does not contribute (but is still checked).

    ValueError: counts not one finite number >= 0 per state dict (negative counts are named), a zero
    total, keys that differ, or a key whose shape, dtype or (non-floating) value differs (named)."""
    if isinstance(state_dicts, Mapping) or not isinstance(state_dicts, Sequence) or not state_dicts:
        raise ValueError("fedavg: state_dicts must be a non-empty list of state dicts")
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    counts = list(counts)
    if len(counts) != len(state_dicts):
        raise ValueError(f"fedavg: {len(counts)} counts for {len(state_dicts)} state dicts")
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, Real) or not math.isfinite(c):
            raise ValueError(f"fedavg: counts[{i}] = {c!r} is not a finite number")
        if c < 0:
            raise ValueError(f"fedavg: counts[{i}] = {c!r} is negative; counts must be >= 0")
    total = math.fsum(counts)
    if total <= 0:
        raise ValueError(f"fedavg: the counts sum to {total!r}; at least one replica needs a count > 0")
    keys = _check_dicts(state_dicts, "fedavg")
    coeffs = [c / total for c in counts]

    out: dict = {}
    done: dict[int, str] = {}  # id of a tensor of state_dicts[0] -> the first key that holds it
    first = state_dicts[0]
    for k in keys:
        v0 = first[k]
        if isinstance(v0, torch.Tensor) and id(v0) in done:
            out[k] = out[done[id(v0)]]  # tied: one tensor in, one tensor out
            continue
        if _is_param(v0):
            acc_dtype = torch.complex128 if v0.is_complex() else torch.float64
            acc = torch.zeros(v0.shape, dtype=acc_dtype, device=v0.device)
            for c, sd in zip(coeffs, state_dicts):
                if c:
                    acc.add_(sd[k].detach().to(device=v0.device, dtype=acc_dtype), alpha=c)
            out[k] = acc.to(v0.dtype)
        elif isinstance(v0, torch.Tensor):
            out[k] = v0.detach().clone()
        else:
            out[k] = v0
        if isinstance(v0, torch.Tensor):
            done[id(v0)] = k
    return out


def consensus_dist(state_dicts: Sequence[Mapping]) -> float:
    """Relative RMS distance of R replicas' weights to their mean, over all floating parameters.

    With ``theta_i`` the concatenation (in float64, in key order) of every floating tensor of
    ``state_dicts[i]`` (each tensor once, even when tied under two keys), ``mean = (1/R) sum_i theta_i``
    (the plain, unweighted mean) and ``||.||`` the Euclidean norm::

        consensus_dist = sqrt( (1/R) * sum_i ||theta_i - mean||^2 ) / ||mean||

    0.0 when all replicas are equal (also when ``mean`` is 0); ``inf`` when they differ and
    ``||mean|| = 0``. Integer/bool tensors and non-tensor values are not measured but must be equal
    across replicas, as in `fedavg` (ValueError otherwise, naming the key)."""
    keys = _check_dicts(state_dicts, "consensus_dist")
    first, seen = state_dicts[0], set()
    params = []
    for k in keys:
        v0 = first[k]
        if _is_param(v0) and id(v0) not in seen:
            seen.add(id(v0))
            params.append(k)
    R = len(state_dicts)
    sq_dev = 0.0
    sq_mean = 0.0
    for k in params:
        v0 = first[k]
        acc = torch.complex128 if v0.is_complex() else torch.float64
        if all(torch.equal(sd[k].to(v0.device), v0) for sd in state_dicts[1:]):
            sq_mean += float(v0.to(acc).abs().pow(2).sum())  # exactly 0 deviation, no rounding of a mean
            continue
        stack = torch.stack([sd[k].detach().to(device=v0.device, dtype=acc) for sd in state_dicts])
        mean = stack.mean(0)
        sq_dev += float((stack - mean).abs().pow(2).sum())
        sq_mean += float(mean.abs().pow(2).sum())
    num = math.sqrt(sq_dev / R)
    if num == 0.0:
        return 0.0
    if sq_mean == 0.0:
        return math.inf
    return num / math.sqrt(sq_mean)
