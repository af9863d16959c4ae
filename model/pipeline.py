"""Pipeline parallelism for the one GPT definition, on DeepSpeed's pipeline engine.

`build_pipeline_module(config, num_stages)` returns a `deepspeed.pipe.PipelineModule` (subclass
`GPTPipelineModule`) whose layers are the pieces of `model.gpt.GPT`, in this fixed layout
(``L = config.n_layer``; indices are DeepSpeed's layer indices, used in checkpoint file names):

    0        EmbeddingPipe   tok_emb, pos_emb (gpt2), dropout         input_ids [B, T] -> x [B, T, d]
    1..L     BlockPipe       one `Block` each (llama: RoPE cos/sin from its own buffer)  x -> x
    L+1      FinalNormPipe   final_norm                                x -> x
    L+2      LMHeadPipe      lm_head                                   x -> logits [B, T, V]
             (tied embeddings: a TiedLayerSpec "embed" computing x @ tok_emb.weight.T instead)

    loss_fn = ops.cross_entropy(logits, targets)   (`model.kernels.get_ops(config.kernels)`)

Only one tensor travels between stages (the residual stream x), so every stage layout of the
L + 3 layers works.  With tied embeddings (gpt2 default) layer 0 and layer L+2 are the same
`TiedLayerSpec("embed", ...)`: the first stage owns the embedding, the last stage a copy of
`tok_emb.weight`; DeepSpeed broadcasts it from the first stage at start/load and all-reduces its
gradient between the two stages before every optimizer step (`ReduceTiedGrads`).

Weights.  With `init=True` (default) every rank builds the full `GPT(config)` on the CPU (after
`torch.manual_seed(seed)` when `seed` is given) and each layer adopts the tensors of the matching
GPT submodule (no copy), so the pipeline holds exactly the initial weights of the single-process
model.  Trade-off: for the duration of the build every rank holds the whole fp32 model in CPU RAM
(4 bytes/parameter/rank, e.g. 28 GB per rank for 7B); afterwards only the local stage is kept
(moved to the rank's accelerator by DeepSpeed) and the full copy is freed.  With `init=False`
nothing random is drawn and no full model is built: the layers are allocated for the local stage
only, zero filled, and must then get their weights from `load_gpt_state_dict_into_pipeline`
(e.g. from a Hugging Face model, before `deepspeed.initialize`) or from `engine.load_checkpoint`.

State-dict mapping.  DeepSpeed writes one file per layer, `layer_{idx:02d}-model_states.pt`
(`layer_{idx:02d}-model_{mp:02d}-model_states.pt` with a 'model' topology axis), holding that
layer's `state_dict()`: layer 0 `tok_emb.weight`, `pos_emb.weight`; layer 1+i the `Block` keys
(`attn_norm.weight`, `attn.q_proj.weight`, ...); layer L+1 `final_norm.*`; layer L+2
`lm_head.weight` (no file for a tied head).  `pipeline_to_gpt_state_dict` turns those per-layer
dicts (or a `PipelineModule.state_dict()`, keys `'{idx}.{name}'` and
`'tied_modules.embed.{name}'`) into exactly `GPT(config).state_dict()`;
`gpt_to_pipeline_state_dict` is the inverse.  `read_pipeline_checkpoint_layers(folder, tp_rank)`
reads the layer files of a checkpoint folder written by `engine.save_checkpoint` (consolidation
uses it).

Data.  `engine.train_batch(it)` pulls `gradient_accumulation_steps` micro-batches from `it` on the
first and the last stage (middle stages ignore it).  Each item is `(input_ids, targets)`, two
LongTensors [micro_batch, T] (any device; the engine moves them): the first stage reads item[0],
the last item[1] (`PipelineEngine._exec_load_micro_batch`).  `TokenBlocks.get(indices)` already
returns that pair.  All micro-batches must have the same shape unless the module was built with
`dynamic_shape=True` (or `engine.reset_activation_shape()` is called on every rank in between).
`pipeline_eval(engine, batches)` evaluates a list of such pairs of any batch size.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .config import GPTConfig
from .gpt import GPT, Block, make_norm
from .kernels import get_ops
from .kernels.reference import rope_cache

TIED_KEY = "embed"
TIED_ATTR = "tok_emb.weight"
_LAYER_FILE = re.compile(r"^layer_(\d+)-(?:model_(\d+)-)?model_states\.pt$")


# --------------------------------------------------------------------------------------------------
# Layout


def num_pipeline_layers(config: GPTConfig) -> int:
    """embedding + n_layer blocks + final norm + head."""
    return config.n_layer + 3


# --------------------------------------------------------------------------------------------------
# Layers


class _Source:
    """Holds the full GPT whose tensors the layers adopt while the PipelineModule is built; cleared
    afterwards so the CPU copy can be freed. A layer built without a source is zero filled."""

    def __init__(self, gpt: GPT | None):
        self.gpt = gpt
        self._sd = None

    def state_dict(self) -> dict | None:
        if self.gpt is None:
            return None
        if self._sd is None:
            self._sd = self.gpt.state_dict()
        return self._sd

    def clear(self) -> None:
        self.gpt = None
        self._sd = None

    def __repr__(self) -> str:  # LayerSpec reprs print their arguments
        return "GPT" if self.gpt is not None else "empty"


_COUNTING = ContextVar("pipeline_layer_counting", default=False)


def _materialize(module: nn.Module, source: _Source | None, prefix: str) -> None:
    """`module` was built on the meta device: adopt the source GPT's tensors `prefix + name` (shared
    storage, no copy), or allocate zeros on the CPU. Left on meta while DeepSpeed only counts
    parameters (it builds every layer of every stage once for that)."""
    if _COUNTING.get():
        return
    sd = source.state_dict() if source is not None else None
    if sd is not None:
        own = module.state_dict(keep_vars=True)
        missing = [prefix + k for k in own if prefix + k not in sd]
        if missing:
            raise KeyError(f"the source GPT has no {missing}")
        module.load_state_dict({k: sd[prefix + k] for k in own}, strict=True, assign=True)
    else:
        module.to_empty(device="cpu")
        with torch.no_grad():
            for t in module.state_dict(keep_vars=True).values():
                t.zero_()


class EmbeddingPipe(nn.Module):
    """Layer 0: token (+ learned position, gpt2) embeddings and dropout, as `GPT.embed`.

    `with_positions=False` builds only `tok_emb`: the last stage's copy of the tied embedding."""

    def __init__(self, config: GPTConfig, source: _Source | None = None, with_positions: bool = True):
        super().__init__()
        self.max_seq_len = config.max_seq_len
        with torch.device("meta"):
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            if config.style == "gpt2" and with_positions:
                self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        _materialize(self, source, "")

    def forward(self, input_ids):
        T = input_ids.shape[-1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.max_seq_len}")
        x = self.tok_emb(input_ids)
        if hasattr(self, "pos_emb"):
            x = x + self.pos_emb(torch.arange(T, device=input_ids.device))
        return self.drop(x)


