r"""Full-width extensive-form fictitious play (XFP, Heinrich, Lanctot and Silver 2015, algorithm 1) with an
LLM as the function approximator of the average policy (`rl.best_response: exact`).

Every fictitious-play iteration t = 1, 2, ... (every `rl.average_every` steps of the loop):

    avg      = the LLM's own table (its pi over every information state; agents.games.selfplay.policy_table)
    br       = for each player, OpenSpiel's exact best response to avg
               (open_spiel.python.algorithms.exploitability.best_response, a full walk of the game tree)
    target   = XFP's average-policy update, at every state I of player i, with lambda = 1 / (t + 1):

        target(I) = avg(I) + lambda r_br(I) (br(I) - avg(I)) / ((1 - lambda) r_avg(I) + lambda r_br(I))

               (r_avg, r_br: player i's own reach probability of I under avg and under br), i.e.
               target(I) is proportional to t r_avg(I) avg(I) + r_br(I) br(I): the behaviour strategy
               realisation-equivalent to the mixture (t avg + br) / (t + 1) of the two strategies.
               The initial LLM counts as iterate 1, as OpenSpiel's XFPSolver counts its uniform policy.

and then the LLM is distilled toward `target` by supervised learning (the KL divergence from target to
the LLM's pi, averaged over every information state) for the steps until the next iteration. What is
measured (NashConv, policy.json) is the LLM's own table, fitting error included. With a perfect fit the
sequence of tables is OpenSpiel's `fictitious_play.XFPSolver` (tests/test_games.py checks the targets
against it on Kuhn poker). This is XFP with an exact best-response oracle, not NFSP: nothing is learnt
by reinforcement and no episodes are sampled; the oracle needs the whole game tree, so it is for games
small enough to walk (Kuhn, Leduc).
"""

from __future__ import annotations

import numpy as np

from .tables import InfoStates, tabular_policy

__all__ = ["best_response_table", "xfp_target"]


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


def xfp_target(space: InfoStates, avg: np.ndarray, br: np.ndarray, t: int) -> np.ndarray:
    """XFP's average policy after iteration t (>= 1) from the average `avg` and the best responses `br`
    (module docstring): lambda = 1 / (t + 1), reach-weighted per information state."""
    lam = 1.0 / (t + 1)
    r_avg = space.own_reach(avg)[:, None]
    r_br = space.own_reach(br)[:, None]
    den = (1.0 - lam) * r_avg + lam * r_br
    step = np.divide(lam * r_br, den, out=np.zeros_like(den), where=den > 0)
    out = avg + step * (br - avg)
    out[~space.legal] = 0.0
    return out / out.sum(axis=1, keepdims=True)
