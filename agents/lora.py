r"""LoRA adapters for agents over one shared frozen GPT, and per-row adapters in one batch.

    add_adapters(gpt, {"speaker": dict(rank=8, alpha=16, targets=["q_proj", "v_proj"]),
                       "listener": dict(rank=8, alpha=16)})      # base frozen, both adapters trainable
    with use_adapter(gpt, "speaker"):                           # every forward: base + speaker's LoRA
        loss = gpt(ids, targets)
    with row_adapters(gpt, ["speaker", "listener", None]):       # row b uses names[b] (None: the base)
        logits = gpt(ids3)
    engine.generate(prompts, params, adapters=["speaker", "listener", ...])   # the same, per request
    sd = adapter_state_dict(gpt, "speaker"); load_adapter_state_dict(gpt2, "speaker", sd)
    plain = merged_state_dict(gpt, "speaker")                   # GPT keys, W + (alpha / rank) B A

Why several named adapters in one model: agents that share a base differ only by their adapters, so
one model object (one KV-cached `DecodeEngine`, one copy of the base weights) serves all of them;
rollouts put every agent's prompts in one engine call, each row with its own adapter.

What peft does here: the adapter modules (`LoraConfig`, `inject_adapter_in_model`, one call per agent;
peft's default init, B = 0, so a fresh adapter leaves the model equal to the base), the choice of the
active adapter (`use_adapter` is peft's `set_adapter`), saving/loading one adapter's weights without its
name (`get_peft_model_state_dict` / `set_peft_model_state_dict`) and the merged weight
(`get_delta_weight`). Adapters take no dropout (lora_dropout 0), so training and sampling see one function.

What peft does not do fast enough: several adapters in one batch. peft's `adapter_names=` forward
loops in Python over the adapters of every layer and must be threaded through every forward call.
Here each adapted `nn.Linear` (a peft `lora.Linear`, its class swapped to `RowLoraLinear`) reads the
plan of the `row_adapters` context in force and adds

    y[b] = base(x[b]) + x[b] A_{a(b)}^T (s_{a(b)} B_{a(b)})^T,    a(b) = names[b], s = alpha / rank

computed for all rows at once. The adapters' A^T and (s B)^T are stacked once per batch, zero-padded
to the largest rank R of the batch's adapters (a padded rank adds exact zeros), and applied by one of:

    dense  h = x [A_1^T ... A_n^T] (all n adapters, [B, T, n R]) with the columns of other adapters
           zeroed, then y += h [s_1 B_1 ... s_n B_n]^T: two GEMMs on the stacked weights as they are;
           extra FLOPs grow with n R
    bmm    each row's own A^T [B, in, R] and (s B)^T [B, R, out], gathered per row, two batched
           matmuls (the add fused in baddbmm); cost grows with the rows, not the adapters
    group  each adapter on its own rows (index_select, two matmuls, index_add): fewest FLOPs, most
           small ops
    auto   (default) per layer, dense while 4 n R <= the layer's input width, else bmm

Measured by bench/bench_lora.py (bench/results/lora-cpu.md, decode of 32 rows, rank 8, a shared 2-core
CPU whose noise is ~7%): with 8 adapters in the batch dense and bmm are both ~0.8-0.87x the speed of
the batch without adapters and group ~0.6x; with 32 adapters bmm stays at ~0.85x and dense falls to
~0.74x; with 2, dense is at least as fast as bmm. Hence auto. The stacks (and bmm's
per-row gather) are cached between forwards while the rows' adapters, the dtype and the adapter
weights (their version counters and storage) are unchanged, so the decode steps of one batch reuse
them; under autograd they are rebuilt in each forward, from the parameters (differentiable: a
training forward may mix agents too). `model/gpt.py` knows nothing of this: the engine enters
`model.row_adapter_context(names)` (set here) around its forwards.

Activation checkpointing recomputes the forward during backward: run `backward()` inside the same
`use_adapter` / `row_adapters` context as the forward (checked: the same gradients as without
checkpointing); outside it the recomputation sees another adapter (torch then usually stops with a
CheckpointError).

Targets: names of the `nn.Linear` modules inside the blocks, matched as peft matches them (the whole
module path or its last components): q_proj, k_proj, v_proj, o_proj, and fc, proj (gpt2) or gate_proj,
up_proj, down_proj (llama). lm_head (tied to the token embedding in gpt2) is not adapted, nor are
tensor-parallel layers, except for serving: `add_adapters(..., tensor_parallel=True)` on a model split by
model.tensor_parallel adds this rank's shards of the adapters (Megatron's split, RowParallelLoraLinear;
`shard_adapter_state_dict` slices a checkpoint for it). Adding adapters changes the model's state-dict keys (`...q_proj.base_layer.weight`,
`...q_proj.lora_A.<name>.weight`); `merged_state_dict` gives the plain GPT keys back.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig
from peft.functional import inject_adapter_in_model, set_adapter
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from trainer.errors import UsageError

__all__ = ["ROW_METHODS", "RowLoraLinear", "RowParallelLoraLinear", "adapter_names", "adapter_parameters",
           "adapter_state_dict", "add_adapters", "base_state_dict", "load_adapter_state_dict", "merged_state_dict",
           "rebind_adapter_parameters", "row_adapters", "shard_adapter_state_dict", "use_adapter"]

ROW_METHODS = ("auto", "dense", "bmm", "group")
DEFAULT_METHOD = "auto"
_SPEC_KEYS = {"rank", "alpha", "targets"}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_NAME_ORDER = {n: i for i, n in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj", "gate_proj",
                                           "up_proj", "down_proj"))}  # how the UsageError lists them


def _gpt(model) -> nn.Module:
    """The GPT inside a wrapper that keeps it as `.module` (a DeepSpeed engine, DDP), else `model`."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


