"""Two-player games of OpenSpiel as turn-based text environments: Kuhn poker, Leduc poker and matrix
games (rock-paper-scissors, biased RPS, matching pennies, ...), for self-play measured by
exploitability (agents.games).

    env = make_env("openspiel", game="kuhn_poker")            # agents: player_0, player_1
    obs, infos = env.reset(seed=0)
    obs["player_0"]          # "0": the game's information-state string for the acting player
    infos["player_0"]["legal_actions"]   # ["Pass", "Bet"]: the action names it may write

A simultaneous-move game (every `matrix_*` game) is loaded with `pyspiel.load_game_as_turn_based`:
player 0 chooses, then player 1 chooses without seeing it (its information state does not show
player 0's move), which is the same game.

Observations: the acting player's `state.information_state_string(player)`, exactly as OpenSpiel
writes it (so that a policy over these strings fills OpenSpiel's `TabularPolicy` row for row); the
other player sees `Wait.`. Actions: the name of a legal action, `state.action_to_string(player,
action)` (compared without surrounding whitespace, case-insensitively). A name that is not a legal
action is invalid: it is counted (`infos[agent]["invalid"]`), nothing is played and the same player
acts again, so an episode never ends on a malformed action.

Chance nodes (the deal) are sampled from the env's generator with OpenSpiel's chance probabilities.
Rewards: OpenSpiel's `state.rewards()` after each step (the poker games and the matrix games pay at the
end only). Final infos: `returns` (both players', a list), `success` (None: a game has no success).
Infos at every step also carry `legal_actions` (names, [] when the agent does not act) and
`legal_action_ids` (OpenSpiel's action ids, same order).

Only two-player zero-sum games whose players all have information states are accepted: exploitability
(NashConv) is what this env is for, and OpenSpiel's `nash_conv` measures two-player games.
"""

from __future__ import annotations

import numpy as np

from .base import TextParallelEnv

__all__ = ["GAMES", "GameEnv", "load_game"]

# The games the recipes and tests use, for the error message; any two-player OpenSpiel game with
# information-state strings is accepted.
GAMES = ("kuhn_poker", "leduc_poker", "matrix_rps", "matrix_brps", "matrix_mp")


def load_game(game: str, params: dict | None = None):
    """The pyspiel game `game` (with `params`), turn-based when it is simultaneous; ValueError in one
    line for an unknown game, one with other than two players, or one without information states."""
    import pyspiel

    if not isinstance(game, str) or not game:
        raise ValueError(f"openspiel: game must be an OpenSpiel game name (e.g. {', '.join(GAMES)}), got {game!r}")
    known = {g.short_name for g in pyspiel.registered_games()}
    if game not in known:
        raise ValueError(f"openspiel: unknown game {game!r}; e.g. {', '.join(GAMES)} (pyspiel.registered_games() "
                         "lists every one)")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"openspiel: params must be a mapping of the game's parameters, got {params!r}")
    try:
        g = pyspiel.load_game(game, dict(params or {}))
    except pyspiel.SpielError as e:
        raise ValueError(f"openspiel: cannot load {game!r} with params {params!r}: {e}") from None
    if g.num_players() != 2:
        raise ValueError(f"openspiel: {game!r} has {g.num_players()} players; NashConv (exploitability) is measured "
                         "for two-player games only")
    kind = g.get_type()
    if kind.dynamics == pyspiel.GameType.Dynamics.SIMULTANEOUS:
        g = pyspiel.load_game_as_turn_based(game, dict(params or {}))
        kind = g.get_type()
    if not kind.provides_information_state_string:
        raise ValueError(f"openspiel: {game!r} has no information-state strings (the agents' observations)")
    if kind.utility != pyspiel.GameType.Utility.ZERO_SUM:
        raise ValueError(f"openspiel: {game!r} is not zero-sum; NashConv self-play here is for zero-sum games")
    return g


class GameEnv(TextParallelEnv):
    """An OpenSpiel game (see the module docstring). Arguments:
        game    OpenSpiel short name (kuhn_poker, leduc_poker, matrix_rps, matrix_brps, matrix_mp, ...)
        params  the game's parameters (e.g. {"players": 2}), default none
    """

    metadata = {"name": "openspiel", "render_modes": ["ansi"], "is_parallelizable": True}
    possible_agents = ["player_0", "player_1"]

    def __init__(self, game: str = "kuhn_poker", params: dict | None = None, render_mode: str | None = None):
        super().__init__(render_mode)
        self.game_name = game
        self.params = dict(params or {})
        self.game = load_game(game, params)
        self.max_utility = float(max(abs(self.game.min_utility()), abs(self.game.max_utility())))
        longest = max(len(self.game.new_initial_state().information_state_string(p)) for p in range(2))
        # The space only bounds sampling by PettingZoo's tests; longer strings are still observed.
        self._init_spaces({a: max(4 * longest, 256) for a in self.possible_agents},
                          {a: 16 for a in self.possible_agents})
        self.state = self.game.new_initial_state()
        self._last_rewards = [0.0, 0.0]

    # ---- OpenSpiel helpers --------------------------------------------------------------------------

    @staticmethod
    def player_of(agent: str) -> int:
        return int(agent.rsplit("_", 1)[1])

    def _play_chance(self) -> None:
        while self.state.is_chance_node():
            outcomes, probs = zip(*self.state.chance_outcomes())
            p = np.asarray(probs, dtype=np.float64)
            self.state.apply_action(int(outcomes[int(self.np_random.choice(len(outcomes), p=p / p.sum()))]))

    def legal_action_names(self, player: int) -> list[str]:
        return [self.state.action_to_string(player, a) for a in self.state.legal_actions(player)]

    def parse_action(self, player: int, text: str) -> int | None:
        """The OpenSpiel action id a text names among the legal actions, or None."""
        want = text.strip().lower()
        for a in self.state.legal_actions(player):
            if self.state.action_to_string(player, a).lower() == want:
                return a
        return None

    # ---- TextParallelEnv hooks ---------------------------------------------------------------------

    def _new_episode(self, options: dict) -> None:
        self.state = self.game.new_initial_state()
        self._last_rewards = [0.0, 0.0]
        self._play_chance()

    def _turn(self) -> str:
        return f"player_{self.state.current_player()}"

    def _act(self, agent: str, action: str | None) -> bool:
        player = self.player_of(agent)
        chosen = None if action is None else self.parse_action(player, action)
        if chosen is None:
            self._last_rewards = [0.0, 0.0]
            return True
        self.state.apply_action(chosen)
        self._play_chance()
        self._last_rewards = list(self.state.rewards())
        return False

    def _done(self) -> bool:
        return self.state.is_terminal()

    def _observe(self, agent: str) -> str:
        return self.state.information_state_string(self.player_of(agent))

    def _rewards(self) -> dict[str, float]:
        return {a: float(self._last_rewards[self.player_of(a)]) for a in self.agents}

    def _outcome(self) -> dict:
        return {"success": None, "returns": [float(r) for r in self.state.returns()]}

    def _infos(self, invalid: dict[str, bool], outcome: dict | None = None) -> dict[str, dict]:
        infos = super()._infos(invalid, outcome)
        for a, info in infos.items():
            acting = info["turn"]
            player = self.player_of(a)
            info["legal_actions"] = self.legal_action_names(player) if acting else []
            info["legal_action_ids"] = list(self.state.legal_actions(player)) if acting else []
        return infos

    def random_action(self, agent: str, rng) -> str:
        names = self.legal_action_names(self.player_of(agent))
        return names[int(rng.integers(len(names)))]
