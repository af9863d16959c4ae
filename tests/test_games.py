"""Games (agents.envs.games, agents.games): the env against pyspiel, the measurement (our table and
policy.json path into OpenSpiel's nash_conv on known policies), the average policy against OpenSpiel's
own mixture of strategies, and the policy's action distribution against a float64 softmax."""

from __future__ import annotations

import numpy as np
import pyspiel
import pytest
import torch
from pettingzoo.test import parallel_api_test

from agents.envs import make_env
from agents.games.actions import action_names, action_token_ids, game_tokenizer, legal_logprobs
from agents.games.tables import AveragePolicy, InfoStates, load_policy_json, nash_conv, write_policy_json

GAMES = ["kuhn_poker", "leduc_poker", "matrix_rps", "matrix_brps", "matrix_mp"]


def _kuhn():
    game = pyspiel.load_game("kuhn_poker")
    return game, InfoStates(game)


def _kuhn_nash(space: InfoStates, alpha: float) -> np.ndarray:
    """Kuhn's Nash family (Kuhn 1950): player 0 bets a jack with alpha, a king with 3 alpha, calls a bet
    after checking with a queen with alpha + 1/3 (a king always, a jack never); player 1 bets a jack
    after a check 1/3, a king always, calls a bet with a queen 1/3, a king always. Cards 0 J, 1 Q, 2 K;
    actions 0 Pass, 1 Bet."""
    bet = {"0": alpha, "1": 0.0, "2": 3 * alpha, "0pb": 0.0, "1pb": alpha + 1 / 3, "2pb": 1.0,
           "0p": 1 / 3, "1p": 0.0, "2p": 1.0, "0b": 0.0, "1b": 1 / 3, "2b": 1.0}
    table = np.zeros(space.legal.shape)
    for s, i in space.index.items():
        table[i] = [1 - bet[s], bet[s]]
    return table


# ---- the measurement ---------------------------------------------------------------------------------


def test_nash_conv_of_known_kuhn_policies_through_policy_json(tmp_path):
    game, space = _kuhn()
    assert len(space) == 12

    def through_json(table):
        path = tmp_path / "policy.json"
        write_policy_json(path, "kuhn_poker", {}, space, table)
        from open_spiel.python.algorithms import exploitability

        return exploitability.nash_conv(game, load_policy_json(path, game))

    uniform = space.uniform()
    assert nash_conv(game, space, uniform) == pytest.approx(11 / 12, abs=1e-12)
    assert through_json(uniform) == pytest.approx(11 / 12, abs=1e-12)
    always_pass = np.zeros(space.legal.shape)
    always_pass[:, 0] = 1.0  # check when possible, fold to a bet
    assert through_json(always_pass) == pytest.approx(2.0, abs=1e-12)
    for alpha in (0.0, 0.1, 1 / 3):
        assert through_json(_kuhn_nash(space, alpha)) == pytest.approx(0.0, abs=1e-12)
    off = _kuhn_nash(space, 0.2)
    off[space.index["1b"]] = [0.5, 0.5]  # player 1 calls a bet with a queen half of the time, not a third
    assert through_json(off) > 0.01


def test_policy_json_rejects_a_missing_state_or_an_illegal_action(tmp_path):
    import json

    game, space = _kuhn()
    path = tmp_path / "policy.json"
    write_policy_json(path, "kuhn_poker", {}, space, space.uniform())
    doc = json.loads(path.read_text())
    del doc["policy"]["0"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="1 information states missing"):
        load_policy_json(path, game)
    leduc = pyspiel.load_game("leduc_poker")
    lspace = InfoStates(leduc)
    bad = lspace.uniform()
    bad[0] = [1.0, 0.0, 0.0]  # folding is illegal at the first decision
    with pytest.raises(ValueError, match="illegal"):
        write_policy_json(path, "leduc_poker", {}, lspace, bad)


def test_average_policy_is_openspiels_mixture_of_the_strategies():
    """Two Kuhn strategies averaged with their own reach weights are the realisation-equivalent mixture
    OpenSpiel's PolicyAggregator computes."""
    from open_spiel.python import policy as os_policy
    from open_spiel.python.algorithms import policy_aggregator

    from agents.games.tables import tabular_policy

    game, space = _kuhn()
    rng = np.random.default_rng(0)
    tables = []
    for _ in range(2):
        t = rng.random(space.legal.shape)
        tables.append(t / t.sum(axis=1, keepdims=True))
    avg = AveragePolicy(space)
    for t in tables:
        avg.add(t)
    mixed = policy_aggregator.PolicyAggregator(game).aggregate(
        [0, 1], [[tabular_policy(game, space, t) for t in tables]] * 2, [[0.5, 0.5]] * 2)
    want = os_policy.tabular_policy_from_callable(game, mixed)
    for s, i in space.index.items():
        np.testing.assert_allclose(avg.table()[i], want.action_probability_array[want.state_lookup[s]], atol=1e-12)