def tied_head_forward(module: EmbeddingPipe, x):
    """The tied output head on the last stage: logits = x @ tok_emb.weight.T (after final norm).
    Under tensor parallelism the embedding's owner carries a vocab-parallel head over the same
    shard (`tied_lm_head`), which also makes the input's gradient an all-reduce."""
    head = module.__dict__.get("tied_lm_head")
    if head is not None:
        return head(x)
    return F.linear(x, module.tok_emb.weight)


class BlockPipe(Block):
    """Layers 1..L: one transformer block; llama blocks compute RoPE cos/sin for positions 0..T-1
    from their own non-persistent buffer (only x travels between stages)."""

    def __init__(self, config: GPTConfig, index: int, source: _Source | None = None):
        with torch.device("meta"):
            super().__init__(config, get_ops(config.kernels))
        _materialize(self, source, f"blocks.{index}.")
        self.index = index
        self.rotary = config.style == "llama"
        if self.rotary:
            cos, sin = rope_cache(config.max_seq_len, config.head_dim, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x):
        cos = sin = None
        if self.rotary:  # as GPT.rotary(None, T, dtype=x.dtype)
            T = x.shape[-2]
            cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)
        return super().forward(x, cos, sin)


class FinalNormPipe(nn.Module):
    """Layer L+1: the final norm."""

    def __init__(self, config: GPTConfig, source: _Source | None = None):
        super().__init__()
        with torch.device("meta"):
            self.final_norm = make_norm(config, get_ops(config.kernels))
        _materialize(self, source, "")

    def forward(self, x):
        return self.final_norm(x)


