"""Megatron-style tensor parallelism (TP) and optional sequence parallelism (SP) for the GPT modules.

`apply_tensor_parallel(module, tp_group, sequence_parallel)` converts, in place, every module of
`module` (a whole `GPT` or a pipeline stage built from the same pieces) that it recognises; each
rank keeps its slice of the full weights already there, so all ranks must start from the same full
weights (same seed, or the same checkpoint), or build on the meta device, convert, `to_empty`,
re-tie (`GPT.tie_weights`, as without TP) and load this rank's `shard_state_dict(...)`.

    what (found by)                          split                      communication (fwd / bwd)
    Attention (type)                          heads and kv heads         enter once: f
      q_proj, k_proj, v_proj                  column (output rows)       -
      o_proj                                  row (input columns)        g, then + bias
    GeluMLP / SwiGLUMLP (type)                                           enter once: f
      fc | gate_proj, up_proj                 column                     -
      proj | down_proj                        row                        g, then + bias
    `tok_emb` (nn.Embedding, by name)         vocabulary rows            mask out-of-shard ids, g
    `lm_head` (nn.Linear, by name)            vocabulary rows            f; logits stay sharded
    loss (`ops.cross_entropy` of modules      -                          all-reduce of the row max,
      with an `ops` namespace)                                           sum-exp and target logit

    f = copy to the TP region:     identity forward, all-reduce backward
    g = reduce from the TP region: all-reduce forward, identity backward

The biases of row-parallel layers are replicated and added once, after the reduce.  With tied
embeddings (gpt2) the embedding and the head share one shard parameter, exactly as the unsplit
model shares one tensor.  Parameter names and the state-dict keys are unchanged (the shapes are
the local slices), so `shard_state_dict` / `merge_state_dicts` map between a TP rank and the
single-process model, and checkpoints/exports consolidate with `merge_state_dicts`.

Sequence parallelism (Megatron-SP, `sequence_parallel=True`): the activations between the
TP regions ([B, T, D], the residual stream, norms, dropout) are split along the sequence
(T / tp per rank); f becomes an all-gather along T (backward: reduce-scatter) and g a
reduce-scatter (backward: all-gather).  The token embedding reduce-scatters, the position
embedding (gpt2) takes the local chunk of positions; the final norm runs on the chunk and the head
all-gathers before its matmul, so logits are [B, T, V / tp].  Parameters used on sequence chunks
(norm weights and biases, row-parallel biases) enter through f, so their gradients are all-reduced
over the TP group inside the backward pass.  T must be divisible by tp (so incremental decoding
with a KV cache needs `sequence_parallel=False`).

Gradients: every rank calls `loss.backward()` on the same loss; the gradients of replicated
parameters come out identical on all TP ranks, so no extra TP reduction is needed (data-parallel
reduction stays the trainer's business).

Dropout: replicated activations (the residual stream without SP) must get the same mask on
every TP rank, and they do: all ranks seed the global RNG alike and draw from it in step.  Dropout
on activations that are split over the ranks (attention over each rank's heads; with SP every
dropout, since it acts on sequence chunks) must instead differ between ranks, or head h and head
h + n_head/tp (chunk 0 and chunk 1) would share one mask.  Those regions run under
`tensor_parallel_rng` (Megatron's "model-parallel RNG", without a second stored state; see there).
With dropout > 0 a TP run is statistically equivalent to, not bit-equal with, the unsplit model
(with dropout 0 it matches it within float tolerance).

Generation: the decoding engine (`model.generate.DecodeEngine`, under `GPT.generate`) gathers the
last-position logits through `lm_head.gather_logits` (set `lm_head.gather_output = True` for full
logits from `forward`); it needs sequence_parallel=False,
and for sampling (temperature > 0) every TP rank must draw the same tokens: pass generators with
the same seed on all ranks (greedy decoding needs nothing).
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .gpt import Attention, GeluMLP, LayerNorm, RMSNorm, SwiGLUMLP

SEQ_DIM = -2  # activations are [B, T, D] (or [T, D])

# CPU tensors (gloo) use list all-gather and all-reduce + slice instead of the single-tensor
# collectives, which gloo lacks in older torch; tests flip this to exercise the NCCL code path.
GLOO_TENSOR_COLLECTIVES = False

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TPInfo",
    "TensorParallelOps",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "apply_tensor_parallel",
    "check_tensor_parallel",
    "copy_to_tensor_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "merge_state_dicts",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "shard_state_dict",
    "split_dim",
    "tensor_parallel_rng",
    "vocab_parallel_cross_entropy",
]


class TPInfo:
    """The tensor-parallel group of a converted module: group, size, this rank, sequence_parallel.

    Shared by reference (also across `copy.deepcopy`), since process groups cannot be copied."""

    def __init__(self, group=None, sequence_parallel: bool = False):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("tensor parallelism needs torch.distributed to be initialized")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the tensor-parallel group")
        self.sequence_parallel = bool(sequence_parallel)

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"TPInfo(size={self.size}, rank={self.rank}, sequence_parallel={self.sequence_parallel})"


def _info(group, sequence_parallel: bool = False) -> TPInfo:
    return group if isinstance(group, TPInfo) else TPInfo(group, sequence_parallel)


# --------------------------------------------------------------------------------------------------
# Collectives (out of place: the caller's tensor is never modified).


def _tensor_collectives(x: torch.Tensor) -> bool:
    return x.device.type != "cpu" or GLOO_TENSOR_COLLECTIVES


def _all_reduce(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    y = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(y, group=tp.group)
    return y


def _check_split(x: torch.Tensor, dim: int, tp: TPInfo) -> None:
    n = x.shape[dim]
    if n % tp.size:
        what = "sequence length" if dim in (SEQ_DIM, x.dim() + SEQ_DIM) else f"dimension {dim}"
        hint = (" (sequence parallelism needs T divisible by tp; use sequence_parallel=False, e.g. for "
                "decoding with a KV cache)") if what == "sequence length" else ""
        raise ValueError(f"{what} {n} is not divisible by the tensor-parallel size {tp.size}{hint}")


def _split(x: torch.Tensor, dim: int, tp: TPInfo) -> torch.Tensor:
    _check_split(x, dim, tp)
    return x.chunk(tp.size, dim)[tp.rank].contiguous()


def _all_gather(x: torch.Tensor, dim: int, tp: TPInfo) -> torch.Tensor:
    x = x.contiguous()
    if _tensor_collectives(x):
        buf = x.new_empty((tp.size * x.shape[0],) + tuple(x.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(buf, x, group=tp.group)
        if dim % x.dim() == 0:
            return buf
        parts = buf.chunk(tp.size, 0)
    else:
        parts = [torch.empty_like(x) for _ in range(tp.size)]
        dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, tp: TPInfo) -> torch.Tensor:
    _check_split(x, dim, tp)
    if not _tensor_collectives(x):
        return _all_reduce(x, tp).chunk(tp.size, dim)[tp.rank].contiguous()
    dim = dim % x.dim()
    if dim == 0:
        inp = x.contiguous()
    else:  # chunks along `dim` laid out one after the other
        inp = torch.stack(x.chunk(tp.size, dim), 0)
        inp = inp.view((-1,) + tuple(inp.shape[2:]))
    out_shape = list(x.shape)
    out_shape[dim] //= tp.size
    out = x.new_empty(out_shape)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, inp, group=tp.group)
    return out


# --------------------------------------------------------------------------------------------------
# The conjugate autograd functions.


class _CopyToRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.tp), None


class _ReduceFromRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x, tp)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromSequence(torch.autograd.Function):
    """SP's f: all-gather along T forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _all_gather(x, SEQ_DIM, tp)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, SEQ_DIM, ctx.tp), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """SP's g: reduce-scatter along T forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _reduce_scatter(x, SEQ_DIM, tp)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, SEQ_DIM, ctx.tp), None