def test_linear_average_weighs_iterate_t_by_t_against_a_float64_reference():
    """weighting=linear: avg(I) = sum_t t r_t(I) sigma_t(I) / sum_t t r_t(I), r_t the own reach, computed
    here by hand from the parents of Kuhn's states (not through InfoStates.own_reach); and not the
    uniform average of the same iterates."""
    game, space = _kuhn()
    rng = np.random.default_rng(1)
    tables = []
    for _ in range(4):
        t = rng.random(space.legal.shape) ** 3
        tables.append(t / t.sum(axis=1, keepdims=True))
    linear, uniform = AveragePolicy(space, "linear"), AveragePolicy(space, "uniform")
    for t in tables:
        linear.add(t)
        uniform.add(t)
    # Kuhn: a player's states are the card ("0"), then after the opponent's move ("0pb" for player 0,
    # "0p"/"0b" for player 1); "Npb"'s own parent is "N" with action Pass (0).
    for s, i in space.index.items():
        num, den = np.zeros(space.num_actions), 0.0
        for t, sigma in enumerate(tables, start=1):
            reach = sigma[space.index[s[0]], 0] if s.endswith("pb") else 1.0
            num += t * reach * sigma[i]
            den += t * reach
        np.testing.assert_allclose(linear.table()[i], num / den, rtol=0, atol=1e-14)
    assert np.abs(linear.table() - uniform.table()).max() > 0.01
    with pytest.raises(ValueError, match="uniform or linear"):
        AveragePolicy(space, "quadratic")


def test_linear_average_resumes_from_its_state_dict_bit_for_bit():
    """The weight of iterate t is t: the checkpointed state carries the count, so a resumed average
    gives the uninterrupted one's sums exactly."""
    _, space = _kuhn()
    rng = np.random.default_rng(3)
    tables = [t / t.sum(axis=1, keepdims=True) for t in rng.random((5, *space.legal.shape))]
    whole, first = AveragePolicy(space, "linear"), AveragePolicy(space, "linear")
    for t in tables:
        whole.add(t)
    for t in tables[:2]:
        first.add(t)
    resumed = AveragePolicy(space, "linear")
    resumed.load_state_dict(first.state_dict())
    for t in tables[2:]:
        resumed.add(t)
    assert np.array_equal(resumed.sums, whole.sums) and resumed.updates == 5
    with pytest.raises(ValueError, match="is not this run's"):
        AveragePolicy(space, "uniform").load_state_dict(first.state_dict())


def test_xfp_iterations_with_a_perfect_fit_are_openspiels_xfp_on_kuhn():
    """rl.best_response=exact: starting from the uniform table and taking each target (the average of the
    best responses so far) as the next table (a perfect fit), our best responses and average give
    OpenSpiel's XFPSolver average policy after every one of the first iterations, and its NashConv."""
    from open_spiel.python import policy as os_policy
    from open_spiel.python.algorithms import exploitability, fictitious_play

    from agents.games.xfp import xfp_iteration

    game, space = _kuhn()
    solver = fictitious_play.XFPSolver(game)
    average = AveragePolicy(space)
    table = space.uniform()
    for _ in range(8):
        solver.iteration()
        table = xfp_iteration(game, space, average, table)
        want = os_policy.tabular_policy_from_callable(game, solver.average_policy())
        for s, i in space.index.items():
            np.testing.assert_allclose(table[i], want.action_probability_array[want.state_lookup[s]], atol=1e-12)
        assert nash_conv(game, space, table) == pytest.approx(exploitability.nash_conv(game, want), abs=1e-12)
    assert nash_conv(game, space, table) < 0.25  # it moved from the uniform 0.917


