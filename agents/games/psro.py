r"""PSRO (Lanctot et al. 2017) over a population of policies, with an LLM as the policy that plays the
population's meta-equilibrium (`rl.best_response: psro`).

A population holds policy tables (agents.games.tables: every information state's probabilities; a
member's rows of player p are its strategy as player p). Every PSRO iteration (every `rl.average_every`
steps of the loop):

    1. the meta-game: M[i, j] = player 0's expected payoff when member i plays seat 0 and member j
       seat 1 (exact, from the game's sequence-form payoff matrix, below);
    2. the meta-solver: a Nash equilibrium (sigma_0, sigma_1) of the zero-sum matrix game M, by linear
       programming (scipy's HiGHS): of the equilibria, the one nearest (L1) the previous iteration's, so
       the target moves only as far as the new members make it (an LP returns some vertex of the
       equilibrium set, and which one can change from one iteration to the next for no reason);
    3. the oracle: OpenSpiel's exact best response of each player to the other's sigma-mixture
       (agents.games.xfp.best_response_table) joins the population;
    4. the meta-game is solved again with the new member, and the target is the behaviour strategy of
       the sigma-mixture (realisation-equivalent, as agents.games.tables.AveragePolicy's average):

           target(I, a) = sum_k sigma_p[k] x_k(I, a) / sum_k sigma_p[k] x_k(I)

       with x_k(I, a) = member k's own reach of I times its probability of a (its sequence-form
       realisation weight).

The steps until the next iteration distil the LLM toward the target (the KL divergence from the target
to the LLM's pi, as with XFP). The population starts with the LLM's initial table. With a Nash
meta-solver and exact best responses this is the double oracle algorithm (McMahan et al. 2003): the
target's NashConv reaches 0 after finitely many iterations in a finite game (tests/test_games.py
checks Kuhn poker). What is measured (NashConv, policy.json) is the LLM's own table.

Why not XFP's average: fictitious play mixes every best response so far with fixed weights, so a poor
early answer fades only as 1/t; the meta-solver puts weight 0 on members the equilibrium of the
population does not use.

The sequence-form payoff matrix (Koller, Megiddo and von Stengel 1994): one walk of the game tree puts
chance(z) * u_0(z) of every terminal history z at [s_0(z), s_1(z)], s_p(z) = player p's last (state,
action) on the way to z (or the empty sequence), so a pair of tables is worth x_0^T A x_1 and the whole
meta-game is X_0 A X_1^T in one sparse product.
"""

from __future__ import annotations

import numpy as np
import torch

from .tables import InfoStates
from .xfp import best_response_table

__all__ = ["Population", "SequenceForm", "meta_target", "psro_iteration", "psro_iterations_done", "solve_zero_sum"]


class SequenceForm:
    """The game's sequence-form payoff matrix for player 0 (module docstring) over `space`'s states;
    sequence index i * A + a for (state i, action a), and A * S for the empty sequence."""

    def __init__(self, game, space: InfoStates):
        from scipy import sparse

        self.space = space
        S, A = space.legal.shape
        self.empty = S * A
        rows, cols, vals = [], [], []

        def walk(state, prob: float, last: tuple[int, int]) -> None:
            if state.is_terminal():
                rows.append(last[0])
                cols.append(last[1])
                vals.append(prob * state.returns()[0])
                return
            if state.is_chance_node():
                for a, p in state.chance_outcomes():
                    walk(state.child(a), prob * p, last)
                return
            pl = state.current_player()
            i = space.index[state.information_state_string(pl)]
            for a in state.legal_actions():
                nxt = list(last)
                nxt[pl] = i * A + a
                walk(state.child(a), prob, (nxt[0], nxt[1]))

        walk(game.new_initial_state(), 1.0, (self.empty, self.empty))
        n = S * A + 1
        self.matrix = sparse.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()  # duplicates summed

    def realisation(self, table: np.ndarray, player: int) -> np.ndarray:
        """[S * A + 1]: the table's realisation weights for `player` (own reach x probability on that
        player's states, 0 elsewhere, 1 for the empty sequence)."""
        space = self.space
        x = space.own_reach(table)[:, None] * table
        x[space.player != player] = 0.0
        return np.append(x.reshape(-1), 1.0)

    def value(self, table0: np.ndarray, table1: np.ndarray) -> float:
        """Player 0's expected payoff, seat 0 playing `table0`'s strategy, seat 1 `table1`'s."""
        return float(self.realisation(table0, 0) @ (self.matrix @ self.realisation(table1, 1)))