class LMHeadPipe(nn.Module):
    """Layer L+2 (untied embeddings): the output projection -> logits in the model dtype."""

    def __init__(self, config: GPTConfig, source: _Source | None = None):
        super().__init__()
        with torch.device("meta"):
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        _materialize(self, source, "")

    def forward(self, x):
        return self.lm_head(x)


def pipeline_layer_specs(config: GPTConfig, source: _Source | None = None) -> list:
    """The L + 3 layer specs of the layout in the module docstring."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if config.style not in ("gpt2", "llama"):
        raise ValueError(f"unknown model style {config.style!r}; allowed: gpt2, llama")
    specs: list = []
    if config.tie_embeddings:
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, config, source, tied_weight_attr=[TIED_ATTR]))
    else:
        specs.append(LayerSpec(EmbeddingPipe, config, source))
    specs += [LayerSpec(BlockPipe, config, i, source) for i in range(config.n_layer)]
    specs.append(LayerSpec(FinalNormPipe, config, source))
    if config.tie_embeddings:
        # Built only where layer 0 is not (the last stage): a tok_emb-only EmbeddingPipe.
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, config, source, with_positions=False,
                                   forward_fn=tied_head_forward, tied_weight_attr=[TIED_ATTR]))
    else:
        specs.append(LayerSpec(LMHeadPipe, config, source))
    return specs


def make_loss_fn(config: GPTConfig, ignore_index: int = -100):
    ops = get_ops(config.kernels)

    def cross_entropy_loss(logits, targets):
        return ops.cross_entropy(logits, targets, ignore_index=ignore_index)

    cross_entropy_loss.ignore_index = ignore_index
    return cross_entropy_loss


def _meta_gpt(config: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config, init=False)


@functools.cache
def _pipeline_module_class() -> type:
    """GPTPipelineModule, defined on first use: DeepSpeed is imported only by a run that builds a
    pipeline, not by `import model.pipeline` (the state-dict mappings need no DeepSpeed)."""
    from deepspeed.pipe import PipelineModule

    class GPTPipelineModule(PipelineModule):
        """A PipelineModule of GPT layers, with the bits of the GPT interface the loop reads:
        `config`, `ops`, `num_params()` and `flops_per_token()` (both for the WHOLE model; note that
        `self.parameters()` is the local stage only)."""

        def __init__(self, config: GPTConfig, layers, **kwargs):
            super().__init__(layers, **kwargs)
            self.config = config
            self.ops = get_ops(config.kernels)
            # Read self.ops at call time, so a later swap of the ops (tensor parallelism's
            # vocabulary-parallel cross-entropy, a kernel mode change) reaches the loss too.
            ignore_index = kwargs.get("loss_fn").ignore_index if hasattr(kwargs.get("loss_fn"), "ignore_index") else -100
            self.loss_fn = lambda logits, targets: self.ops.cross_entropy(logits, targets, ignore_index=ignore_index)
            object.__setattr__(self, "_meta", _meta_gpt(config))  # not a submodule: counts only
            self._mark_for_grad_clipping()

        def _count_layer_params(self):
            token = _COUNTING.set(True)
            try:
                return super()._count_layer_params()
            finally:
                _COUNTING.reset(token)

        def num_params(self, exclude_embeddings: bool = False) -> int:
            return self._meta.num_params(exclude_embeddings)

        def flops_per_token(self, seq_len: int) -> int:
            return self._meta.flops_per_token(seq_len)

        def _mark_for_grad_clipping(self) -> None:
            """DeepSpeed's fp32 ZeRO-0 gradient clipping (`runtime.utils.clip_grad_norm_`) counts a
            parameter only on pipeline-group rank 0 unless it is marked `model_parallel`, and does not
            skip the replicated tied weight. Marking every non-replicated parameter makes that norm the
            norm over the whole model, as in the ZeRO-1/bf16 paths (which already skip replicas and
            only check the marker on tensor-parallel ranks > 0, none here). Only without a 'model'
            (tensor-slicing) axis, where the marker means nothing else."""
            if self._grid.get_slice_parallel_world_size() != 1:
                return
            for p in self.parameters():
                p.model_parallel = not getattr(p, "ds_pipe_replicated", False)

    return GPTPipelineModule


def build_pipeline_module(config: GPTConfig, num_stages: int | None, topology=None,
                          partition_method: str = "parameters", activation_checkpoint_interval: int | None = None,
                          seed: int | None = None, *, init: bool = True, dynamic_shape: bool = False,
                          ignore_index: int = -100):
    """The GPT as a DeepSpeed PipelineModule over `num_stages` stages (or `topology`).

    Collective: call on every rank after `deepspeed.init_distributed()` (PipelineModule builds its
    process groups and reads LOCAL_RANK), then hand it to `deepspeed.initialize(model=...)`.

    partition_method: DeepSpeed's "parameters" (balance trainable parameter counts), "uniform"
    (balance layer counts) or "type:<regex>". activation_checkpoint_interval: checkpoint every
    that many layers (only runs of BlockPipe layers are checkpointed; torch non-reentrant
    checkpoint); None means 1 if config.activation_checkpointing else 0.
    seed: torch.manual_seed(seed) before building the full GPT (None: the current RNG state,
    which must then be the same on every rank). init=False: no full model, zero-filled local
    layers to be loaded later (see the module docstring). dynamic_shape: allow micro-batches of
    varying shapes (sends shape metadata with every activation).
    """
    if activation_checkpoint_interval is None:
        activation_checkpoint_interval = 1 if config.activation_checkpointing else 0
    source = _Source(None)
    if init:
        if seed is not None:
            torch.manual_seed(seed)
        source = _Source(GPT(config))
    try:
        module = _pipeline_module_class()(
            config, pipeline_layer_specs(config, source), num_stages=num_stages, topology=topology,
            loss_fn=make_loss_fn(config, ignore_index), partition_method=partition_method,
            activation_checkpoint_interval=activation_checkpoint_interval,
            activation_checkpoint_func=partial(torch.utils.checkpoint.checkpoint, use_reentrant=False),
            checkpointable_layers=["BlockPipe"], dynamic_shape=dynamic_shape,
        )
    finally:
        source.clear()  # the specs stay in module._layer_specs: drop their hold on the full model
    return module


# --------------------------------------------------------------------------------------------------
# State-dict mapping


def _split_flat(flat: dict) -> dict[int, dict]:
    """PipelineModule.state_dict() keys ('{idx}.{name}', 'tied_modules.embed.{name}') -> per layer."""
    layers: dict[int, dict] = {}
    tied_prefix = f"tied_modules.{TIED_KEY}."
    for key, value in flat.items():
        if key.startswith(tied_prefix):
            layers.setdefault(0, {}).setdefault(key[len(tied_prefix):], value)
            continue
        idx, _, name = key.partition(".")
        if not idx.isdigit() or not name:
            raise KeyError(f"{key!r} is not a pipeline module key ('<layer>.<name>' or '{tied_prefix}<name>')")
        layers.setdefault(int(idx), {})[name] = value
    return layers


def _as_layers(state: dict) -> dict[int, dict]:
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return _split_flat(state)
    return {int(k): dict(v) for k, v in state.items()}


def _layers_to_gpt(layers: dict[int, dict], n_layer: int, tied: bool) -> dict:
    """Per-layer dicts -> GPT state dict, in the GPT's key order."""
    layers = {k: dict(v) for k, v in layers.items()}  # consumed below to find leftovers
    out: dict = {}

    def take(idx: int, name: str, dst: str):
        try:
            out[dst] = layers[idx].pop(name)
        except KeyError:
            raise KeyError(f"pipeline layer {idx} has no {name!r} (needed for GPT key {dst!r})") from None

    emb = layers.get(0, {})
    take(0, "tok_emb.weight", "tok_emb.weight")
    if "pos_emb.weight" in emb:
        take(0, "pos_emb.weight", "pos_emb.weight")
    for i in range(n_layer):
        if 1 + i not in layers:
            raise KeyError(f"pipeline layer {1 + i} (block {i}) is missing")
        for name in list(layers[1 + i]):
            take(1 + i, name, f"blocks.{i}.{name}")
    fn = n_layer + 1
    for name in [n for n in layers.get(fn, {}) if n.startswith("final_norm.")]:
        take(fn, name, name)
    if "final_norm.weight" not in out:
        raise KeyError(f"pipeline layer {fn} has no 'final_norm.weight'")
    head = fn + 1
    if tied:
        out["lm_head.weight"] = out["tok_emb.weight"]
        layers.get(head, {}).pop("tok_emb.weight", None)  # a tied head's own copy, if given
    else:
        take(head, "lm_head.weight", "lm_head.weight")
    left = {f"{i}.{k}": None for i, d in layers.items() for k in d}
    if left:
        raise KeyError(f"pipeline state has keys with no GPT counterpart (wrong config?): {sorted(left)}")
    return out