def test_xfp_iteration_mixes_the_table_and_its_best_responses_by_reach():
    """The first iteration from a table pi: target(I) proportional to w_0 r_pi(I) pi(I) + w_1 r_br(I) br(I),
    with weights 1, 1 (uniform) or 1, 2 (linear); by hand at Kuhn's "1pb" (after Pass at "1") and "1"."""
    from agents.games.xfp import best_response_table, xfp_iteration

    game, space = _kuhn()
    rng = np.random.default_rng(2)
    pi = rng.random(space.legal.shape)
    pi /= pi.sum(axis=1, keepdims=True)
    br = best_response_table(game, space, pi)
    i, parent = space.index["1pb"], space.index["1"]
    for weighting, w in (("uniform", 1.0), ("linear", 2.0)):
        average = AveragePolicy(space, weighting)
        out = xfp_iteration(game, space, average, pi)
        assert average.updates == 2
        want = pi[parent, 0] * pi[i] + w * br[parent, 0] * br[i]
        np.testing.assert_allclose(out[i], want / want.sum(), atol=1e-14)
        np.testing.assert_allclose(out[parent], (pi[parent] + w * br[parent]) / (1 + w), atol=1e-14)
    # the second iteration adds one best response, not the table again
    assert (xfp_iteration(game, space, average, out), average.updates)[1] == 3


# ---- PSRO ----------------------------------------------------------------------------------------------