# --------------------------------------------------------------------------------------------------
# Per-row application.


class _Rows:
    """The plan of one `row_adapters` context: row b uses adapter slot `slots[b]` (0: the base, else
    1 + the adapter's index in `distinct`); every adapter is padded to rank R, the largest rank of
    `distinct`, so that all layers share one layout."""

    def __init__(self, names: tuple, method: str, hub: _Hub):
        self.names = names
        self.hub = hub
        self.method = method
        self.distinct = tuple(dict.fromkeys(n for n in names if n is not None))
        slot = {n: i + 1 for i, n in enumerate(self.distinct)}
        self.slots = [slot[n] if n is not None else 0 for n in names]
        self.R = max((hub.specs[n]["rank"] for n in self.distinct), default=1)
        self._device = self.idx = self.groups = None
        self._masks: dict = {}
        self._generation = None

    def on(self, device) -> _Rows:
        """Make the index tensors (once, on the activations' device)."""
        if self._device != device:
            self.idx = torch.tensor(self.slots, dtype=torch.long, device=device)
            if self.method == "group":
                self.groups = [(n, torch.tensor([b for b, s in enumerate(self.slots) if s == i + 1],
                                                dtype=torch.long, device=device)) for i, n in enumerate(self.distinct)]
            self._device = device
        return self

    def mask(self, dtype) -> torch.Tensor:
        """[B, 1, n R]: 1 on the R columns of each row's adapter (method "dense"), 0 elsewhere."""
        if dtype not in self._masks:
            cols = torch.arange(len(self.distinct) * self.R, device=self.idx.device) // self.R + 1
            self._masks[dtype] = (cols[None, :] == self.idx[:, None]).to(dtype)[:, None, :]
        return self._masks[dtype]

    @property
    def generation(self) -> int:
        """The hub's weights generation, computed once per context (the key of cached stacks)."""
        if self._generation is None:
            self._generation = self.hub.generation()
        return self._generation