class _ScatterToSequence(torch.autograd.Function):
    """Replicated -> this rank's chunk of T forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _split(x, SEQ_DIM, tp)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, SEQ_DIM, ctx.tp), None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather along the last dim forward (e.g. vocab-sharded logits), local slice backward."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _all_gather(x, -1, tp)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.tp), None


def copy_to_tensor_parallel_region(x, group=None):
    tp = _info(group)
    return x if tp.size == 1 else _CopyToRegion.apply(x, tp)


def reduce_from_tensor_parallel_region(x, group=None):
    tp = _info(group)
    return x if tp.size == 1 else _ReduceFromRegion.apply(x, tp)


def gather_from_sequence_parallel_region(x, group=None):
    tp = _info(group)
    return x if tp.size == 1 else _GatherFromSequence.apply(x, tp)


def reduce_scatter_to_sequence_parallel_region(x, group=None):
    tp = _info(group)
    return x if tp.size == 1 else _ReduceScatterToSequence.apply(x, tp)


def scatter_to_sequence_parallel_region(x, group=None):
    tp = _info(group)
    return x if tp.size == 1 else _ScatterToSequence.apply(x, tp)


def gather_from_tensor_parallel_region(x, group=None):
    """Concatenate the last dim over the TP ranks (e.g. full logits from vocab shards)."""
    tp = _info(group)
    return x if tp.size == 1 else _GatherFromRegion.apply(x, tp)


def _enter(x, tp: TPInfo):
    """Input of a block of column-parallel layers (f, or all-gather along T under SP)."""
    return gather_from_sequence_parallel_region(x, tp) if tp.sequence_parallel else copy_to_tensor_parallel_region(x, tp)


def _exit(y, tp: TPInfo):
    """Output of a row-parallel layer (g, or reduce-scatter along T under SP)."""
    if tp.sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(y, tp)
    return reduce_from_tensor_parallel_region(y, tp)


def _replicated(p, tp: TPInfo):
    """A replicated parameter used on sequence chunks: its gradient is all-reduced over TP."""
    if p is None or not tp.sequence_parallel:
        return p
    return copy_to_tensor_parallel_region(p, tp)


# --------------------------------------------------------------------------------------------------
# Layers.  Each converts an existing module in place (class swap + local parameter slices), so a
# module keeps its name, its other attributes and its place in the tree.


def _shard(p: nn.Parameter | None, dim: int, tp: TPInfo, memo: dict) -> nn.Parameter | None:
    """This rank's contiguous slice of `p` along `dim`, as a new parameter; the same source tensor
    sliced the same way gives the same parameter (tied weights stay tied)."""
    if p is None:
        return None
    key = (id(p), dim)
    if key not in memo:
        n = p.shape[dim] // tp.size
        data = p.detach().narrow(dim, tp.rank * n, n).clone()
        shard = nn.Parameter(data, requires_grad=p.requires_grad)
        shard.tp_sharded = True  # each tp rank holds a different slice (gradient-norm accounting)
        memo[key] = (p, shard)  # keep p alive for id()
    return memo[key][1]


class ColumnParallelLinear(nn.Linear):
    """y_r = x W_r^T + b_r with W_r, b_r this rank's rows (output features) of W, b.

    `enter_region` applies f (or SP's all-gather) to the input; off when the parent module
    enters once for several column-parallel layers reading the same input."""

    tp: TPInfo

    @classmethod
    def convert(cls, lin: nn.Linear, tp: TPInfo, memo: dict | None = None, enter_region: bool = True):
        memo = {} if memo is None else memo
        if lin.out_features % tp.size:
            raise ValueError(f"out_features={lin.out_features} is not divisible by the tensor-parallel size {tp.size}")
        weight, bias = _shard(lin.weight, 0, tp, memo), _shard(lin.bias, 0, tp, memo)
        lin.__class__ = cls
        lin.weight = weight
        if bias is not None:
            lin.bias = bias
        lin.out_features = weight.shape[0]
        lin.tp, lin.enter_region = tp, enter_region
        return lin

    def forward(self, x):
        if self.enter_region:
            x = _enter(x, self.tp)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, local rows of tp={self.tp.size}"


class RowParallelLinear(nn.Linear):
    """y = g(x_r W_r^T) + b with W_r this rank's columns (input features) of W; b replicated and
    added once after the reduce (reduce-scatter under SP)."""

    tp: TPInfo

    @classmethod
    def convert(cls, lin: nn.Linear, tp: TPInfo, memo: dict | None = None):
        memo = {} if memo is None else memo
        if lin.in_features % tp.size:
            raise ValueError(f"in_features={lin.in_features} is not divisible by the tensor-parallel size {tp.size}")
        weight = _shard(lin.weight, 1, tp, memo)
        lin.__class__ = cls
        lin.weight = weight
        lin.in_features = weight.shape[1]
        lin.tp = tp
        return lin

    def forward(self, x):
        y = _exit(F.linear(x, self.weight), self.tp)
        if self.bias is not None:
            y = y + _replicated(self.bias, self.tp)
        return y

    def reduce_partial(self, partial):
        """The layer's output from this rank's partial product `partial` (x_r W_r^T plus anything else
        that is summed over the ranks, e.g. a LoRA adapter's partial delta, agents.lora): reduced as
        `forward` reduces its own, then + b."""
        y = _exit(partial, self.tp)
        if self.bias is not None:
            y = y + _replicated(self.bias, self.tp)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, local columns of tp={self.tp.size}"


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_end) of the table on each rank; ids outside give zeros, then g
    (reduce-scatter along T under SP)."""

    tp: TPInfo

    @classmethod
    def convert(cls, emb: nn.Embedding, tp: TPInfo, memo: dict | None = None):
        memo = {} if memo is None else memo
        _check_vocab(emb.num_embeddings, tp.size, "tok_emb")
        if emb.padding_idx is not None or emb.max_norm is not None or emb.sparse or emb.scale_grad_by_freq:
            raise ValueError("VocabParallelEmbedding supports plain embeddings only (no padding_idx, max_norm, "
                             "sparse or scale_grad_by_freq)")
        weight = _shard(emb.weight, 0, tp, memo)
        emb.__class__ = cls
        emb.vocab_size = emb.num_embeddings
        emb.weight = weight
        emb.num_embeddings = weight.shape[0]
        emb.vocab_start = tp.rank * emb.num_embeddings
        emb.vocab_end = emb.vocab_start + emb.num_embeddings
        emb.tp = tp
        return emb

    def forward(self, ids):
        if self.tp.size == 1:
            out = F.embedding(ids, self.weight)
        else:
            local = ids - self.vocab_start
            outside = (local < 0) | (local >= self.num_embeddings)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return _exit(out, self.tp)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vocab rows [{self.vocab_start}, {self.vocab_end}) of {self.vocab_size}"


class VocabParallelLMHead(ColumnParallelLinear):
    """The output head split over the vocabulary: logits [..., V / tp], columns
    [vocab_start, vocab_end) of the full logits (all of them when `gather_output`)."""

    @classmethod
    def convert(cls, lin: nn.Linear, tp: TPInfo, memo: dict | None = None, enter_region: bool = True):
        _check_vocab(lin.out_features, tp.size, "lm_head")
        vocab = lin.out_features
        super().convert(lin, tp, memo, enter_region)
        lin.vocab_size = vocab
        lin.vocab_start = tp.rank * lin.out_features
        lin.vocab_end = lin.vocab_start + lin.out_features
        lin.gather_output = False
        return lin

    def forward(self, x):
        logits = super().forward(x)
        return self.gather_logits(logits) if self.gather_output else logits

    def gather_logits(self, logits):
        """Full-vocabulary logits from this head's shards (for sampling; not needed for the loss).
        Logits that are already full (`gather_output`) are returned as they are."""
        if self.tp.size == 1 or logits.shape[-1] != self.out_features:
            return logits
        return gather_from_tensor_parallel_region(logits, self.tp)

    def cross_entropy(self, logits, targets, ignore_index: int = -100, *, use_kernels: bool | None = False,
                      inplace_backward: bool = False):
        """Mean CE over targets != ignore_index from this head's logits (sharded or gathered)."""
        if self.tp.size == 1 or logits.shape[-1] == self.vocab_size:  # full logits (gathered)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=ignore_index)
        if logits.shape[-1] != self.out_features:
            raise ValueError(f"logits have {logits.shape[-1]} columns; the vocab-parallel head makes "
                             f"{self.out_features} (of {self.vocab_size})")
        return vocab_parallel_cross_entropy(logits, targets, self.vocab_start, self.tp, ignore_index,
                                            use_kernels=use_kernels, inplace_backward=inplace_backward)


def vocab_parallel_cross_entropy(logits_shard, targets, vocab_start: int, group=None, ignore_index: int = -100,
                                 *, use_kernels: bool | None = False, inplace_backward: bool = False):
    """Mean cross-entropy from logits split over the vocabulary (see `model.kernels.vocab_parallel`:
    all-reduces of the row max, the sum of exponentials and the target logit only; backward needs no
    communication).  `group` may be a process group or a `TPInfo`; use_kernels as there."""
    from .kernels.vocab_parallel import vocab_parallel_cross_entropy as fn

    group = group.group if isinstance(group, TPInfo) else group
    return fn(logits_shard, targets, vocab_start, group, ignore_index, use_kernels=use_kernels,
              inplace_backward=inplace_backward)


class SequenceParallelPositionEmbedding(nn.Embedding):
    """Replicated position table whose output is this rank's chunk of T (SP); the backward
    all-gathers, so the table's gradient is complete on every rank."""

    tp: TPInfo

    def forward(self, positions):
        return scatter_to_sequence_parallel_region(super().forward(positions), self.tp)


@contextlib.contextmanager
def tensor_parallel_rng(tp: TPInfo, device: torch.device):
    """Run the body with the RNG of `device` seeded for this TP rank; restore it afterwards.

    The seed is one draw from the global CPU generator plus the TP rank.  Every rank draws the
    same number, so the global streams stay identical across the group (replicated dropout keeps
    matching); the body's masks differ per rank.  Unlike a separately stored per-rank RNG state
    (Megatron's tracker), this needs nothing extra in checkpoints (the global state already makes
    resume exact), and activation recomputation is consistent for free: torch.utils.checkpoint
    restores the global CPU state before recomputing, so the recomputed draw, seed and masks equal
    the forward's."""
    seed = int(torch.randint(0, 2**62, (1,)).item()) + tp.rank
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[], device_type="cuda"):
            torch.random.default_generator.manual_seed(seed)
            yield


class _EnterOnce:
    """Mixin for a module whose column-parallel layers all read its first input: f (or SP's
    all-gather) once per call instead of once per layer."""

    tp: TPInfo

    def forward(self, x, *args, **kwargs):
        return super().forward(_enter(x, self.tp), *args, **kwargs)


class ParallelAttention(_EnterOnce, Attention):
    """Attention over this rank's heads (n_head / tp query heads, n_kv_head / tp kv heads)."""

    def forward(self, x, *args, **kwargs):
        if self.training and self.dropout > 0:  # per-rank masks for per-rank heads
            with tensor_parallel_rng(self.tp, x.device):
                return super().forward(x, *args, **kwargs)
        return super().forward(x, *args, **kwargs)


class SequenceParallelDropout(nn.Dropout):
    """Dropout on this rank's chunk of the sequence (SP): per-rank masks."""

    tp: TPInfo

    def forward(self, x):
        if self.training and self.p > 0:
            with tensor_parallel_rng(self.tp, x.device):
                return super().forward(x)
        return super().forward(x)


class ParallelGeluMLP(_EnterOnce, GeluMLP):
    pass


class ParallelSwiGLUMLP(_EnterOnce, SwiGLUMLP):
    pass


class SequenceParallelLayerNorm(LayerNorm):
    tp: TPInfo

    def forward(self, x, residual=None):
        return self.ops.layer_norm(x, _replicated(self.weight, self.tp), _replicated(self.bias, self.tp),
                                   self.eps, residual=residual)


class SequenceParallelRMSNorm(RMSNorm):
    tp: TPInfo

    def forward(self, x, residual=None):
        return self.ops.rms_norm(x, _replicated(self.weight, self.tp), self.eps, residual=residual)


_PARALLEL = {Attention: ParallelAttention, GeluMLP: ParallelGeluMLP, SwiGLUMLP: ParallelSwiGLUMLP,
             LayerNorm: SequenceParallelLayerNorm, RMSNorm: SequenceParallelRMSNorm}
_CONVERTED = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, SequenceParallelPositionEmbedding,
              _EnterOnce, SequenceParallelLayerNorm, SequenceParallelRMSNorm, SequenceParallelDropout)