def _random_tables(space, n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = rng.random(space.legal.shape) * space.legal
        out.append(t / t.sum(axis=1, keepdims=True))
    return out


@pytest.mark.parametrize("name", ["kuhn_poker", "leduc_poker"])
def test_sequence_form_payoffs_are_openspiels_expected_values(name):
    """x_0^T A x_1 of two random strategies equals OpenSpiel's expected_game_score.policy_value of the
    joint policy (seat 0 from one table, seat 1 from the other); the population's meta-game likewise."""
    from open_spiel.python.algorithms import expected_game_score

    from agents.games.psro import Population
    from agents.games.tables import tabular_policy

    game = pyspiel.load_game(name)
    space = InfoStates(game)
    tables = _random_tables(space, 3, seed=5)
    pop = Population(game, space)
    for t in tables:
        pop.add(t)
    for i, a in enumerate(tables):
        for j, b in enumerate(tables):
            joint = tabular_policy(game, space, np.where((space.player == 0)[:, None], a, b))
            want = expected_game_score.policy_value(game.new_initial_state(), [joint, joint])[0]
            assert pop.form.value(a, b) == pytest.approx(want, abs=1e-12)
            assert pop.payoffs[i, j] == pytest.approx(want, abs=1e-12)


def test_zero_sum_solver_finds_the_matrix_games_equilibria():
    """Rock-paper-scissors: uniform, value 0; OpenSpiel's biased RPS: (1/16, 10/16, 5/16); a random
    7 x 5 game: no pure deviation of either player gains against the solution (the definition)."""
    from agents.games.psro import solve_zero_sum

    rps = pyspiel.load_game("matrix_rps")
    row, col, value = solve_zero_sum(np.asarray(rps.row_utilities()))
    np.testing.assert_allclose(row, [1 / 3] * 3, atol=1e-9)
    np.testing.assert_allclose(col, [1 / 3] * 3, atol=1e-9)
    assert value == pytest.approx(0.0, abs=1e-9)
    brps = pyspiel.load_game("matrix_brps")
    row, col, _ = solve_zero_sum(np.asarray(brps.row_utilities()))
    np.testing.assert_allclose(row, [1 / 16, 10 / 16, 5 / 16], atol=1e-9)
    np.testing.assert_allclose(col, [1 / 16, 10 / 16, 5 / 16], atol=1e-9)
    m = np.random.default_rng(3).normal(size=(7, 5))
    row, col, value = solve_zero_sum(m)
    assert row.sum() == pytest.approx(1.0) and col.sum() == pytest.approx(1.0) and (row >= 0).all() and (col >= 0).all()
    assert (m @ col).max() <= value + 1e-9 and (row @ m).min() >= value - 1e-9


def test_population_mixture_is_openspiels_weighted_aggregate():
    """The behaviour strategy of members mixed by sigma_0 (seat 0) and sigma_1 (seat 1) is the
    realisation-equivalent mixture OpenSpiel's PolicyAggregator computes with those weights."""
    from open_spiel.python import policy as os_policy
    from open_spiel.python.algorithms import policy_aggregator

    from agents.games.psro import Population
    from agents.games.tables import tabular_policy

    game, space = _kuhn()
    tables = _random_tables(space, 3, seed=7)
    pop = Population(game, space)
    for t in tables:
        pop.add(t)
    sigma0, sigma1 = np.array([0.2, 0.5, 0.3]), np.array([0.6, 0.0, 0.4])
    pols = [tabular_policy(game, space, t) for t in tables]
    mixed = policy_aggregator.PolicyAggregator(game).aggregate([0, 1], [pols, pols], [list(sigma0), list(sigma1)])
    want = os_policy.tabular_policy_from_callable(game, mixed)
    got = pop.mixture(sigma0, sigma1)
    for s, i in space.index.items():
        np.testing.assert_allclose(got[i], want.action_probability_array[want.state_lookup[s]], atol=1e-12)


def test_double_oracle_reaches_kuhns_equilibrium_and_its_state_round_trips():
    """PSRO with a perfect fit (each target taken as the next table) from the uniform table: within 10
    iterations the target is a Nash equilibrium of Kuhn poker (OpenSpiel's NashConv ~0, the
    meta-game's value the game's -1/18); a population rebuilt from its state_dict gives the same target."""
    from agents.games.psro import Population, meta_target, psro_iteration, psro_iterations_done

    game, space = _kuhn()
    pop = Population(game, space)
    solves = []
    solve = pop.solve
    pop.solve = lambda: solves.append(len(pop)) or solve()
    table, convs = space.uniform(), []
    for _ in range(10):
        table, figures = psro_iteration(pop, table)
        convs.append(nash_conv(game, space, table))
    assert psro_iterations_done(pop) == 10 and figures["psro_population"] == 11
    # Each population is solved once: the first iteration's lone member, then each grown one (the next
    # iteration's best responses reuse the equilibrium meta_target solved).
    assert solves == list(range(1, 12)), solves
    assert convs[0] > 0.5 and convs[-1] < 1e-7, convs  # (the meta-solver's tolerance: 1e-9 of the value)
    assert figures["psro_meta_value"] == pytest.approx(-1 / 18, abs=1e-9)
    again = Population(game, space)
    again.load_state_dict(pop.state_dict())
    np.testing.assert_array_equal(again.payoffs, pop.payoffs)
    np.testing.assert_array_equal(meta_target(again, solve=False)[0], meta_target(pop, solve=False)[0])


# ---- the env -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("game", GAMES)
def test_env_passes_pettingzoo_parallel_api_test(game):
    parallel_api_test(make_env("openspiel", game=game), num_cycles=50)


@pytest.mark.parametrize("game", ["kuhn_poker", "leduc_poker", "matrix_brps"])
def test_observations_and_legal_actions_are_pyspiels(game):
    """Random play through the env, replayed move by move in pyspiel: at every decision the acting
    player observes pyspiel's information-state string and is offered exactly its legal actions."""
    env = make_env("openspiel", game=game)
    rng = np.random.default_rng(1)
    for episode in range(20):
        obs, infos = env.reset(seed=episode)
        seen = []
        while env.agents:
            agent = env.turn_agents[0]
            seen.append((agent, obs[agent], infos[agent]["legal_action_ids"], infos[agent]["legal_actions"]))
            other = next(a for a in env.agents if a != agent)
            assert obs[other] == "Wait." and infos[other]["legal_actions"] == []
            obs, rewards, _, _, infos = env.step({agent: env.random_action(agent, rng)})
        final_returns = env.state.returns()
        # replay the history (deal included) in a fresh pyspiel state
        state = env.game.new_initial_state()
        decisions = iter(seen)
        for action in env.state.history():
            if not state.is_chance_node():
                agent, text, legal, names = next(decisions)
                p = state.current_player()
                assert agent == f"player_{p}"
                assert text == state.information_state_string(p)
                assert legal == state.legal_actions(p)
                assert list(np.flatnonzero(state.legal_actions_mask(p))) == legal
                assert names == [state.action_to_string(p, a) for a in legal]
            state.apply_action(action)
        assert state.is_terminal() and state.returns() == final_returns
        assert rewards == {"player_0": final_returns[0], "player_1": final_returns[1]}


def test_an_illegal_action_is_counted_and_the_same_player_acts_again():
    env = make_env("openspiel", game="leduc_poker")
    obs, _ = env.reset(seed=0)
    obs2, rewards, _, _, infos = env.step({"player_0": "Fold"})  # no bet to fold to
    assert infos["player_0"]["invalid"] and infos["player_0"]["invalid_actions"] == 1
    assert env.turn_agents == ["player_0"] and obs2["player_0"] == obs["player_0"]
    _, _, _, _, infos = env.step({"player_0": " call "})
    assert not infos["player_0"]["invalid"] and env.turn_agents == ["player_1"]


@pytest.mark.parametrize("args, message", [
    ({"game": "chess_960"}, "unknown game 'chess_960'"),
    ({"game": "kuhn_poker", "params": {"players": 3}}, "has 3 players"),
    ({"game": "matrix_pd"}, "not zero-sum"),
])
def test_bad_games_are_one_line_value_errors(args, message):
    with pytest.raises(ValueError, match=message):
        make_env("openspiel", **args)


# ---- the policy's action distribution ----------------------------------------------------------------------


def test_action_probabilities_are_a_float64_softmax_over_the_legal_actions_logits():
    from model import GPT, GPTConfig

    game = pyspiel.load_game("leduc_poker")
    tok = game_tokenizer(game)
    names = action_names(game)
    assert names == ["Fold", "Call", "Raise"]
    tokens = action_token_ids(tok, names)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(style="llama", vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                        d_model=32, max_seq_len=128)).eval()
    space = InfoStates(game)
    rows = list(range(0, len(space), 97))
    prompts = [tok.encode(space.strings[i]).ids for i in rows]
    assert len({len(p) for p in prompts}) > 1  # right padding is exercised
    legal = torch.from_numpy(space.legal[rows])
    with torch.no_grad():
        got = legal_logprobs(gpt, prompts, legal, tokens).exp().double()
        for n, (p, mask) in enumerate(zip(prompts, legal)):
            logits = gpt.double()(torch.tensor([p]))[0, -1, tokens].double()
            gpt.float()
            want = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
            assert torch.allclose(got[n], want, atol=1e-6, rtol=0)
            assert (got[n][~mask] == 0).all()


