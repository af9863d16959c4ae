"""Strategies by which replicas (agents holding their own weights) agree.

Stable names (used by tests outside the project):
    ring_all_reduce(tensor, group=None)   in-place sum over the group, as dist.all_reduce
    fedavg(state_dicts, counts)           the n_i/n-weighted average of state dicts
    mixing_matrix(topology, n, step=0)    the n x n gossip mixing matrix used at that step
"""

from __future__ import annotations

_EXPORTS = {"ring_all_reduce": ".ring", "fedavg": ".average", "mixing_matrix": ".mixing"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Each strategy's module is imported on first use (they pull in torch.distributed pieces).
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