def pipeline_to_gpt_state_dict(layer_state_dicts: dict, config: GPTConfig) -> dict:
    """Per-layer state dicts {layer_idx: {name: tensor}} (DeepSpeed's layer files) or a pipeline
    module's flat state dict (or several stages' merged) -> exactly `GPT(config).state_dict()`
    (same keys, same order; a tied lm_head.weight is the tok_emb.weight tensor)."""
    out = _layers_to_gpt(_as_layers(layer_state_dicts), config.n_layer, bool(config.tie_embeddings))
    expected = list(_meta_gpt(config).state_dict())
    if set(out) != set(expected):
        raise KeyError(f"pipeline state does not match GPTConfig: missing {sorted(set(expected) - set(out))}, "
                       f"unexpected {sorted(set(out) - set(expected))}")
    return {k: out[k] for k in expected}


def gpt_to_pipeline_state_dict(sd: dict, config: GPTConfig, flat: bool = False) -> dict:
    """GPT state dict -> {layer_idx: layer state dict} as in DeepSpeed's layer files (a tied head
    has no entry; `lm_head.weight` may then be absent from `sd`). flat=True: the keys of a
    single-stage `PipelineModule.state_dict()` instead ('{idx}.{name}', 'tied_modules.embed.{name}')."""
    L, tied = config.n_layer, bool(config.tie_embeddings)
    layers: dict[int, dict] = {i: {} for i in range(num_pipeline_layers(config) - (1 if tied else 0))}
    block = re.compile(r"^blocks\.(\d+)\.(.+)$")
    for key, value in sd.items():
        m = block.match(key)
        if key in ("tok_emb.weight", "pos_emb.weight"):
            layers[0][key] = value
        elif m and int(m.group(1)) < L:
            layers[1 + int(m.group(1))][m.group(2)] = value
        elif key.startswith("final_norm."):
            layers[L + 1][key] = value
        elif key == "lm_head.weight":
            if not tied:
                layers[L + 2][key] = value
        else:
            raise KeyError(f"{key!r} is not a GPT state-dict key (n_layer={L})")
    if not flat:
        return layers
    out = {}
    for idx, d in layers.items():
        prefix = f"tied_modules.{TIED_KEY}." if (idx == 0 and tied) else f"{idx}."
        out.update({prefix + k: v for k, v in d.items()})
    return out