def test_game_tokenizer_reads_leducs_field_names_and_numbers_as_words_and_kuhn_as_characters():
    """Every information-state string encodes without an unknown token and decodes back to itself; Leduc's
    bracketed field names and numbers are one token each (its longest string 111 characters, 48 tokens);
    Kuhn's strings stay one token per character, in the character vocabulary."""
    import re

    from agents.envs.base import CHARSET

    leduc, kuhn = pyspiel.load_game("leduc_poker"), pyspiel.load_game("kuhn_poker")
    for game in (leduc, kuhn):
        tok, space = game_tokenizer(game), InfoStates(game)
        unk = tok.token_to_id("?")
        for s in space.strings:
            enc = tok.encode(s)
            assert tok.decode(enc.ids) == s
            assert unk not in enc.ids or "?" in s
    tok = game_tokenizer(leduc)
    s = "[Observer: 1][Private: 3][Round 2][Player: 1][Pot: 14][Money: 93 97][Public: 0][Round1: 2 1][Round2: 2]"
    assert tok.encode(s).tokens == re.findall(r"\[[A-Za-z][A-Za-z0-9]*:?|[0-9]+|.", s)
    assert tok.encode(s).tokens[:8] == ["[Observer:", " ", "1", "]", "[Private:", " ", "3", "]"]
    assert max(len(tok.encode(s).ids) for s in InfoStates(leduc).strings) == 48
    ktok = game_tokenizer(kuhn)
    assert ktok.get_vocab_size() == len(dict.fromkeys(CHARSET)) + 1 + len(action_names(kuhn))
    assert ktok.encode("2pb").tokens == ["2", "p", "b"]


def test_a_name_that_is_not_one_token_is_refused():
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "Pass": 1}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="'Bet' is not one token"):
        action_token_ids(tok, ["Pass", "Bet"])


def test_bench_games_tables_openspiels_solvers_and_tabular_psro(tmp_path):
    """bench/bench_games.py on Kuhn with a small budget: CFR, XFP and our tabular double oracle each get a
    series; the double oracle ends at Kuhn's equilibrium (NashConv 0 within 10 iterations)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "games.md"
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_games.py"), "--games", "kuhn_poker",
                           "--budget", "2", "--iterations", "10", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    final = {line.split("|")[2].strip(): float(line.split("|")[3]) for line in text.splitlines()
             if line.startswith("| kuhn_poker |")}
    assert set(final) == {"OpenSpiel CFR", "OpenSpiel XFP", "tabular PSRO (double oracle, ours)"}
    assert final["tabular PSRO (double oracle, ours)"] < 1e-6 < final["OpenSpiel XFP"]