def solve_zero_sum(payoffs: np.ndarray, near: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """A Nash equilibrium (sigma_row, sigma_col, value) of the zero-sum matrix game in which the row
    player receives payoffs[i, j], by linear programming (scipy.optimize.linprog, HiGHS). With `near`
    (a previous pair of mixtures of the same length), each player's equilibrium strategy closest to it
    in L1 distance: a second LP over the equilibrium strategies (those that guarantee the game's value),
    so that a population that grows by a member it does not need keeps its mixture instead of jumping to
    another vertex of the equilibrium set."""
    from scipy.optimize import linprog

    m = np.asarray(payoffs, dtype=np.float64)
    tol = 1e-9 * max(1.0, float(np.abs(m).max()) if m.size else 1.0)

    def maximin(u: np.ndarray) -> tuple[np.ndarray, float]:
        # max v  s.t.  (sigma^T u)_j >= v for every column j, sigma >= 0, sum sigma = 1
        n_rows, n_cols = u.shape
        c = np.zeros(n_rows + 1)
        c[-1] = -1.0
        a_ub = np.hstack([-u.T, np.ones((n_cols, 1))])
        a_eq = np.append(np.ones(n_rows), 0.0)[None, :]
        res = linprog(c, A_ub=a_ub, b_ub=np.zeros(n_cols), A_eq=a_eq, b_eq=[1.0],
                      bounds=[(0, None)] * n_rows + [(None, None)], method="highs")
        if res.status != 0:
            raise RuntimeError(f"meta-game LP failed: {res.message}")
        return _normalised(res.x[:-1]), float(res.x[-1])

    def nearest(u: np.ndarray, value: float, prev: np.ndarray) -> np.ndarray:
        # min sum t  s.t.  (sigma^T u)_j >= value - tol, t >= sigma - prev, t >= prev - sigma, sum sigma = 1
        n_rows, n_cols = u.shape
        eye = np.eye(n_rows)
        c = np.concatenate([np.zeros(n_rows), np.ones(n_rows)])
        a_ub = np.vstack([np.hstack([-u.T, np.zeros((n_cols, n_rows))]),
                          np.hstack([eye, -eye]), np.hstack([-eye, -eye])])
        b_ub = np.concatenate([np.full(n_cols, tol - value), prev, -prev])
        a_eq = np.concatenate([np.ones(n_rows), np.zeros(n_rows)])[None, :]
        res = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0], bounds=[(0, None)] * (2 * n_rows),
                      method="highs")
        if res.status != 0:
            raise RuntimeError(f"meta-game LP (nearest equilibrium) failed: {res.message}")
        return _normalised(res.x[:n_rows])

    row, value = maximin(m)
    col, neg_value = maximin(-m.T)
    if near is not None:
        row, col = nearest(m, value, np.asarray(near[0], dtype=np.float64)), \
            nearest(-m.T, neg_value, np.asarray(near[1], dtype=np.float64))
    return row, col, value


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, None)
    return x / x.sum()