def read_pipeline_checkpoint_layers(folder: str | Path, tp_rank: int | None = None) -> dict[int, dict]:
    """{layer_idx: state dict} from DeepSpeed's `layer_XX[-model_YY]-model_states.pt` files: those
    of tensor-parallel rank `tp_rank` (YY; a file without a model part is rank 0), or, with None,
    the only rank there is. Map them to GPT names with `pipeline_to_gpt_state_dict`."""
    folder = Path(folder)
    files: dict[int, dict[int, Path]] = {}
    for p in folder.iterdir():
        m = _LAYER_FILE.match(p.name)
        if m:
            files.setdefault(int(m.group(1)), {})[int(m.group(2) or 0)] = p
    if not files:
        raise FileNotFoundError(f"{folder} holds no pipeline layer files (layer_XX-model_states.pt); "
                                "is it a pipeline-parallel DeepSpeed checkpoint folder (the tag folder)?")
    layers = {}
    for idx, by_mp in sorted(files.items()):
        if tp_rank is None and len(by_mp) > 1:
            raise ValueError(f"layer {idx} is split over {len(by_mp)} tensor-parallel ranks; read one "
                             "rank at a time (tp_rank) and merge the shards")
        path = next(iter(by_mp.values())) if tp_rank is None else by_mp.get(tp_rank)
        if path is None:
            raise FileNotFoundError(f"{folder}: no file of layer {idx} for tensor-parallel rank {tp_rank}")
        layers[idx] = torch.load(path, map_location="cpu", weights_only=True)
    return layers


