"""Which replica takes a request: least-loaded, cache-aware with a load cap (or round-robin, for comparison).

State, all on the router's event loop (no locks): per replica its requests in flight (counted at dispatch,
uncounted when the response has been passed on in full), how many it was sent, and its prefix hits. The
prefix index maps a request's prefix blocks to the replica that served that prefix last.

Prefix blocks: the request's text (completions: the prompt; a list of prompts: the first one; token ids:
their decimal form; chat: each message's role and content) cut into blocks of `block` characters, the last
block possibly shorter, each block's key the hash of the model name and every character up to its end
(a chain, as vLLM's prefix-cache blocks). The request's prefix owner is the live replica recorded for the
longest of its blocks found in the index for a live replica; after dispatch every block of the request is recorded for the
replica it went to (the index keeps the `capacity` most recently used blocks).

The rule (cache_aware):
    live  = the replicas in rotation; least = the one with the fewest requests in flight (ties: the one sent
            the fewest requests, then the lowest index)
    owner = the prefix owner, if it is live
    send to owner  if owner.in_flight < least.in_flight + slack      (a prefix hit)
    else to least                                                   (a spill when there was an owner)
So a prefix stays on its replica while that replica has fewer than `slack` more requests in flight than the
least-loaded one; beyond that the prefix spills over, and the replica it spilled to becomes its owner. No
replica ever runs more than `slack` requests above the least-loaded one on account of prefixes.

round_robin: live replicas in turn, whatever their load (the baseline of bench/bench_serve.py). A "prefix
hit" is counted for both policies the same way: the request had a prefix owner and went to it.

Models: a replica may serve only some model names (`models`, a set; None: every model, as the replicas of
`--replicas N` do). Every rule above then picks among the replicas that serve the request's `model`; a
model that no replica serves is `UnknownModel` (the router answers OpenAI's 404), one whose replicas are
all out of rotation is a LookupError like any other (503). A request without a model name goes to any.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["POLICIES", "Choice", "Replica", "Router", "UnknownModel", "prefix_text"]

POLICIES = ("cache_aware", "least_loaded", "round_robin")


@dataclass(eq=False)
class Replica:
    index: int
    url: str
    alive: bool = True
    in_flight: int = 0
    routed: int = 0
    prefix_hits: int = 0
    failed: int = 0  # requests that got a 503 because this replica failed under them
    models: frozenset[str] | None = None  # the model names it serves (None: all)


class UnknownModel(LookupError):
    """No replica serves the request's model; `known`: the names that are served."""

    def __init__(self, model: str, known: list[str]):
        super().__init__(f"no replica serves model {model!r}")
        self.known = known


@dataclass
class Choice:
    replica: Replica
    had_owner: bool
    hit: bool
    blocks: list[bytes]


def prefix_text(body) -> str:
    """The text whose prefix decides the routing ("" when the body has none we understand: then there is
    no owner and the request goes to the least-loaded replica, which answers any error)."""
    if not isinstance(body, dict):
        return ""
    if "messages" in body:
        msgs = body["messages"]
        if not isinstance(msgs, list):
            return ""
        return "".join(f"{m.get('role')}\x1f{m.get('content')}\x1e" for m in msgs if isinstance(m, dict))
    p = body.get("prompt")
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, list):
        return ",".join(str(t) for t in p) + ","
    return p if isinstance(p, str) else ""


class Router:
    def __init__(self, urls: list[str], policy: str = "cache_aware", slack: int = 2, block: int = 32,
                 capacity: int = 100_000, models: list | None = None):
        """`models`: per replica, the model names it serves (None, or a None entry: every model)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; one of {', '.join(POLICIES)}")
        if slack < 1 or block < 1:
            raise ValueError(f"slack and block must be >= 1, got {slack} and {block}")
        if models is not None and len(models) != len(urls):
            raise ValueError(f"{len(models)} model sets for {len(urls)} replicas")
        self.replicas = [Replica(i, u, models=None if models is None or models[i] is None else frozenset(models[i]))
                         for i, u in enumerate(urls)]
        self.policy, self.slack, self.block, self.capacity = policy, slack, block, capacity
        self._owner: OrderedDict[bytes, int] = OrderedDict()
        self._turns: dict[str, int] = {}
        self.lookups = 0  # requests with a prefix text
        self.spills = 0  # requests whose owner was over the cap

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def model_sets(self) -> bool:
        """Whether the replicas serve models of their own (else each serves every model)."""
        return any(r.models is not None for r in self.replicas)

    def serves(self, r: Replica, model: str | None) -> bool:
        return r.models is None or model in r.models

    def for_model(self, model: str) -> list[Replica]:
        """The replicas, live or not, that serve `model` (every one for a request without a model name);
        UnknownModel when none does."""
        if not model:
            return self.replicas
        rs = [r for r in self.replicas if self.serves(r, model)]
        if not rs:
            raise UnknownModel(model, sorted(set().union(*(r.models for r in self.replicas))))
        return rs

    def blocks(self, model: str, text: str) -> list[bytes]:
        h = hashlib.blake2b(model.encode(), digest_size=16)
        out = []
        for i in range(0, len(text), self.block):
            h.update(text[i:i + self.block].encode("utf-8", "surrogatepass"))
            out.append(h.copy().digest())
        return out

    def choose(self, model: str, text: str) -> Choice:
        """Pick a live replica that serves `model` (UnknownModel when none serves it, LookupError when none of
        those is left). Call `dispatched` once it is sent."""
        live = [r for r in self.for_model(model) if r.alive]
        if not live:
            raise LookupError("no replica is in rotation")
        blocks = self.blocks(model, text) if text else []
        owner = None
        for key in reversed(blocks):  # the longest prefix recorded for a live replica
            i = self._owner.get(key)  # keys hash the model name: an owner served this model
            if i is not None and self.replicas[i].alive and self.serves(self.replicas[i], model):
                owner = self.replicas[i]
                break
        least = min(live, key=lambda r: (r.in_flight, r.routed, r.index))
        if self.policy == "round_robin":  # in turn among the replicas of the model (one turn when all serve all)
            key = model if self.model_sets() else ""
            turn = self._turns.get(key, 0)
            pick = live[turn % len(live)]
            self._turns[key] = turn + 1
        elif self.policy == "least_loaded" or owner is None:
            pick = least
        elif owner.in_flight < least.in_flight + self.slack:
            pick = owner
        else:
            pick = least
            self.spills += 1
        return Choice(pick, owner is not None, owner is pick, blocks)

    def dispatched(self, c: Choice) -> None:
        r = c.replica
        r.in_flight += 1
        r.routed += 1
        if c.blocks:
            self.lookups += 1
        if c.hit:
            r.prefix_hits += 1
        for key in c.blocks:
            self._owner[key] = r.index
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def done(self, r: Replica) -> None:
        r.in_flight -= 1
