"""Policy tables over a game's information states, the exact average policy of self-play, and NashConv.

Every information state of the game is enumerated by OpenSpiel itself (`policy.TabularPolicy(game)`:
12 for Kuhn poker, 936 for Leduc, one per player for a matrix game); a table is a float64 array
[information states, num_distinct_actions] in that order, 0 on illegal actions, rows summing to 1.

    space = InfoStates(game)                       # order, players, legal masks, own-reach parents
    table = space.uniform()
    nash_conv(game, table)                          # OpenSpiel's exploitability.nash_conv
    write_policy_json(path, game_name, params, space, table); load_policy_json(path, game) -> TabularPolicy

The average policy (`AveragePolicy`): fictitious play mixes the *strategies* of the iterates, not their
action probabilities per state. The behaviour strategy realisation-equivalent to the uniform mixture
of behaviour strategies sigma_1..sigma_T (XFP, Heinrich et al. 2015) is, at a state I of player i,

    avg(I, a) = sum_t w_t r_t(I) sigma_t(I, a) / sum_t w_t r_t(I)

where r_t(I) is player i's own reach probability of I under sigma_t (the product of its own earlier
action probabilities on the path; the same for every history in I by perfect recall). The running
sums are exact: at every update the policy's probabilities on *every* information state are computed
(cheap: 936 states for Leduc), not estimated from play, so the average has no sampling error of its
own. `InfoStates.parents` gives each state's previous own state and action (found by one walk of the
game tree) for r_t.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

__all__ = ["AveragePolicy", "InfoStates", "load_policy_json", "nash_conv", "tabular_policy", "write_policy_json"]


class InfoStates:
    """The game's information states in OpenSpiel's TabularPolicy order, with for each: its player,
    its legal-action mask [A] and its parent (previous own state index and action, or None)."""

    def __init__(self, game):
        from open_spiel.python import policy as os_policy

        self.game = game
        tab = os_policy.TabularPolicy(game)
        self.strings: list[str] = list(tab.state_lookup)  # dict order = row order
        assert [tab.state_lookup[s] for s in self.strings] == list(range(len(self.strings)))
        self.index = dict(tab.state_lookup)
        self.legal = np.asarray(tab.legal_actions_mask, dtype=bool)  # [S, A]
        self.num_actions = self.legal.shape[1]
        self.player = np.full(len(self.strings), -1, dtype=np.int64)
        self.parents: list[tuple[int, int] | None] = [None] * len(self.strings)
        self._walk(game.new_initial_state(), [None, None])
        # Parents come before children in a walk from the root: an order in which own reach multiplies out.
        self.order = sorted(range(len(self.strings)), key=self._depth)

    def _walk(self, state, last_own: list) -> None:
        if state.is_terminal():
            return
        if state.is_chance_node():
            for a, _ in state.chance_outcomes():
                self._walk(state.child(a), last_own)
            return
        p = state.current_player()
        i = self.index[state.information_state_string(p)]
        self.player[i] = p
        self.parents[i] = last_own[p]
        for a in state.legal_actions():
            nxt = list(last_own)
            nxt[p] = (i, a)
            self._walk(state.child(a), nxt)

    def _depth(self, i: int) -> int:
        d = 0
        while self.parents[i] is not None:
            i, d = self.parents[i][0], d + 1
        return d

    def __len__(self) -> int:
        return len(self.strings)

    def uniform(self) -> np.ndarray:
        return self.legal / self.legal.sum(axis=1, keepdims=True)

    def own_reach(self, table: np.ndarray) -> np.ndarray:
        """[S]: each state's own reach probability under `table` (its player's earlier actions)."""
        reach = np.ones(len(self.strings))
        for i in self.order:
            parent = self.parents[i]
            if parent is not None:
                reach[i] = reach[parent[0]] * table[parent[0], parent[1]]
        return reach

    def check_table(self, table: np.ndarray) -> None:
        if table.shape != self.legal.shape:
            raise ValueError(f"a policy table of this game is {self.legal.shape}, got {table.shape}")
        if np.any(table[~self.legal] != 0) or np.any(table < 0) or not np.allclose(table.sum(axis=1), 1.0, atol=1e-9):
            raise ValueError("a policy table has probabilities >= 0, 0 on illegal actions and rows summing to 1")


class AveragePolicy:
    """The reach-weighted running average of the policies of self-play (module docstring). Iterate t
    has weight 1 (`weighting: uniform`, fictitious play's average) or t (`linear`, as CFR+ averages)."""

    def __init__(self, space: InfoStates, weighting: str = "uniform"):
        if weighting not in ("uniform", "linear"):
            raise ValueError(f"average weighting must be uniform or linear, got {weighting!r}")
        self.space = space
        self.weighting = weighting
        self.sums = np.zeros(space.legal.shape, dtype=np.float64)
        self.updates = 0

    def add(self, table: np.ndarray) -> None:
        """Take in the current policy `table` (every state's probabilities) as the next iterate."""
        self.updates += 1
        w = 1.0 if self.weighting == "uniform" else float(self.updates)
        self.sums += w * self.space.own_reach(table)[:, None] * table

    def table(self) -> np.ndarray:
        """The average policy; uniform on states no iterate has reached yet (own reach 0 throughout)."""
        tot = self.sums.sum(axis=1, keepdims=True)
        return np.where(tot > 0, self.sums / np.where(tot > 0, tot, 1.0), self.space.uniform())

    def state_dict(self) -> dict:
        return {"sums": torch.from_numpy(self.sums.copy()), "updates": self.updates, "weighting": self.weighting}

    def load_state_dict(self, state: dict) -> None:
        if state["weighting"] != self.weighting or tuple(state["sums"].shape) != self.sums.shape:
            raise ValueError(f"the checkpoint's average policy ({state['weighting']}, {tuple(state['sums'].shape)}) "
                             f"is not this run's ({self.weighting}, {self.sums.shape})")
        self.sums = state["sums"].numpy().astype(np.float64).copy()
        self.updates = int(state["updates"])


def tabular_policy(game, space: InfoStates, table: np.ndarray):
    """OpenSpiel's TabularPolicy filled from `table` (rows in `space` order)."""
    from open_spiel.python import policy as os_policy

    space.check_table(table)
    tab = os_policy.TabularPolicy(game)
    for s, i in space.index.items():
        tab.action_probability_array[tab.state_lookup[s]] = table[i]
    return tab


def nash_conv(game, space: InfoStates, table: np.ndarray) -> float:
    """OpenSpiel's NashConv of the table: sum over both players of what a best response gains."""
    from open_spiel.python.algorithms import exploitability

    return float(exploitability.nash_conv(game, tabular_policy(game, space, table)))


def write_policy_json(path: Path, game_name: str, params: dict, space: InfoStates, table: np.ndarray,
                      extra: dict | None = None) -> None:
    """policy.json: {"game", "params", "num_actions", "policy": {information state: [p over all actions]}}."""
    from trainer.files import atomic_write_text

    space.check_table(table)
    doc = {"game": game_name, "params": params, "num_actions": space.num_actions, **(extra or {}),
           "policy": {s: [float(p) for p in table[i]] for s, i in space.index.items()}}
    atomic_write_text(Path(path), json.dumps(doc, indent=0))


def load_policy_json(path: Path, game):
    """OpenSpiel's TabularPolicy of `game` filled from a policy.json; ValueError when a state is
    missing, unknown, or its row is not a distribution over the legal actions."""
    from open_spiel.python import policy as os_policy

    doc = json.loads(Path(path).read_text())
    tab = os_policy.TabularPolicy(game)
    rows = doc["policy"]
    missing = sorted(set(tab.state_lookup) - set(rows))
    unknown = sorted(set(rows) - set(tab.state_lookup))
    if missing or unknown:
        raise ValueError(f"{path}: {len(missing)} information states missing, {len(unknown)} unknown "
                         f"(e.g. {(missing or unknown)[0]!r})")
    for s, probs in rows.items():
        i = tab.state_lookup[s]
        p = np.asarray(probs, dtype=np.float64)
        legal = tab.legal_actions_mask[i].astype(bool)
        if p.shape != legal.shape or np.any(p[~legal] != 0) or np.any(p < 0) or not np.isclose(p.sum(), 1.0, atol=1e-9):
            raise ValueError(f"{path}: the row of {s!r} is not a distribution over its legal actions: {probs}")
        tab.action_probability_array[i] = p
    return tab