class _Hub:
    """One per model: its adapters (name -> spec), its LoRA layers and the row plan in force.

    `model.row_adapter_context` is this object's `context` (the generic hook `DecodeEngine` calls)."""

    def __init__(self):
        self.specs: dict[str, dict] = {}
        self.rows: _Rows | None = None
        self.method = DEFAULT_METHOD
        self.params: list[nn.Parameter] = []  # every adapter's parameters (add_adapters fills it)
        self._stamp: tuple | None = None
        self._generation = 0

    def generation(self) -> int:
        """A number that changes whenever an adapter parameter changed in place (its version counter:
        optimizer steps, load_state_dict, copy_) or its storage was replaced, so that cached stacks of
        the weights are rebuilt; checked once per row_adapters context, not per layer."""
        stamp = tuple((p._version, p.data_ptr()) for p in self.params)
        if stamp != self._stamp:
            self._stamp = stamp
            self._generation += 1
        return self._generation

    @contextlib.contextmanager
    def context(self, names: Sequence[str | None], method: str | None = None) -> Iterator[None]:
        names = tuple(names)
        unknown = [n for n in names if n is not None and n not in self.specs]
        if unknown:
            raise UsageError(f"row_adapters: unknown adapter {unknown[0]!r}; this model has: "
                             f"{', '.join(self.specs) or 'none'}")
        method = method or self.method
        if method not in ROW_METHODS:
            raise UsageError(f"row_adapters: method must be one of {', '.join(ROW_METHODS)}, got {method!r}")
        if not names:
            raise UsageError("row_adapters: no rows given (one adapter name or None per row)")
        prev, self.rows = self.rows, _Rows(names, method, self)
        try:
            yield
        finally:
            self.rows = prev


