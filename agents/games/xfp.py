r"""Full-width extensive-form fictitious play (XFP, Heinrich, Lanctot and Silver 2015) with an LLM as the
function approximator of the average policy (`rl.best_response: exact`).

Every fictitious-play iteration t = 1, 2, ... (every `rl.average_every` steps of the loop):

    pi_t     = the LLM's own table (its pi over every information state; agents.games.selfplay.policy_table)
    br_t     = for each player, OpenSpiel's exact best response to pi_t
               (open_spiel.python.algorithms.exploitability.best_response, a full walk of the game tree)
    target_t = the average of the best responses so far, at every state I of player i

        target_t(I) = (r_0(I) pi_0(I) + sum_{s<=t} r_s(I) br_s(I)) / (r_0(I) + sum_{s<=t} r_s(I))

               (r_s: player i's own reach probability of I under br_s; pi_0 the initial LLM, counted as
               the first iterate as OpenSpiel's XFPSolver counts its uniform policy): the behaviour strategy
               realisation-equivalent to the uniform mixture of the strategies pi_0, br_1, ..., br_t
               (agents.games.tables.AveragePolicy; `rl.average_weighting: linear` weighs br_s by s + 1)

and the steps until the next iteration distil the LLM toward target_t by supervised learning (the KL
divergence from target_t to the LLM's pi). This is NFSP's split with both halves made exact: the best
responses are computed, not learnt, and the LLM's supervised target is the average of all of them so far
(NFSP's reservoir of best-response play, here without sampling), while every best response answers the
LLM's own table, fitting error included. What is measured (NashConv, policy.json) is the LLM's table.

Why the mixture of best responses and not XFP's recursive update (target_t = a 1/(t+1) step from the
LLM's table pi_t toward br_t; the same sequence under a perfect fit): with the recursive form the LLM's
fitting error enters every later target and is never corrected, and on Leduc, where a fresh LLM needs a
few hundred steps to learn to read its cards, the early iterations' lag stayed in the average (the
targets' NashConv 1.36 after 132 iterations, against 0.61 for the mixture at the same step count;
docs/games.md). With a perfect fit the tables are OpenSpiel's `fictitious_play.XFPSolver` (tests/
test_games.py checks them on Kuhn poker). No episodes are sampled; the oracle needs the whole game tree,
so it is for games small enough to walk (Kuhn, Leduc).
"""

from __future__ import annotations

import numpy as np

from .tables import AveragePolicy, InfoStates, tabular_policy

__all__ = ["best_response_table", "iterations_done", "xfp_iteration"]


def best_response_table(game, space: InfoStates, table: np.ndarray) -> np.ndarray:
    """[S, A] one-hot: at every information state of player p, the action of OpenSpiel's exact best
    response of p to the other player's part of `table`."""
    from open_spiel.python.algorithms import exploitability

    policy = tabular_policy(game, space, table)
    out = np.zeros(space.legal.shape, dtype=np.float64)
    for p in range(game.num_players()):
        actions = exploitability.best_response(game, policy, p)["best_response_action"]
        for s, a in actions.items():
            i = space.index[s]
            assert space.player[i] == p and space.legal[i, a]
            out[i, a] = 1.0
    missing = np.flatnonzero(out.sum(axis=1) != 1.0)
    if len(missing):
        raise RuntimeError(f"no best-response action at {len(missing)} information states, e.g. "
                           f"{space.strings[missing[0]]!r}")
    return out


def xfp_iteration(game, space: InfoStates, average: AveragePolicy, table: np.ndarray) -> np.ndarray:
    """One XFP iteration (module docstring) from the LLM's current `table`: the first call also takes the
    table itself in as the initial iterate; adds both players' exact best responses to it to `average`
    and returns the new target, average.table()."""
    if average.updates == 0:
        average.add(table)
    average.add(best_response_table(game, space, table))
    return average.table()


def iterations_done(average: AveragePolicy) -> int:
    """XFP iterations that built `average`: the initial table, then one best response per iteration."""
    return max(average.updates - 1, 0)
