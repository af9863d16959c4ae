"""agents.envs.debate_arith: PettingZoo's checks, what each agent sees in each round, answers and votes
against hand computations, the final infos, the corpus player and bad arguments."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from agents.envs import make_env
from agents.envs.debate_arith import (
    diversity,
    majority,
    parse_answer,
    plurality,
    problem_text,
    reasoning,
    solve,
)


@pytest.mark.parametrize("kwargs", [{}, {"agents": 2, "rounds": 1}, {"agents": 4, "rounds": 3, "message_chars": 5}])
def test_parallel_api_and_seed_tests_pass_without_warnings(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel_api_test(make_env("debate_arith", **kwargs), num_cycles=50)
        parallel_seed_test(lambda: make_env("debate_arith", **kwargs), num_cycles=50)


def test_rounds_show_the_problem_then_the_others_answers_and_the_final_infos_measure_the_debate():
    env = make_env("debate_arith", agents=3, rounds=2)
    p = [3, 4, 5, 6, 7, 8]
    obs, infos = env.reset(options={"problem": p})
    assert obs == {a: "Q: 3+4*5+6-7*8" for a in ("agent_0", "agent_1", "agent_2")}
    assert env.turn_agents == ["agent_0", "agent_1", "agent_2"] and all(i["turn"] for i in infos.values())
    assert solve(p) == 3 + 20 + 6 - 56 == -27
    first = {"agent_0": "4*5=20 7*8=56 3+20=23 23+6=29 29-56=-27", "agent_1": "4*5=21 7*8=56 3+21=24 24+6=30 30-56=-26",
             "agent_2": "no idea"}
    obs, rewards, terms, _, infos = env.step(first)
    assert not any(terms.values()) and rewards == {a: 0.0 for a in first}
    assert infos["agent_2"]["invalid"] and not infos["agent_0"]["invalid"]
    assert obs["agent_1"] == ("Q: 3+4*5+6-7*8\nagent_0: 4*5=20 7*8=56 3+20=23 23+6=29 29-56=-27\n"
                              "agent_2: no idea\nRound 2")
    obs, rewards, terms, _, infos = env.step({"agent_0": "=-27", "agent_1": "x=-27", "agent_2": "=5"})
    assert all(terms.values()) and env.agents == []
    assert rewards == {"agent_0": 1.0, "agent_1": 1.0, "agent_2": 0.0}
    info = infos["agent_0"]
    assert info["answers"] == [[-27, -26, None], [-27, -27, 5]]
    assert info["answer"] == -27 and info["success"] and info["expected"] == -27
    assert info["first_round_vote"] == -27  # a tie of single votes: the lowest agent's answer
    assert info["first_round_correct"] == [True, False, False]
    assert info["diversity"] == 1.0  # -27/-26, -27/None, -26/None all differ


def test_answers_votes_and_pseudo_labels_by_hand():
    assert parse_answer("4*5=20 7*8=56 3+20=23 23+6=29 29-56=-27") == -27
    assert parse_answer("= 12 and then =-3") == -3 and parse_answer("12") is None and parse_answer(None) is None
    assert plurality([5, 7, 7]) == 7 and plurality([5, 7, 9]) == 5 and plurality([None, 7, 9]) == 7
    assert plurality([None, None]) is None and plurality([9, 5, 5, 9]) == 9
    assert majority([5, 7, 7]) == 7 and majority([5, 7, 9]) is None and majority([7, 7, 9, 9]) is None
    assert majority([7, None, None]) is None and majority([1, 1, 1, 2, 2, 3], min_votes=4) is None
    assert majority([1, 1, 1, 2, 2, 3], min_votes=3) == 1
    assert diversity([1, 1, 1]) == 0.0 and diversity([1, 1, 2]) == pytest.approx(2 / 3)
    assert diversity([None, None]) == 1.0


def test_the_corpus_player_writes_right_reasoning_slipping_only_in_round_one():
    env = make_env("debate_arith", corpus_slip=0.5)
    rng = np.random.default_rng(0)
    right = {1: 0, 2: 0}
    for _ in range(400):
        env.reset(seed=int(rng.integers(1 << 30)))
        for r in (1, 2):
            acts = {a: env.corpus_action(a, rng) for a in env.agents}
            right[r] += sum(parse_answer(t) == env.expected for t in acts.values())
            assert all(t.count("=") == 5 for t in acts.values())
            env.step(acts)
    assert right[2] == 1200
    assert 0.42 < 1 - right[1] / 1200 < 0.58  # the slip rate, 0.5
    p = (1, 2, 3, 4, 5, 6)
    assert reasoning(p) == "2*3=6 5*6=30 1+6=7 7+4=11 11-30=-19" and problem_text(p) == "1+2*3+4-5*6"
    assert reasoning(p, (1, -2)) == "2*3=6 5*6=28 1+6=7 7+4=11 11-28=-17"


def test_problems_are_in_range_and_bad_arguments_are_one_line():
    env = make_env("debate_arith", min_operand=0, max_operand=29)
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(300):
        env.reset(seed=int(rng.integers(1 << 30)))
        assert all(0 <= x <= 29 for x in env.problem)
        seen.update(env.problem)
    assert seen == set(range(30))
    with pytest.raises(ValueError, match=r"^debate_arith: agents must be an integer >= 2 \(a debate needs at least "
                                         r"two agents\), got 1$"):
        make_env("debate_arith", agents=1)
    with pytest.raises(ValueError, match=r"^debate_arith: rounds must be an integer >= 1, got 0$"):
        make_env("debate_arith", rounds=0)
    with pytest.raises(ValueError, match=r"problem must be 6 integers in \[0, 29\], got \[1, 2\]"):
        env.reset(options={"problem": [1, 2]})