# --------------------------------------------------------------------------------------------------
# Live modules


def local_layer_state_dicts(module) -> dict[int, dict]:
    """This stage's layers as {layer_idx: state dict (CPU copies)}; as the checkpoint files."""
    out = {}
    for local, f in enumerate(module.forward_funcs):
        if isinstance(f, nn.Module):
            out[module._local_start + local] = {k: v.detach().cpu().clone() for k, v in f.state_dict().items()}
    return out


def local_layer_param_names(module) -> dict[str, tuple[int, str]]:
    """This stage's parameters by their name in `module` -> (layer index, name within that layer), for
    the layers the stage runs as modules (those of `local_layer_state_dicts`). A stage that holds
    only a copy of the tied embedding (the last one, computing tied logits) leaves that copy out;
    its owner, the first stage, maps it."""
    owner = {}
    for local, f in enumerate(module.forward_funcs):
        if isinstance(f, nn.Module):
            for name, p in f.named_parameters():
                owner[id(p)] = (module._local_start + local, name)
    return {name: owner[id(p)] for name, p in module.named_parameters() if id(p) in owner}


def gather_gpt_state_dict(module) -> dict:
    """Collective over the pipeline group (every stage of this pipeline must call it): the full GPT
    state dict (CPU) on every rank of the pipeline. Costs the whole model in CPU RAM per rank."""
    import torch.distributed as tdist

    group = module._grid.get_pipe_parallel_group()
    parts: list = [None] * module._grid.get_pipe_parallel_world_size()
    tdist.all_gather_object(parts, local_layer_state_dicts(module), group=group)
    layers: dict[int, dict] = {}
    for part in parts:
        layers.update(part)
    return pipeline_to_gpt_state_dict(layers, module.config)


