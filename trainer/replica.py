"""The replica factory: one model built and parallelized on given dims, as a checkpoint component.

A replica is one set of weights trained by one DeepSpeed engine over one group of ranks
(`ParallelDims`). The pre-training loop builds one; a multi-agent job builds one per agent (or per
agent and critic), each over its own dims, each with its own random-number stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import Component
from .dims import ParallelDims
from .model_setup import build_model
from .parallelize import parallelize
from .rng import RngStream, seed_all
from .schema import Recipe


@dataclass
class Replica:
    name: str
    engine: object
    dims: ParallelDims
    model_config: object  # the full model's GPTConfig
    n_params: int  # of the full model
    flops_per_token: int  # training FLOPs per token of the full model at the recipe's seq_len
    component: Component  # what a checkpoint saves of it

    @property
    def module(self):
        """The local module (this rank's pipeline stage / tensor slices) inside the engine."""
        return self.engine.module


def build_replica(recipe: Recipe, dims: ParallelDims, device: torch.device, vocab_size: int,
                  state_dict: dict | None = None, name: str = "model", params=None, prepare=None) -> Replica:
    """Collective over the replica's ranks. Builds the full model from `recipe.train.seed` on every
    rank (or loads `state_dict`, a consolidated checkpoint's weights), then `parallelize`s it.
    `prepare(model) -> model` changes the full model before that (e.g. adds LoRA adapters); `params`
    as in `parallelize`.

    The replica's random-number stream continues from the seeded generators after the build, so a
    single replica draws exactly what the process-wide generators would have given it."""
    seed_all(recipe.train.seed)
    full = build_model(recipe, vocab_size)
    if state_dict is not None:
        full.load_state_dict(state_dict)
    if prepare is not None:
        full = prepare(full)
    config, n_params = full.config, full.num_params()
    flops = full.flops_per_token(recipe.data.seq_len)
    engine = parallelize(full, dims, recipe, device, params=params)
    del full
    return Replica(name, engine, dims, config, n_params, flops, Component(name, engine, RngStream.capture()))
