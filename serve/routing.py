"""Which replica takes a request: least-loaded, cache-aware with a load cap (or round-robin, for comparison).

State, all on the router's event loop (no locks): per replica its requests in flight (counted at dispatch,
uncounted when the response has been passed on in full), how many it was sent, and its prefix hits. The
prefix index maps each prefix block to the replicas that were sent it, each with the time (a dispatch
counter) it was sent it last: the router's own record of which replica holds which prefix in its cache.

Prefix blocks: the request's text (completions: the prompt; a list of prompts: the first one; token ids:
their decimal form; chat: each message's role and content) cut into blocks of `block` characters, the last
block possibly shorter, each block's key the hash of the model name and every character up to its end
(a chain, as vLLM's prefix-cache blocks: a replica recorded for block n was sent the whole text up to it).
A replica's *match* for a request is the number of the request's blocks it holds (its longest recorded
block); the request's prefix owner is the live replica with the longest match, of those the one sent it
last. After dispatch every block of the request is recorded for the replica it went to (the index keeps the
`capacity` most recently used blocks).

The rule (cache_aware):
    live  = the replicas in rotation; least = the one with the fewest requests in flight (ties: the one sent
            the fewest requests lately, then the lowest index)
    under the cap: a replica r with r.in_flight < least.in_flight + slack
    owner = the prefix owner, if it is live
    send to owner  if it is under the cap                                (a prefix hit)
    else (a spill) to the holder under the cap with the longest match (ties: fewer in flight, then the one
         sent the prefix last)                                           (a spill to a holder)
    else to least                                   (no owner, or no other replica holds any of the prefix)
So a prefix stays on its replica while that replica has fewer than `slack` more requests in flight than the
least-loaded one; beyond that the prefix spills over, first to another replica that was sent it (its cache
likely holds it: no cold prefill), else to the least-loaded one, and the replica it spilled to becomes its
owner. A spill goes only to a replica under the cap, so no replica ever runs more than `slack` requests above
the least-loaded one on account of prefixes.

"Lately": a count of the replica's dispatches in which each weighs half as much `RECENT_HALF_LIFE` dispatches
(of any replica) later. Ties in flight are the rule at light load, and every new prefix is placed by them;
a lifetime count there sent a run of new prefixes to whichever replica had fallen behind over the hours
before (3 of a trace's 6 new agents at once in bench/bench_serve.py's router part), which then stayed
busiest for as long as they were active. The decayed count follows the traffic of the prefixes now active. A
replica back in rotation (`back_in_rotation`) starts from the live replicas' mean count, not from ~0.

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
DEFAULT_SLACK = 4  # requests in flight above the least-loaded replica (docs/serving.md: 2 until 2026-12-06)
DEFAULT_BLOCK = 32  # characters per prefix block
RECENT_HALF_LIFE = 32  # dispatches: how fast `Replica.recent` forgets (see the module docstring)


@dataclass(eq=False)
class Replica:
    index: int
    url: str
    alive: bool = True
    in_flight: int = 0
    routed: int = 0
    recent: float = 0.0  # dispatches, each weighing half as much RECENT_HALF_LIFE dispatches later
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
    hit: bool  # went to the prefix owner
    blocks: list[bytes]
    spill: bool = False  # had an owner over the cap (cache_aware)
    holder: bool = False  # a spill sent to another replica recorded as holding part of the prefix


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
    def __init__(self, urls: list[str], policy: str = "cache_aware", slack: int = DEFAULT_SLACK,
                 block: int = DEFAULT_BLOCK,
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
        self._holders: OrderedDict[bytes, dict[int, int]] = OrderedDict()  # block -> {replica: last sent}
        self._tick = 0  # dispatches so far: the time in `_holders`
        self._decay = 0.5 ** (1 / RECENT_HALF_LIFE)  # of every replica's `recent`, per dispatch
        self._turns: dict[str, int] = {}
        self.lookups = 0  # requests with a prefix text
        self.spills = 0  # requests whose owner was over the cap
        self.spills_to_holder = 0  # of those, the ones sent to another replica that holds part of the prefix

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def back_in_rotation(self, r: Replica) -> None:
        """`r`, out of rotation, answers again. Its recent count becomes the mean of the live replicas': it got
        no dispatches while out, and a count near 0 would win every tie until it caught up (the pile-up of new
        prefixes that recent counts exist to prevent)."""
        live = [x for x in self.live() if x is not r]
        r.recent = sum(x.recent for x in live) / len(live) if live else 0.0
        r.alive = True

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
        match = self.matches(blocks, [r for r in live if self.serves(r, model)])
        owner = self.replicas[max(match, key=match.__getitem__)] if match else None
        least = min(live, key=lambda r: (r.in_flight, r.recent, r.index))

        def under_cap(r: Replica) -> bool:  # the one load cap that hits and spills to holders both obey
            return r.in_flight < least.in_flight + self.slack

        spill = holder = False
        if self.policy == "round_robin":  # in turn among the replicas of the model (one turn when all serve all)
            key = model if self.model_sets() else ""
            turn = self._turns.get(key, 0)
            pick = live[turn % len(live)]
            self._turns[key] = turn + 1
        elif self.policy == "least_loaded" or owner is None:
            pick = least
        elif under_cap(owner):
            pick = owner
        else:
            spill = True
            self.spills += 1
            held = [r for r in live if r is not owner and r.index in match and under_cap(r)]
            if held:  # the longest match, then the fewest in flight, then the one sent the prefix last
                pick = max(held, key=lambda r: (match[r.index][0], -r.in_flight, match[r.index][1]))
                holder = True
                self.spills_to_holder += 1
            else:
                pick = least
        return Choice(pick, owner is not None, owner is pick, blocks, spill, holder)

    def matches(self, blocks: list[bytes], candidates: list[Replica]) -> dict[int, tuple[int, int]]:
        """Per candidate replica holding any of `blocks` (the index's record): (its match, the number of
        blocks it holds, being those up to its longest recorded one; when it was last sent that block)."""
        want = {r.index for r in candidates}
        out: dict[int, tuple[int, int]] = {}
        for n in range(len(blocks), 0, -1):  # the longest first; keys hash the model name
            for i, t in self._holders.get(blocks[n - 1], {}).items():
                if i in want and i not in out:
                    out[i] = (n, t)
            if len(out) == len(want):
                break
        return out

    def dispatched(self, c: Choice) -> None:
        r = c.replica
        r.in_flight += 1
        r.routed += 1
        for x in self.replicas:
            x.recent *= self._decay
        r.recent += 1
        if c.blocks:
            self.lookups += 1
        if c.hit:
            r.prefix_hits += 1
        self._tick += 1
        for key in c.blocks:
            held = self._holders.setdefault(key, {})
            held[r.index] = self._tick
            self._holders.move_to_end(key)
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)

    def done(self, r: Replica) -> None:
        r.in_flight -= 1