@torch.no_grad()
def load_gpt_state_dict_into_pipeline(module, sd: dict) -> None:
    """Copy a GPT state dict into this stage's layers (and its copy of a tied embedding).

    Every rank calls it with the same `sd`. Call it BEFORE `deepspeed.initialize`: afterwards
    ZeRO/bf16 optimizers keep their own fp32 master copies (use engine.load_checkpoint there)."""
    layers = gpt_to_pipeline_state_dict(sd, module.config)
    for local, f in enumerate(module.forward_funcs):
        if isinstance(f, nn.Module):
            f.load_state_dict(layers[module._local_start + local], strict=True)
    for tm in module.tied_modules.values():
        tm.load_state_dict({k: layers[0][k] for k in tm.state_dict()}, strict=True)


# --------------------------------------------------------------------------------------------------
# Data


def pipeline_batches(micro_batches: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield micro-batches in the form `PipelineEngine` reads: `(input_ids, targets)`, both
    LongTensors [B, T] (item[0] feeds the first stage, item[1] the loss on the last stage).

    Accepts (x, y) pairs or token blocks [B, T + 1] (split into x = block[:, :-1], y = block[:, 1:])."""
    for item in micro_batches:
        if isinstance(item, torch.Tensor):
            x, y = item[..., :-1], item[..., 1:]
        else:
            x, y = item
            if isinstance(x, (tuple, list)):  # ((x,), y), DeepSpeed's other spelling
                (x,) = x
        if x.shape != y.shape:
            raise ValueError(f"input_ids {tuple(x.shape)} and targets {tuple(y.shape)} differ in shape")
        yield x.long(), y.long()


@torch.no_grad()
def pipeline_eval(engine, batches: list, ignore_index: int = -100) -> tuple[float, int]:
    """(sum of token losses, number of target tokens) of this pipeline's `batches`, on every rank.

    Collective: every rank calls it once per evaluation (DeepSpeed's eval_batch has a world
    barrier); all stages of one pipeline pass the same `batches` (a list of (x, y) pairs; middle
    stages only use its length and shapes). Data-parallel pipelines may pass different lists:
    all-reduce the two numbers over the data-parallel group yourself (as `trainer.evaluation`).
    Batches smaller than the micro-batch size are padded with ignored targets so that one
    `eval_batch` call with one activation shape runs them all."""
    pairs = list(pipeline_batches(batches))
    if not pairs:
        return 0.0, 0
    micro = max(engine.train_micro_batch_size_per_gpu(), max(x.shape[0] for x, _ in pairs))
    T = max(x.shape[1] for x, _ in pairs)
    padded, counts = [], []
    for x, y in pairs:
        xp = torch.zeros(micro, T, dtype=torch.long)
        yp = torch.full((micro, T), ignore_index, dtype=torch.long)
        xp[:x.shape[0], :x.shape[1]] = x.cpu()
        yp[:y.shape[0], :y.shape[1]] = y.cpu()
        padded.append((xp, yp))
        counts.append(int((yp != ignore_index).sum()))
    dynamic = getattr(engine.module, "dynamic_shape", False)
    if not dynamic:
        engine.reset_activation_shape()
    losses = engine.eval_batch(iter(padded), compute_loss=True, reduce_output=None, bcast_loss=False,
                               num_micro_batches=len(padded))
    if not dynamic:
        engine.reset_activation_shape()  # training resumes with its own shapes
    t = torch.zeros(len(padded), dtype=torch.float32, device=engine.device)
    if engine.is_last_stage():
        t.copy_(torch.stack([loss.float().reshape(()) for loss in losses]))
    if engine.num_stages > 1:
        import torch.distributed as tdist

        tdist.broadcast(t, src=engine.grid.stage_to_global(engine.num_stages - 1),
                        group=engine.grid.get_pipe_parallel_group())
    t = t.double().cpu()
    total = sum(float(t[i]) * n for i, n in enumerate(counts) if n > 0)
    return total, sum(counts)