class RowLoraLinear(PeftLoraLinear):
    """peft's LoRA `Linear`, plus per-row adapters: inside `row_adapters` it returns base(x) plus each
    row's own adapter's update (see the module docstring); elsewhere it is peft's layer unchanged."""

    _lora_hub: _Hub | None = None
    _row_cache: tuple | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hub = self._lora_hub
        rows = hub.rows if hub is not None else None
        if rows is None:
            return super().forward(x, *args, **kwargs)
        if x.shape[0] != len(rows.names):
            raise ValueError(f"row_adapters: {len(rows.names)} adapter names for a batch of {x.shape[0]} rows")
        return self._add_rows(x, self.base_layer(x, *args, **kwargs), rows)

    def _add_rows(self, x: torch.Tensor, y: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """y (the base layer's output for x) plus every row's own adapter's update."""
        if not rows.distinct:
            return y
        rows = rows.on(x.device)
        method = rows.method
        if method == "auto":  # dense while its extra FLOPs stay small against the layer's own (measured)
            method = "dense" if 4 * len(rows.distinct) * rows.R <= x.shape[-1] else "bmm"
        if method == "group":
            return _group_delta(self, x, y, rows)
        x3, y3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(y.dtype), y.reshape(y.shape[0], -1, y.shape[-1])
        if method == "dense":
            # Every adapter's x A^T at once ([B, T, n R]), the other adapters' columns zeroed, then
            # y + h (s B)^T: two GEMMs with the adapters' weights as they are stacked.
            A_cat, B_cat = self._weights(rows, method, y.dtype)
            h = (x3 @ A_cat) * rows.mask(y.dtype)
            return torch.addmm(y3.reshape(-1, y3.shape[-1]), h.reshape(-1, h.shape[-1]), B_cat).view(y.shape)
        # bmm: each row's own A^T [B, in, R] and (s B)^T [B, R, out]; the add fused into baddbmm.
        At, Bt = self._weights(rows, method, y.dtype)
        return torch.baddbmm(y3, torch.bmm(x3, At), Bt).view(y.shape)

    def _weights(self, rows: _Rows, method: str, dtype):
        """The method's weights, cached while the rows' adapters (for bmm: the rows' names), the dtype and
        the adapter weights are unchanged; rebuilt in every forward under autograd."""
        use_cache = not torch.is_grad_enabled()
        key = (method, rows.distinct, rows.R, dtype, rows.generation) if use_cache else None
        cache = self._row_cache if use_cache else None
        if cache is not None and cache[0] == key:
            if method == "dense" or cache[1] == rows.names:
                return cache[2]
            At_all, Bt_all = cache[3]
        else:
            At_all, Bt_all = self._stack(rows.distinct, rows.R, dtype)
        if method == "dense":
            n, d_in, R = At_all.shape[0] - 1, At_all.shape[1], rows.R
            out = (At_all[1:].permute(1, 0, 2).reshape(d_in, n * R), Bt_all[1:].reshape(n * R, -1))
        else:
            out = (At_all.index_select(0, rows.idx), Bt_all.index_select(0, rows.idx))
        if use_cache:
            self._row_cache = (key, rows.names, out, (At_all, Bt_all))
        return out

    def _stack(self, distinct: tuple, R: int, dtype):
        """[1 + n, in, R] and [1 + n, R, out]: zeros (slot 0, the base) then each adapter's A^T and
        (s B)^T padded with zeros to rank R (a padded rank adds exact zeros). An adapter this layer does
        not have (other targets) gets zeros too."""
        base = self.get_base_layer()
        dev = base.weight.device
        At = [torch.zeros(base.in_features, R, dtype=dtype, device=dev)]
        Bt = [torch.zeros(R, base.out_features, dtype=dtype, device=dev)]
        mine = [n for n in distinct if n in self.lora_A]
        with _gathered([p for n in mine for p in (self.lora_A[n].weight, self.lora_B[n].weight)]):
            for n in distinct:
                if n not in self.lora_A:
                    At.append(At[0])
                    Bt.append(Bt[0])
                    continue
                A, B = self.lora_A[n].weight, self.lora_B[n].weight
                pad = R - A.shape[0]
                At.append(F.pad(A.t().to(dtype), (0, pad)))
                Bt.append(F.pad((B * self.scaling[n]).t().to(dtype), (0, 0, 0, pad)))
            return torch.stack(At), torch.stack(Bt)


def _gathered(params: list[nn.Parameter]):
    """The adapters' weights whole while they are read outside their modules' forward: under DeepSpeed
    ZeRO-3 each rank holds a shard, gathered by hooks only around a module's own call."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _group_delta(layer: RowLoraLinear, x, y, rows: _Rows):
    """Each adapter on its own rows: y[rows_a] += s_a B_a A_a x[rows_a]."""
    whole = len(rows.distinct) == 1 and rows.groups[0][1].numel() == x.shape[0]
    for n, sel in rows.groups:
        if n not in layer.lora_A:
            continue
        xs = x if whole else x.index_select(0, sel)
        A, B = layer.lora_A[n], layer.lora_B[n]
        d = (B(A(xs.to(A.weight.dtype))) * layer.scaling[n]).to(y.dtype)
        if whole:
            return y + d
        y = y.index_add(0, sel, d)
    return y


# --------------------------------------------------------------------------------------------------
# Tensor parallelism (serving only: `add_adapters(..., tensor_parallel=True)` on a model already split by
# model.tensor_parallel, as serve.loader builds each rank's shard for `python -m serve RUN --tp N`).
#
# Megatron's LoRA split, which follows the base layer's:
#   column-parallel base (q, k, v, fc, gate, up: output rows split): A [r, in] whole on every rank, B split
#       by output rows like W, so y_r = x W_r^T + x A^T (s B_r)^T is this rank's own output slice, delta
#       included; no communication. `RowLoraLinear` does that as it is (its stacks are built from the
#       layer's local in/out features).
#   row-parallel base (o_proj, proj, down: input columns split, outputs all-reduced): A split by input
#       columns like W, B whole; see RowParallelLoraLinear.
# The LoRA rank r is never split, so any rank shards; the base's splits already divide every width.


class RowParallelLoraLinear(RowLoraLinear):
    """A LoRA layer over a `RowParallelLinear` base (tensor-parallel serving): x is this rank's slice of
    the input features, A_r this rank's columns of A, B whole.

    x A^T = sum_r x_r A_r^T needs a sum over the ranks before B. Two exact ways: all-reduce the r numbers per
    token of h_r = x_r A_r^T and apply B after (a second collective per layer, tiny), or apply B to each
    rank's partial (h_r B^T, linear in h_r) and add it to the base's own partial x_r W_r^T before the one
    all-reduce the layer makes anyway. This takes the second: the same FLOPs (B is applied on every rank
    either way, to the reduced h or to the partial), no extra collective (a collective, not its size, is the
    cost of a decode step's all-reduce: ~1 ms on this project's CPUs, latency-bound on GPUs too), and the
    per-row machinery of RowLoraLinear (dense, bmm, group: all linear in x) unchanged on the partial. The
    only difference to the unsplit layer is the order of float sums. The base's replicated bias is added once,
    after the reduce, as RowParallelLinear does."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        partial = F.linear(x, base.weight)  # x_r W_r^T: this rank's part, not yet reduced
        hub = self._lora_hub
        rows = hub.rows if hub is not None else None
        if rows is not None:
            if x.shape[0] != len(rows.names):
                raise ValueError(f"row_adapters: {len(rows.names)} adapter names for a batch of {x.shape[0]} rows")
            partial = self._add_rows(x, partial, rows)
        elif not self.disable_adapters and not self.merged:  # peft's active adapters (use_adapter)
            for name in self.active_adapters:
                if name in self.lora_A:
                    A, B = self.lora_A[name], self.lora_B[name]
                    partial = partial + (B(A(x.to(A.weight.dtype))) * self.scaling[name]).to(partial.dtype)
        return base.reduce_partial(partial)


def _tensor_parallel_classes(matched: list[str], candidates: dict[str, nn.Module], name: str) -> None:
    """UsageError (one line) unless every matched layer of a tensor-parallel model is one of its TP layers."""
    from model.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    for path in matched:
        m = candidates[path]
        base = m.get_base_layer() if isinstance(m, PeftLoraLinear) else m
        if type(base) not in (ColumnParallelLinear, RowParallelLinear):
            raise UsageError(f"adapter {name!r}: {path} is a {type(base).__name__}, not a tensor-parallel layer of "
                             "model.tensor_parallel; LoRA under tensor parallelism shards adapters of the "
                             "column- and row-parallel layers only")


def _set_tensor_parallel_class(m: PeftLoraLinear) -> None:
    from model.tensor_parallel import RowParallelLinear

    if type(m.get_base_layer()) is RowParallelLinear:
        m.__class__ = RowParallelLoraLinear


def shard_adapter_state_dict(full_sd: Mapping[str, torch.Tensor], config, tp_size: int,
                             tp_rank: int) -> dict[str, torch.Tensor]:
    """`model.tensor_parallel.shard_state_dict` for a model with adapters (keys `...q_proj.base_layer.weight`,
    `...q_proj.lora_A.<name>.weight`): the state dict rank `tp_rank` of `tp_size` holds after
    `add_adapters(..., tensor_parallel=True)`. A base weight is split as its plain key is; lora_A is split
    by input columns under a row-parallel base (else whole), lora_B by output rows under a column-parallel
    base (else whole)."""
    from model.tensor_parallel import shard_state_dict, split_dim

    out, plain = {}, {}
    for key, t in full_sd.items():
        parts = key.split(".")
        if "base_layer" in parts:
            i = parts.index("base_layer")
            plain[key] = ".".join(parts[:i] + parts[i + 1:])
            continue
        for which, dim in (("lora_A", 1), ("lora_B", 0)):
            if which in parts:
                i = parts.index(which)
                base_dim = split_dim(".".join(parts[:i] + ["weight"]))
                if base_dim == dim and tp_size > 1:  # A under a row-parallel base, B under a column-parallel one
                    if t.shape[dim] % tp_size:
                        raise UsageError(f"{key}: size {t.shape[dim]} along dim {dim} is not divisible by tp={tp_size}")
                    n = t.shape[dim] // tp_size
                    out[key] = t.narrow(dim, tp_rank * n, n).clone()
                else:
                    out[key] = t
                break
        else:
            plain[key] = key
    sliced = shard_state_dict({p: full_sd[k] for k, p in plain.items()}, config, tp_size, tp_rank)
    out.update({k: sliced[p] for k, p in plain.items()})
    return {k: out[k] for k in full_sd}


# --------------------------------------------------------------------------------------------------
# Adding, choosing, saving and merging adapters.


def _hub(gpt) -> _Hub:
    hub = getattr(gpt, "_lora_hub", None)
    if hub is None:
        raise UsageError("this model has no LoRA adapters; add them with agents.lora.add_adapters")
    return hub


def adapter_names(model) -> list[str]:
    """The adapters of `model`, in the order they were added (empty without any)."""
    hub = getattr(_gpt(model), "_lora_hub", None)
    return list(hub.specs) if hub is not None else []


def _check_name(gpt, name) -> None:
    hub = _hub(gpt)
    if name not in hub.specs:
        raise UsageError(f"unknown adapter {name!r}; this model has: {', '.join(hub.specs) or 'none'}")


def _lora_layers(gpt) -> dict[str, PeftLoraLinear]:
    return {n: m for n, m in gpt.named_modules() if isinstance(m, PeftLoraLinear)}


def _block_linears(gpt) -> dict[str, nn.Module]:
    """Module path -> the Linear (or already-adapted Linear) layers inside the blocks: the candidates."""
    out = {}
    for n, m in gpt.named_modules():
        if not n.startswith("blocks."):
            continue
        inside_lora = any(p in ("base_layer", "lora_A", "lora_B") for p in n.split("."))
        if isinstance(m, PeftLoraLinear) or (isinstance(m, nn.Linear) and not inside_lora):
            out[n] = m
    return out


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def _check_spec(name, spec, candidates, tensor_parallel: bool = False) -> tuple[int, float, list[str]]:
    where = f"adapter {name!r}"
    if not isinstance(name, str) or not name or "." in name:
        raise UsageError(f"adapter names must be non-empty strings without '.', got {name!r}")
    if not isinstance(spec, Mapping) or set(spec) - _SPEC_KEYS:
        extra = sorted(set(spec) - _SPEC_KEYS) if isinstance(spec, Mapping) else spec
        raise UsageError(f"{where}: spec takes rank, alpha, targets; got {extra!r}")
    rank, alpha = spec.get("rank", 8), spec.get("alpha", 16.0)
    targets = list(spec.get("targets", DEFAULT_TARGETS))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(f"{where}: rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise UsageError(f"{where}: alpha must be a number > 0, got {alpha!r}")
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise UsageError(f"{where}: targets must be a non-empty list of module names, got {targets!r}")
    names = sorted({p.rsplit(".", 1)[-1] for p in candidates}, key=lambda n: (_NAME_ORDER.get(n, len(_NAME_ORDER)), n))
    missing = [t for t in targets if not any(_matches(p, t) for p in candidates)]
    if missing:
        raise UsageError(f"adapter {name!r}: lora targets {targets}: {', '.join(missing)} match(es) no module of "
                         f"the model; the Linear modules it has are: {', '.join(names)} (lm_head is not adapted)")
    matched = [p for p in candidates if any(_matches(p, t) for t in targets)]
    if tensor_parallel:
        _tensor_parallel_classes(matched, candidates, name)
        return rank, float(alpha), matched
    plain = [p for p in matched if not isinstance(candidates[p], PeftLoraLinear) and type(candidates[p]) is not nn.Linear]
    if plain:
        raise UsageError(f"adapter {name!r}: {plain[0]} is a {type(candidates[plain[0]]).__name__}; LoRA adapters "
                         "need plain nn.Linear layers (a model without tensor parallelism)")
    return rank, float(alpha), matched


def add_adapters(model, adapters: Mapping[str, Mapping], *, tensor_parallel: bool = False) -> nn.Module:
    """Add one named LoRA adapter per entry of `adapters` (name -> dict(rank=8, alpha=16.0,
    targets=["q_proj", "k_proj", "v_proj", "o_proj"])) to the GPT `model` (or the GPT inside a wrapper),
    in place, with peft. Afterwards the base weights are frozen (requires_grad False), every adapter's
    parameters are trainable, and forwards outside `use_adapter` / `row_adapters` use the base alone.
    Adapters start as peft initialises them (B = 0: the adapted model equals the base). Bad names,
    specs, or targets that match no module raise a one-line UsageError before the model changes.
    tensor_parallel=True: `model` is already split by `model.tensor_parallel.apply_tensor_parallel` and
    every target is one of its column- or row-parallel layers (else a UsageError); the adapters are this
    rank's shards (see RowParallelLoraLinear; load them with `shard_adapter_state_dict`). For inference
    (tensor-parallel serving): the adapter gradients are not reduced over the TP group. Returns the GPT."""
    gpt = _gpt(model)
    if not isinstance(adapters, Mapping) or not adapters:
        raise UsageError(f"add_adapters takes a non-empty mapping name -> dict(rank=, alpha=, targets=), got {adapters!r}")
    hub = getattr(gpt, "_lora_hub", None)
    candidates = _block_linears(gpt)
    plans = {}
    for name, spec in adapters.items():
        if hub is not None and name in hub.specs:
            raise UsageError(f"adapter {name!r} already exists; this model has: {', '.join(hub.specs)}")
        plans[name] = _check_spec(name, spec, candidates, tensor_parallel)
    if hub is None:
        hub = _Hub()
        gpt._lora_hub = hub
        gpt.row_adapter_context = hub.context  # the hook model.generate.DecodeEngine looks for
    previous = _active(gpt)
    for name, (rank, alpha, matched) in plans.items():
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=matched, lora_dropout=0.0, bias="none")
        with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            inject_adapter_in_model(config, gpt, adapter_name=name)
        hub.specs[name] = {"rank": rank, "alpha": alpha, "targets": matched}
    for m in _lora_layers(gpt).values():
        if type(m) is PeftLoraLinear:
            m.__class__ = RowLoraLinear
            if tensor_parallel:
                _set_tensor_parallel_class(m)
        m._lora_hub = hub
    hub.params = [p for n in hub.specs for p in adapter_parameters(gpt, n)]
    lora = {id(p) for p in hub.params}
    for p in gpt.parameters():
        p.requires_grad_(id(p) in lora)
    _activate(gpt, previous)
    return gpt


def rebind_adapter_parameters(model) -> None:
    """After the model's parameters were replaced by new tensors (`to_empty` from the meta device, as
    serve.loader builds a tensor-parallel shard): make the adapters' bookkeeping (which parameters are
    adapters, whose changes invalidate the cached per-row stacks) point at the new ones."""
    gpt = _gpt(model)
    hub = _hub(gpt)
    hub.params = [p for n in hub.specs for p in adapter_parameters(gpt, n)]
    hub._stamp = None
    for m in _lora_layers(gpt).values():
        m._row_cache = None


def adapter_parameters(model, name: str) -> list[nn.Parameter]:
    """The parameters of adapter `name` (every layer's lora_A and lora_B weights), in module order."""
    gpt = _gpt(model)
    _check_name(gpt, name)
    out = []
    for n, p in gpt.named_parameters():
        parts = n.split(".")
        if len(parts) >= 3 and parts[-3] in ("lora_A", "lora_B") and parts[-2] == name:
            out.append(p)
    return out


def _active(gpt) -> list[str]:
    layers = _lora_layers(gpt)
    return list(next(iter(layers.values())).active_adapters) if layers else []


def _activate(gpt, names: list[str]) -> None:
    """peft's set_adapter, keeping every adapter parameter's requires_grad as it was (peft's call
    would freeze the inactive adapters, which other agents are still training)."""
    lora = [p for n, p in gpt.named_parameters() if ".lora_" in n]
    flags = [p.requires_grad for p in lora]
    set_adapter(gpt, names)
    for p, f in zip(lora, flags):
        p.requires_grad_(f)


@contextlib.contextmanager
def use_adapter(model, name: str | None) -> Iterator[None]:
    """Every forward inside uses adapter `name` (None: the base alone), through peft's active adapter;
    the previous choice comes back on exit. A `row_adapters` context, where in force, takes precedence."""
    gpt = _gpt(model)
    if name is not None:
        _check_name(gpt, name)
    previous = _active(gpt)
    _activate(gpt, [] if name is None else [name])
    try:
        yield
    finally:
        _activate(gpt, previous)


def row_adapters(model, names_per_row: Sequence[str | None], method: str | None = None):
    """Context manager: in every forward inside, row b of the batch uses adapter names_per_row[b]
    (None: the base). method "bmm" (default) or "group" (see the module docstring)."""
    return _hub(_gpt(model)).context(names_per_row, method)


def adapter_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights, keyed without its name (peft's `get_peft_model_state_dict`), so that
    they load under any name into a model with an adapter of the same rank and targets."""
    gpt = _gpt(model)
    _check_name(gpt, name)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(gpt, adapter_name=name).items()}


def load_adapter_state_dict(model, name: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load `adapter_state_dict` output into adapter `name` (peft's `set_peft_model_state_dict`). Keys
    that are missing or left over, or shapes that differ (another rank or targets), raise a one-line
    UsageError."""
    gpt = _gpt(model)
    _check_name(gpt, name)
    own = get_peft_model_state_dict(gpt, adapter_name=name)
    extra, missing = sorted(set(state_dict) - set(own)), sorted(set(own) - set(state_dict))
    if extra or missing:
        what = f"unexpected key {extra[0]}" if extra else f"missing key {missing[0]}"
        raise UsageError(f"adapter {name!r}: the state dict does not fit ({what}; {len(extra)} unexpected, "
                         f"{len(missing)} missing)")
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UsageError(f"adapter {name!r}: {k} has shape {tuple(v.shape)}, the adapter's is "
                             f"{tuple(own[k].shape)} (another rank or model?)")
    set_peft_model_state_dict(gpt, dict(state_dict), adapter_name=name)


def merged_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """A plain GPT state dict (the keys of the GPT without adapters) whose adapted weights are
    W + (alpha / rank) B A of adapter `name` (peft's `get_delta_weight`): what `make export` writes
    for that agent. Tensors not adapted are the model's own (as state_dict() gives them)."""
    gpt = _gpt(model)
    _check_name(gpt, name)
    layers = _lora_layers(gpt)
    out = base_state_dict(gpt)
    with torch.no_grad():
        for path, layer in layers.items():
            if name in layer.lora_A:
                w = out[path + ".weight"]
                out[path + ".weight"] = w + layer.get_delta_weight(name).to(w.dtype)
    return out


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """The shared base alone: a plain GPT state dict (the keys of the GPT without adapters), every adapter
    left out (what `make export FORMAT=hf` writes as a LoRA component's base folder, for vLLM)."""
    gpt = _gpt(model)
    layers = _lora_layers(gpt)
    out = {}
    for key, value in gpt.state_dict().items():
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[:i]) in layers:
                if parts[i] == "base_layer":
                    out[".".join(parts[:i] + parts[i + 1:])] = value
                break
        else:
            out[key] = value
    return out
