"""Fused kernels for the GPT model, selected per run with `model.kernels: auto | fused | torch`.

The model calls every fusable op through the namespace returned by `get_ops(mode)`; the op
signatures and semantics are those of the PyTorch references in `reference.py`:

    layer_norm(x, weight, bias, eps, residual=None)  -> y | (y, x + residual)
    rms_norm(x, weight, eps, residual=None)          -> y | (y, x + residual)
    bias_gelu(x, bias)                               -> gelu_tanh(x + bias)
    swiglu(gate, up)                                 -> silu(gate) * up
    cross_entropy(logits, targets, ignore_index=-100, *, inplace_backward=False) -> mean loss
    rope(q, k, cos, sin)                             -> (q_rot, k_rot)   rotate-half convention
    token_cross_entropy(logits, targets, ignore_index=-100)       -> float32 [...]  -log p(target)
    token_entropy(logits)                                         -> float32 [...]  -sum p log p
    token_logprob_and_entropy(logits, targets, ignore_index=-100) -> (log p(target), entropy)

What each kernel fuses (forward and backward are both hand-written, CPU: C++ with
`at::parallel_for` + AVX2, CUDA: 128-bit vectorised fast paths with scalar fallbacks, warp/block
reductions; float32 accumulation everywhere)
------------------------------------------------------------------------------------------------
* layer_norm / rms_norm: the residual add, the row statistics and the affine transform in one
  pass over the row (writes y and, with `residual`, the new residual stream h); backward computes
  dx, the residual gradient (grad of h added in) and weight/bias gradients in one pass, the latter
  as per-chunk float32 partial sums.  Weights may be float32 with bf16 activations.
* bias_gelu: bias add + tanh-GELU; backward recomputes from the saved input and reduces the bias
  gradient in the same pass.
* swiglu: silu(gate) * up in one pass (gate/up may be strided views, e.g. halves of one GEMM);
  backward writes both gradients in one pass.
* rope: q and k rotated straight from their (possibly transposed) [B, H, T, D] views into
  contiguous outputs; backward applies the transposed rotation.  cos/sin [T, D] or [B, 1, T, D].
* cross_entropy: one pass over each logits row computes log-sum-exp and the loss; only the lse
  [tokens] is saved.  No float32 copy, no log-softmax, no second [tokens, vocab] tensor: backward
  writes softmax - onehot straight into the gradient, or with `inplace_backward=True` into the
  logits buffer itself (zero extra memory; only when nothing else reads the logits afterwards, as
  in a training loss where the logits are not returned - the version counter is bumped so misuse
  fails loudly).  `ignore_index` rows contribute nothing; the mean is over non-ignored rows.
* vocab_parallel_cross_entropy(logits_shard, targets, vocab_start, group): Megatron-style CE over
  a tensor-parallel vocabulary split; all-reduces per-row max / sum-exp / target logit only.
* token_cross_entropy / token_entropy / token_logprob_and_entropy: per-token values (float32, no
  reduction) with per-token upstream gradients, for policy-gradient losses (log pi(a_t|s_t) and the
  exact entropy H(pi(.|s_t)), both differentiable).  The CE reuses the cross-entropy kernels (the
  backward takes a per-row scale); the entropy kernels keep (max, sum exp, sum exp x logit) per
  row in one pass and write dH/dz = -p (log p + H) in one backward pass; the combined op reads the
  logits once for both.  Vocabulary-parallel variants: vocab_parallel_token_cross_entropy,
  vocab_parallel_token_entropy, vocab_parallel_token_logprob_and_entropy (see vocab_parallel.py).

dtypes: CPU float32 and bfloat16; CUDA float32, bfloat16 and float16.  Inputs outside the
kernels' coverage (float64, another device, mixed dtypes that change the result type,
broadcasting shapes) use the reference, never a wrong kernel.

Building and selecting
----------------------
The kernels are compiled just in time on first use (not at import) with
`torch.utils.cpp_extension.load` into `build/kernels/<torch>-<cpu|cuda>...` (override with
`LLMK_BUILD_DIR`), under a file lock so concurrent ranks do not race; the loaded library is
cached per process.  `python -m model.kernels.build` (used by `make kernels`) prebuilds; see
`build.py` for flags (`LLMK_CPU_ISA`, `TORCH_CUDA_ARCH_LIST`).  One CPU library serves all CPU
ops (first build about 10-20 s on 2 cores); the CUDA library is built only where torch has CUDA
and a GPU is visible.  The library is chosen per call from the input's device.

Fallback rule
-------------
* `torch`: the references, always.
* `fused`: the compiled kernels; if the library for the input's device cannot be built, the op
  raises RuntimeError naming the failure (no silent fallback).
* `auto`: the compiled kernels where they build; otherwise the reference, with ONE RuntimeWarning
  per process and device type that names what failed.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from . import reference

OP_NAMES = ("layer_norm", "rms_norm", "bias_gelu", "swiglu", "cross_entropy", "rope", "token_cross_entropy",
            "token_entropy", "token_logprob_and_entropy")
MODES = ("auto", "fused", "torch")


def _reference_cross_entropy(logits, targets, ignore_index: int = -100, *, inplace_backward: bool = False):
    # Same signature as the fused op; the reference has no in-place option.
    return reference.cross_entropy(logits, targets, ignore_index=ignore_index)


def reference_ops() -> SimpleNamespace:
    ops = {name: getattr(reference, name) for name in OP_NAMES}
    ops["cross_entropy"] = _reference_cross_entropy
    return SimpleNamespace(mode="torch", **ops)


@functools.cache
def _kernel_ops(mode: str) -> SimpleNamespace:
    from . import ops as kops  # imports torch.ops wrappers only; nothing is built here

    return SimpleNamespace(mode=mode, **{name: functools.partial(getattr(kops, name), mode=mode)
                                         for name in OP_NAMES})


def get_ops(mode: str = "torch") -> SimpleNamespace:
    """Namespace with the ops of OP_NAMES for `mode` in {"auto", "fused", "torch"} (see module docstring)."""
    if mode == "torch":
        return reference_ops()
    if mode in ("auto", "fused"):
        return _kernel_ops(mode)
    raise ValueError(f"unknown kernel mode {mode!r}; allowed: auto, fused, torch")


def set_kernels(module, mode: str) -> None:
    """Switch every `ops` namespace inside `module` (the module itself included) to `mode`'s ops,
    keeping the parameters. A namespace that wraps the ops (one that has `rebase(base)`, such as
    tensor parallelism's vocabulary-parallel loss) is rebuilt over the new base instead of being
    replaced; modules that shared one namespace share the new one."""
    base = get_ops(mode)
    new: dict[int, object] = {}
    for m in module.modules():
        ops = getattr(m, "ops", None)
        if ops is None:
            continue
        if id(ops) not in new:
            rebase = getattr(ops, "rebase", None)
            new[id(ops)] = rebase(base) if rebase is not None else base
        m.ops = new[id(ops)]


def vocab_parallel_cross_entropy(logits_shard, targets, vocab_start: int, group=None, ignore_index: int = -100,
                                 **kwargs):
    """See `model.kernels.vocab_parallel.vocab_parallel_cross_entropy`."""
    from .vocab_parallel import vocab_parallel_cross_entropy as fn

    return fn(logits_shard, targets, vocab_start, group, ignore_index, **kwargs)


def vocab_parallel_token_cross_entropy(logits_shard, targets, vocab_start: int, group=None, ignore_index: int = -100,
                                       **kwargs):
    """See `model.kernels.vocab_parallel.vocab_parallel_token_cross_entropy`."""
    from .vocab_parallel import vocab_parallel_token_cross_entropy as fn

    return fn(logits_shard, targets, vocab_start, group, ignore_index, **kwargs)


def vocab_parallel_token_entropy(logits_shard, group=None, **kwargs):
    """See `model.kernels.vocab_parallel.vocab_parallel_token_entropy`."""
    from .vocab_parallel import vocab_parallel_token_entropy as fn

    return fn(logits_shard, group, **kwargs)


def vocab_parallel_token_logprob_and_entropy(logits_shard, targets, vocab_start: int, group=None,
                                             ignore_index: int = -100, **kwargs):
    """See `model.kernels.vocab_parallel.vocab_parallel_token_logprob_and_entropy`."""
    from .vocab_parallel import vocab_parallel_token_logprob_and_entropy as fn

    return fn(logits_shard, targets, vocab_start, group, ignore_index, **kwargs)


__all__ = ["MODES", "OP_NAMES", "get_ops", "reference_ops", "vocab_parallel_cross_entropy",
           "vocab_parallel_token_cross_entropy", "vocab_parallel_token_entropy",
           "vocab_parallel_token_logprob_and_entropy"]
