"""Op dispatch: the model calls every fusable op through the namespace returned by `get_ops`.

`get_ops("torch")` returns the PyTorch references in `reference.py`. `"fused"` and `"auto"`
return the compiled kernels (C++ on CPU, CUDA on GPU) where they exist; see `ops.py`.
The op signatures are those of `reference.py`.
"""

from __future__ import annotations

from types import SimpleNamespace

from . import reference

OP_NAMES = ("layer_norm", "rms_norm", "bias_gelu", "swiglu", "cross_entropy", "rope")


def reference_ops() -> SimpleNamespace:
    return SimpleNamespace(mode="torch", **{name: getattr(reference, name) for name in OP_NAMES})


def get_ops(mode: str = "torch") -> SimpleNamespace:
    if mode == "torch":
        return reference_ops()
    if mode in ("auto", "fused"):
        # Placeholder until the fused kernels land: `fused` must not pretend.
        if mode == "fused":
            raise RuntimeError("model.kernels=fused: no fused kernels are built in this version")
        return reference_ops()
    raise ValueError(f"unknown kernel mode {mode!r}; allowed: auto, fused, torch")