class Population:
    """The PSRO population: member tables, the sequence-form payoffs between them (M, player 0's
    payoff, member i in seat 0 against member j in seat 1) and each member's realisation weights."""

    def __init__(self, game, space: InfoStates):
        self.game = game
        self.space = space
        self.form = SequenceForm(game, space)
        self.tables: list[np.ndarray] = []
        self.payoffs = np.zeros((0, 0))
        self._x: tuple[list, list] = ([], [])  # members' realisation weights as player 0 and as player 1
        self.current: tuple[np.ndarray, np.ndarray, float] | None = None  # the last solve()'s equilibrium

    def __len__(self) -> int:
        return len(self.tables)

    def _weights(self, player: int) -> np.ndarray:
        return np.stack(self._x[player])

    def add(self, table: np.ndarray) -> None:
        """A new member: its row and column of the meta-game against every member (itself included)."""
        self.space.check_table(table)
        self.tables.append(np.array(table, dtype=np.float64))
        for p in (0, 1):
            self._x[p].append(self.form.realisation(self.tables[-1], p))
        x0, x1 = self._weights(0), self._weights(1)
        self.payoffs = np.asarray(x0 @ (self.form.matrix @ x1.T))

    def solve(self) -> tuple[np.ndarray, np.ndarray, float]:
        """The meta-game's Nash equilibrium nearest the last one solved (padded with 0 for the members
        added since), kept as `current`."""
        near = None
        if self.current is not None:
            pad = len(self) - len(self.current[0])
            near = (np.append(self.current[0], np.zeros(pad)), np.append(self.current[1], np.zeros(pad)))
        self.current = solve_zero_sum(self.payoffs, near)
        return self.current

    def mixture(self, sigma0: np.ndarray, sigma1: np.ndarray) -> np.ndarray:
        """The behaviour strategy of the members mixed by sigma_p on player p's states (module
        docstring); uniform on a state no weighted member reaches."""
        space = self.space
        S, A = space.legal.shape
        num = np.zeros((S, A))
        for p, sigma in ((0, sigma0), (1, sigma1)):
            x = (sigma @ self._weights(p))[:-1].reshape(S, A)
            num[space.player == p] = x[space.player == p]
        tot = num.sum(axis=1, keepdims=True)
        return np.where(tot > 0, num / np.where(tot > 0, tot, 1.0), space.uniform())

    def state_dict(self) -> dict:
        out = {"tables": torch.from_numpy(np.stack(self.tables)) if self.tables else torch.zeros(0)}
        if self.current is not None:
            out["sigma0"], out["sigma1"] = torch.from_numpy(self.current[0]), torch.from_numpy(self.current[1])
            out["value"] = self.current[2]
        return out

    def load_state_dict(self, state: dict) -> None:
        self.tables, self.payoffs, self._x, self.current = [], np.zeros((0, 0)), ([], []), None
        for t in state["tables"].numpy():
            self.add(t.astype(np.float64))
        if "sigma0" in state:
            self.current = (state["sigma0"].numpy().copy(), state["sigma1"].numpy().copy(), float(state["value"]))


def meta_target(population: Population, solve: bool = True) -> tuple[np.ndarray, dict]:
    """The target of the population: the behaviour strategy of its meta-game's Nash mixture (solved now,
    or with solve=False the one last solved, as a resumed run restores it), and figures (population size,
    the meta-game's value, how many members the mixture uses)."""
    sigma0, sigma1, value = population.solve() if solve else population.current
    support = int((sigma0 > 1e-9).sum() + (sigma1 > 1e-9).sum())
    return population.mixture(sigma0, sigma1), {"psro_population": len(population), "psro_meta_value": value,
                                                 "psro_support": support}


def psro_iteration(population: Population, table: np.ndarray) -> tuple[np.ndarray, dict]:
    """One PSRO iteration (module docstring) from the LLM's current `table` (taken in as the first
    member on the first call): best responses to the current meta-equilibrium join the population;
    returns meta_target() of the grown population."""
    if len(population) == 0:
        population.add(table)
    current = population.current
    # The previous iteration's meta_target solved this same population already: solving it again (the
    # nearest equilibrium to itself) would only repeat that LP, 0.2-0.3 s at a population of 300.
    sigma0, sigma1, _ = current if current is not None and len(current[0]) == len(population) else population.solve()
    population.add(best_response_table(population.game, population.space, population.mixture(sigma0, sigma1)))
    return meta_target(population)


def psro_iterations_done(population: Population) -> int:
    """PSRO iterations that built `population`: the initial table, then one best response each."""
    return max(len(population) - 1, 0)