def _swap_class(m: nn.Module, base: type, tp: TPInfo) -> None:
    if type(m) is not base:
        raise TypeError(f"tensor parallelism: {type(m).__name__} (a subclass of {base.__name__}) is not supported")
    m.__class__ = _PARALLEL[base]
    m.tp = tp


# --------------------------------------------------------------------------------------------------
# The loss path.


class TensorParallelOps:
    """The `ops` namespace of a converted model: the base ops, except that `cross_entropy` takes
    logits sharded over the vocabulary (vocab-parallel CE; gathered logits use the base op).
    `model.kernels.set_kernels` (and `GPT.set_kernels`) keeps the wrapper through `rebase`."""

    def __init__(self, base, head: VocabParallelLMHead):
        self.base = base
        self.head = head

    def __getattr__(self, name):
        if name.startswith("__") or name in ("base", "head"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def rebase(self, base) -> TensorParallelOps:
        return TensorParallelOps(base, self.head)

    def cross_entropy(self, logits, targets, ignore_index: int = -100, *, inplace_backward: bool = False):
        head = self.head
        if head.tp.size == 1 or logits.shape[-1] == head.vocab_size:  # full logits (gathered)
            return self.base.cross_entropy(logits, targets, ignore_index=ignore_index,
                                           inplace_backward=inplace_backward)
        # kernels: torch -> plain torch; fused -> the kernel or an error; auto -> the kernel where it builds.
        use_kernels = {"torch": False, "fused": True}.get(getattr(self.base, "mode", "torch"))
        return head.cross_entropy(logits, targets, ignore_index, use_kernels=use_kernels,
                                  inplace_backward=inplace_backward)

    def __repr__(self) -> str:
        return f"TensorParallelOps(mode={getattr(self.base, 'mode', None)!r}, tp={self.head.tp.size})"


# --------------------------------------------------------------------------------------------------
# Conversion.


def _check_vocab(n: int, tp: int, what: str) -> None:
    if n % tp:
        raise ValueError(f"tensor parallelism: the vocabulary ({what}: {n} rows) is not divisible by tp={tp}; "
                         f"pad it to a multiple of 64*tp (trainer.model_setup.padded_vocab)")


def _check_heads(n_head: int, n_kv_head: int, tp: int) -> None:
    if n_head % tp:
        raise ValueError(f"tensor parallelism: n_head={n_head} is not divisible by tp={tp}")
    if n_kv_head % tp:
        raise ValueError(f"tensor parallelism: n_kv_head={n_kv_head} is not divisible by tp={tp} "
                         "(replicated kv heads are not supported)")


def _check_ff(n: int, tp: int) -> None:
    if n % tp:
        raise ValueError(f"tensor parallelism: the MLP width d_ff={n} is not divisible by tp={tp}")


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _mlp_width(m: nn.Module) -> int:
    if isinstance(m, GeluMLP):
        return m.fc.out_features
    if m.gate_proj.out_features != m.up_proj.out_features:
        raise ValueError("tensor parallelism: gate_proj and up_proj have different widths")
    return m.up_proj.out_features


def apply_tensor_parallel(module: nn.Module, tp_group=None, sequence_parallel: bool = False) -> nn.Module:
    """Split `module` (a GPT or a pipeline stage) over the ranks of `tp_group` (None: the default
    group), in place; returns it.  Every rank must hold the same full weights.  `module(x,
    targets=y)` then returns the loss of the unsplit model; `module(x)` returns logits sharded
    over the vocabulary.  Raises ValueError (before changing anything) when the vocabulary, heads,
    kv heads or MLP width are not divisible by the group size."""
    tp = TPInfo(tp_group, sequence_parallel)
    named = list(module.named_modules())
    # Validate everything first, so an error leaves the module untouched.
    for name, m in named:
        if isinstance(m, _CONVERTED):
            raise ValueError(f"{name or type(m).__name__} is already tensor parallel")
        if isinstance(m, Attention):
            _check_heads(m.n_head, m.n_kv_head, tp.size)
        elif isinstance(m, (GeluMLP, SwiGLUMLP)):
            _check_ff(_mlp_width(m), tp.size)
        elif _last(name) == "tok_emb" and isinstance(m, nn.Embedding):
            _check_vocab(m.num_embeddings, tp.size, name)
        elif _last(name) == "lm_head" and isinstance(m, nn.Linear):
            _check_vocab(m.out_features, tp.size, name)
        converts = (Attention, GeluMLP, SwiGLUMLP) + ((LayerNorm, RMSNorm) if sequence_parallel else ())
        if isinstance(m, converts) and type(m) not in _PARALLEL:
            raise TypeError(f"tensor parallelism: {name}: subclass {type(m).__name__} is not supported")

    memo: dict = {}
    head = None
    tied_source = None
    for name, m in named:
        last = _last(name)
        if isinstance(m, Attention):
            for lin in (m.q_proj, m.k_proj, m.v_proj):
                ColumnParallelLinear.convert(lin, tp, memo, enter_region=False)
            RowParallelLinear.convert(m.o_proj, tp, memo)
            m.n_head //= tp.size
            m.n_kv_head //= tp.size
            _swap_class(m, Attention, tp)
        elif isinstance(m, GeluMLP):
            ColumnParallelLinear.convert(m.fc, tp, memo, enter_region=False)
            RowParallelLinear.convert(m.proj, tp, memo)
            _swap_class(m, GeluMLP, tp)
        elif isinstance(m, SwiGLUMLP):
            ColumnParallelLinear.convert(m.gate_proj, tp, memo, enter_region=False)
            ColumnParallelLinear.convert(m.up_proj, tp, memo, enter_region=False)
            RowParallelLinear.convert(m.down_proj, tp, memo)
            _swap_class(m, SwiGLUMLP, tp)
        elif isinstance(m, (LayerNorm, RMSNorm)):
            if sequence_parallel:
                _swap_class(m, type(m), tp)
        elif last == "tok_emb" and isinstance(m, nn.Embedding):
            tied_source = (name, m.weight)  # the full table, before it is sliced
            VocabParallelEmbedding.convert(m, tp, memo)
        elif type(m) is nn.Dropout:
            if sequence_parallel:  # every dropout of an SP model acts on sequence chunks
                m.__class__ = SequenceParallelDropout
                m.tp = tp
        elif last == "pos_emb" and isinstance(m, nn.Embedding):
            if sequence_parallel:
                m.__class__ = SequenceParallelPositionEmbedding
                m.tp = tp
        elif last == "lm_head" and isinstance(m, nn.Linear):
            VocabParallelLMHead.convert(m, tp, memo)
            head = m
    if head is None and tied_source is not None:
        # A pipeline's last stage computes tied logits from the embedding table (no lm_head
        # module). Give that embedding's owner a vocab-parallel head over the same shard (the memo
        # returns the shard already made for tok_emb), unregistered so the state dict is unchanged.
        emb_name, full_weight = tied_source
        with torch.device("meta"):
            lin = nn.Linear(full_weight.shape[1], full_weight.shape[0], bias=False)
        lin.weight = full_weight
        head = VocabParallelLMHead.convert(lin, tp, memo)
        owner = module.get_submodule(emb_name.rpartition(".")[0]) if "." in emb_name else module
        object.__setattr__(owner, "tied_lm_head", head)
    memo.clear()

    if head is not None:  # the loss of this tree reads vocab-sharded logits
        wrapped: dict[int, TensorParallelOps] = {}
        for m in module.modules():
            ops = getattr(m, "ops", None)
            if ops is None:
                continue
            base = ops.base if isinstance(ops, TensorParallelOps) else ops
            if id(base) not in wrapped:
                wrapped[id(base)] = TensorParallelOps(base, head)
            m.ops = wrapped[id(base)]
    module.tensor_parallel = tp
    return module


# --------------------------------------------------------------------------------------------------
# State dicts: full <-> per-rank.

# Keys split along dim 0 (column-parallel weights and biases, vocabulary rows) and dim 1
# (row-parallel weights); matched on the key's tail so any prefix (pipeline stage, wrapper) works.
_ROWS = re.compile(r"(?:^|\.)(?:tok_emb\.weight|lm_head\.(?:weight|bias)|attn\.[qkv]_proj\.(?:weight|bias)"
                   r"|mlp\.(?:fc|gate_proj|up_proj)\.(?:weight|bias))$")
_COLS = re.compile(r"(?:^|\.)(?:attn\.o_proj|mlp\.(?:proj|down_proj))\.weight$")


def _split_dim(key: str) -> int | None:
    if _ROWS.search(key):
        return 0
    if _COLS.search(key):
        return 1
    return None


def split_dim(key: str) -> int | None:
    """The dimension along which `shard_state_dict` splits the tensor of state-dict key `key` (0: rows,
    column-parallel and vocabulary; 1: columns, row-parallel), None when it is replicated."""
    return _split_dim(key)


def _same_tensor_key(t: torch.Tensor):
    """Equal for views of the same memory (tied weights: `state_dict()` detaches each key separately)."""
    if t.device.type == "meta" or not t.untyped_storage().data_ptr():
        return ("id", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _check_config(config: GPTConfig, tp_size: int) -> None:
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    _check_vocab(config.vocab_size, tp_size, "vocab_size")
    _check_heads(config.n_head, config.n_kv_head, tp_size)
    _check_ff(config.d_ff, tp_size)


def check_tensor_parallel(config: GPTConfig, tp_size: int) -> None:
    """Raise ValueError (one line) unless a model of `config` splits over `tp_size` ranks: vocabulary,
    heads, kv heads and MLP width divisible by it. Needs no process group (servers check before starting
    ranks)."""
    _check_config(config, tp_size)


def shard_state_dict(full_sd: dict, config: GPTConfig, tp_size: int, tp_rank: int) -> dict:
    """The state dict rank `tp_rank` of `tp_size` holds after `apply_tensor_parallel` (same keys,
    local slices; replicated entries are shared with `full_sd`, tied entries stay one tensor)."""
    _check_config(config, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is out of range for tp_size={tp_size}")
    out, memo = {}, {}
    for key, t in full_sd.items():
        dim = _split_dim(key)
        if dim is None or tp_size == 1:
            out[key] = t
            continue
        ident = (_same_tensor_key(t), dim)
        if ident not in memo:
            if t.shape[dim] % tp_size:
                raise ValueError(f"{key}: size {t.shape[dim]} along dim {dim} is not divisible by tp={tp_size}")
            n = t.shape[dim] // tp_size
            memo[ident] = t.narrow(dim, tp_rank * n, n).clone()
        out[key] = memo[ident]
    return out


def merge_state_dicts(shards: list[dict], config: GPTConfig) -> dict:
    """Inverse of `shard_state_dict`: the full state dict from the shards of ranks 0..tp-1 (in
    order).  Replicated entries are taken from rank 0."""
    if not shards:
        raise ValueError("merge_state_dicts needs at least one shard")
    tp_size = len(shards)
    _check_config(config, tp_size)
    keys = list(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if list(s) != keys:
            raise ValueError(f"shard {r} has other keys than shard 0")
    out, memo = {}, {}
    for key in keys:
        dim = _split_dim(key)
        if dim is None or tp_size == 1:
            out[key] = shards[0][key]
            continue
        ident = (tuple(_same_tensor_key(s[key]) for s in shards), dim)
        if ident not in memo:
            memo[ident] = torch.cat([s[key] for s in shards], dim=dim)
        out[key] = memo[ident]
    return out
