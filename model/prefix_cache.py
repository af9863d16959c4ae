"""Automatic prefix caching for `model.generate.DecodeEngine`: keys and values of prompt prefixes kept
in blocks of `block_size` tokens, so a request whose prompt starts like an earlier one prefills only
the rest (the idea of vLLM's automatic prefix caching and SGLang's radix cache, in our own code).

A block is one node of a tree: its key is (parent node, its `block_size` token ids, adapter name),
so a node stands for the whole token prefix up to its end under one LoRA adapter (None: the base)
and two adapters never share keys and values. The key is the exact tuple (a dict key), not a hash
of it, so two prefixes can never be confused. Each node owns one block of a pool [n_blocks, Hkv,
block_size, head_dim] per layer; `n_blocks = capacity_tokens // block_size` is the memory budget.

Nodes are kept in least-recently-used order. Every use touches a node's path leaf first, then its
ancestors, so a parent is always more recent than its children and the oldest node is a leaf:
eviction takes the oldest node that has no children (a parent's block is never freed while a
descendant could still be found through it).

The engine copies blocks into a request's own KV slot (`load`) before prefilling the rest of the
prompt, and copies a slot's full blocks into the pool (`store`) after a prefill and when a request
is released, so cached blocks come from running and finished requests alike and no slot ever points
into the pool (eviction never touches a running request). Cached keys are valid for the weights
they were computed with: the engine clears the cache when the model's parameters change.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PrefixCache", "PrefixStats"]


@dataclass(eq=False)
class _Node:
    key: tuple
    id: int  # children's keys name their parent by this number (never reused)
    block: int
    parent: _Node | None
    children: int = 0


@dataclass
class PrefixStats:
    """Counters since the cache was made: prompts looked up and those that reused a cached prefix,
    their prompt tokens and the tokens whose keys and values were copied instead of computed, blocks
    stored and evicted."""

    lookups: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0
    clears: int = 0

    def as_dict(self) -> dict:
        return {"lookups": self.lookups, "hits": self.hits, "prompt_tokens": self.prompt_tokens,
                "hit_tokens": self.hit_tokens, "stored_blocks": self.stored_blocks,
                "evicted_blocks": self.evicted_blocks, "clears": self.clears,
                "token_hit_rate": self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0}


class PrefixCache:
    """Blocks of `block_size` tokens' keys and values for `n_layer` layers, at most
    `capacity_tokens // block_size` of them, evicted least recently used first."""

    def __init__(self, n_layer: int, capacity_tokens: int, block_size: int = 16):
        if block_size < 1:
            raise ValueError(f"prefix cache block size must be >= 1 token, got {block_size}")
        if capacity_tokens < block_size:
            raise ValueError(f"prefix cache capacity must hold at least one block of {block_size} tokens, "
                             f"got {capacity_tokens} tokens")
        self.block_size = block_size
        self.n_blocks = capacity_tokens // block_size
        self.n_layer = n_layer
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.stats = PrefixStats()
        self._nodes: dict[tuple, _Node] = {}
        self._lru: OrderedDict[tuple, _Node] = OrderedDict()  # least recently used first
        self._free = list(range(self.n_blocks - 1, -1, -1))
        self._ids = itertools.count(1)  # 0: the root, parent of every first block

    def __len__(self) -> int:
        """Blocks held."""
        return len(self._nodes)

    def clear(self) -> None:
        """Forget every block (the pool's memory stays allocated)."""
        self._nodes.clear()
        self._lru.clear()
        self._free = list(range(self.n_blocks - 1, -1, -1))
        self.stats.clears += 1

    # ---- lookup --------------------------------------------------------------------------------

    def match(self, tokens: Sequence[int], adapter: str | None) -> list[int]:
        """Pool blocks of the longest cached run of whole blocks at the start of `tokens` under
        `adapter` (touched as used), in order."""
        path = self._walk(tokens, adapter)
        self._touch(path)
        return [node.block for node in path]

    def _walk(self, tokens: Sequence[int], adapter: str | None) -> list[_Node]:
        bs, path, parent = self.block_size, [], None
        for start in range(0, len(tokens) - bs + 1, bs):
            node = self._nodes.get((parent.id if parent else 0, tuple(tokens[start:start + bs]), adapter))
            if node is None:
                break
            path.append(node)
            parent = node
        return path

    def _touch(self, path: list[_Node]) -> None:
        for node in reversed(path):  # leaf first: parents end up more recent than their children
            self._lru.move_to_end(node.key)

    # ---- the engine's copies ---------------------------------------------------------------------

    def load(self, kv, row: int, blocks: list[int]) -> None:
        """Copy `blocks` (from `match`) into positions 0.. of `row` of the slot cache `kv`
        (a `SlotKVCache`, already allocated): its positions 0..len(blocks) * block_size - 1."""
        if not blocks:
            return
        bs = self.block_size
        idx = torch.tensor(blocks, device=self.k[0].device)
        end = len(blocks) * bs
        for K, V, PK, PV in zip(kv.k, kv.v, self.k, self.v):
            H, D = PK.shape[1], PK.shape[3]
            K[row, :, :end] = PK[idx].transpose(0, 1).reshape(H, end, D)
            V[row, :, :end] = PV[idx].transpose(0, 1).reshape(H, end, D)

    def store(self, kv, row: int, tokens: Sequence[int], adapter: str | None) -> None:
        """Keep the whole blocks of `tokens`, the sequence whose keys and values are in `row` of the
        slot cache `kv` (positions 0..len(tokens)-1), under `adapter`: blocks already held are
        touched, missing ones copied into free (or evicted) pool blocks."""
        bs = self.block_size
        path = self._walk(tokens, adapter)
        n_full = len(tokens) // bs
        if kv.k[0] is None or len(path) == n_full:
            self._touch(path)
            return
        if self.k[0] is None:
            _, H, _, D = kv.k[0].shape
            for i in range(self.n_layer):
                shape = (self.n_blocks, H, bs, D)
                self.k[i] = torch.zeros(shape, dtype=kv.k[i].dtype, device=kv.k[i].device)
                self.v[i] = torch.zeros(shape, dtype=kv.v[i].dtype, device=kv.v[i].device)
        self._touch(path)
        protected = {node.key for node in path}
        parent = path[-1] if path else None
        first = len(path)
        new: list[_Node] = []
        for b in range(first, n_full):
            block = self._allocate(protected)
            if block is None:  # every held block is on this path: the budget is too small for more
                break
            key = (parent.id if parent else 0, tuple(tokens[b * bs:(b + 1) * bs]), adapter)
            node = _Node(key, next(self._ids), block, parent)
            if parent is not None:
                parent.children += 1
            self._nodes[key] = node
            self._lru[key] = node
            protected.add(key)
            new.append(node)
            parent = node
        if not new:
            return
        idx = torch.tensor([node.block for node in new], device=self.k[0].device)
        s, e = first * bs, (first + len(new)) * bs
        for K, V, PK, PV in zip(kv.k, kv.v, self.k, self.v):
            H, D = PK.shape[1], PK.shape[3]
            PK[idx] = K[row, :, s:e].reshape(H, len(new), bs, D).transpose(0, 1)
            PV[idx] = V[row, :, s:e].reshape(H, len(new), bs, D).transpose(0, 1)
        self.stats.stored_blocks += len(new)
        self._touch(path + new)

    def _allocate(self, protected: set) -> int | None:
        if self._free:
            return self._free.pop()
        for key, node in self._lru.items():  # oldest first; the first childless one goes
            if node.children == 0 and key not in protected:
                break
        else:
            return None
        del self._lru[key]
        del self._nodes[key]
        if node.parent is not None:
            node.parent.children -= 1
        self.stats.evicted_blocks += 1
        return node.block
