"""agents.envs.debate_arith: PettingZoo's checks, what each agent sees in each round, answers and votes
against hand computations, the final infos, the corpus player and bad arguments."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from agents.envs import make_env
from agents.envs.debate_arith import (
    column_subtraction,
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


def _corpus_rounds(env, episodes: int = 400):
    """(round, the corpus player's answers, the observations after them) of every round of `episodes`
    two-round debates."""
    rng = np.random.default_rng(0)
    for _ in range(episodes):
        env.reset(seed=int(rng.integers(1 << 30)))
        for r in (1, 2):
            acts = {a: env.corpus_action(a, rng) for a in env.agents}
            obs, *_ = env.step(acts)
            yield r, acts, obs


def test_the_corpus_player_writes_right_reasoning_slipping_only_in_round_one():
    env = make_env("debate_arith", corpus_slip=0.5)
    right = {1: 0, 2: 0}
    for r, acts, _ in _corpus_rounds(env):
        right[r] += sum(parse_answer(t) == solve(env.problem) for t in acts.values())
        assert all(t.count("=") == 5 for t in acts.values())
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


def _check_columns(text: str, s: int, t: int) -> int:
    """Checks a steps="columns" subtraction of s-t against integer arithmetic, not the column rule: the
    sign, the larger and smaller number padded to one width, each column's digit of |s-t|, and the
    borrow flag into column i present exactly when the smaller's last i digits exceed the larger's."""
    head, *cols, value = text.split(" ")
    big, small = max(s, t), min(s, t)
    width = max(3, len(str(big)))
    assert head == f"{s}-{t}={'+' if s >= t else '-'}({big:0{width}d}-{small:0{width}d})", text
    assert len(cols) == width, text
    for i, col in enumerate(cols):
        borrow = small % 10**i > big % 10**i
        x, y = big // 10**i % 10, small // 10**i % 10
        assert col == f"{'b' if borrow else ''}{x}-{y}={(big - small) // 10**i % 10}", (text, i)
    assert value == f"={s - t}", text
    return s - t


def _check_digits_steps(text: str, p, steps: str = "digits") -> list[int]:
    """Recomputes every step of a steps="digits" (or "columns") answer to problem p; returns how far each
    of its two products is off (0: right). The products must be written as the rule says: a multiplier
    >= 10 as "x*y=T+O=P" with T = x*10*(y's tens) and O = x*(y's ones) (O possibly slipped), else
    "x*y=P"; the rest must follow from what was written."""
    a, b, c, d, e, f = p
    parts = text.split(" ", 4)
    assert len(parts) == 5, text
    written, offs = [], []
    for part, (x, y) in zip(parts[:2], ((b, c), (e, f))):
        lhs, *vals = part.split("=")
        assert lhs == f"{x}*{y}", part
        if y >= 10:
            assert len(vals) == 2, part
            tens, ones = (int(v) for v in vals[0].split("+"))
            assert tens == x * int(str(y)[:-1]) * 10
            assert ones >= 0 and int(vals[1]) == tens + ones
            offs.append(ones - x * int(str(y)[-1]))
        else:
            assert len(vals) == 1, part
            assert int(vals[0]) >= 0
            offs.append(int(vals[0]) - x * y)
        written.append(int(vals[-1]))
    s1 = a + written[0]
    s2 = s1 + d
    last = f"{s2}-{written[1]}={s2 - written[1]}"
    if steps == "columns":
        _check_columns(parts[4], s2, written[1])
        last = parts[4]
    assert parts[2:] == [f"{a}+{written[0]}={s1}", f"{s1}+{d}={s2}", last]
    assert parse_answer(text) == s2 - written[1] == solve(p) + offs[0] - offs[1]
    return offs


def test_digits_steps_split_a_two_digit_multiplier_and_recompute_by_hand():
    p = (3, 12, 23, 6, 27, 18)
    assert solve(p) == 3 + 276 + 6 - 486 == -201
    text = reasoning(p, steps="digits")
    assert text == "12*23=240+36=276 27*18=270+216=486 3+276=279 279+6=285 285-486=-201"
    assert _check_digits_steps(text, p) == [0, 0]
    # a slipped digit product: the product and every step after it follow from it
    assert reasoning(p, (1, -9), "digits") == "12*23=240+36=276 27*18=270+207=477 3+276=279 279+6=285 285-477=-192"
    # a one-digit multiplier is one step; a slip that would go below 0 goes up instead; 0*10 is "0", not "00"
    q = (3, 12, 3, 6, 0, 10)
    assert reasoning(q, (1, -9), "digits") == "12*3=36 0*10=0+9=9 3+36=39 39+6=45 45-9=36"
    assert reasoning(q, (0, -40), "digits") == "12*3=76 0*10=0+0=0 3+76=79 79+6=85 85-0=85"
    assert reasoning((1, 2, 3, 4, 5, 6), steps="digits") == reasoning((1, 2, 3, 4, 5, 6))  # no multiplier >= 10


# the longest answer of operands in [0, 29], slipped or not; the default message_chars holds it
@pytest.mark.parametrize("steps,longest,message_chars", [("digits", 70, 80), ("columns", 104, 112)])
def test_every_step_of_random_answers_recomputes_and_fits_the_message(steps, longest, message_chars):
    assert make_env("debate_arith", steps=steps).message_chars == message_chars
    rng = np.random.default_rng(3)
    for _ in range(2000):
        p = tuple(int(x) for x in rng.integers(0, 30, 6))
        which, amount = int(rng.integers(2)), int(rng.integers(1, 10)) * int(rng.choice([-1, 1]))
        assert _check_digits_steps(reasoning(p, steps=steps), p, steps) == [0, 0]
        offs = _check_digits_steps(reasoning(p, (which, amount), steps), p, steps)
        assert abs(offs[which]) == abs(amount) and offs[1 - which] == 0
        assert len(reasoning(p, (which, amount), steps)) <= longest


@pytest.mark.parametrize("steps", ["digits", "columns"])
def test_digits_corpus_player_slips_one_digit_product_in_round_one_only_and_answers_fit_the_spaces(steps):
    env = make_env("debate_arith", max_operand=29, steps=steps, corpus_slip=0.5)
    assert make_env("debate_arith").message_chars == 64
    assert make_env("debate_arith", steps=steps, message_chars=100).message_chars == 100
    slipped = {1: 0, 2: 0}
    for r, acts, obs in _corpus_rounds(env):
        for t in acts.values():
            offs = _check_digits_steps(t, env.problem, steps)
            assert 0 in offs and all(abs(o) <= 9 for o in offs)
            slipped[r] += offs != [0, 0]
            assert env.action_spaces["agent_0"].contains(t)
        if r == 1:  # the others' answers are shown whole
            for a in env.agents:
                assert all(f"{o}: {acts[o]}" in obs[a].split("\n") for o in env.agents if o != a)
                assert env.observation_spaces[a].contains(obs[a])
    assert slipped[2] == 0 and 0.42 < slipped[1] / 1200 < 0.58


def test_column_subtraction_matches_integer_arithmetic_and_its_borrows():
    assert column_subtraction(29, 56) == "29-56=-(056-029) 6-9=7 b5-2=2 0-0=0 =-27"
    assert column_subtraction(100, 1) == "100-1=+(100-001) 0-1=9 b0-0=9 b1-0=0 =99"  # a chain of borrows
    assert column_subtraction(5, 5) == "5-5=+(005-005) 5-5=0 0-0=0 0-0=0 =0"
    assert column_subtraction(1000, 999) == "1000-999=+(1000-0999) 0-9=1 b0-9=0 b0-9=0 b1-0=0 =1"
    for s in range(0, 1000, 7):
        for t in range(0, 1000, 3):
            text = column_subtraction(s, t)
            assert _check_columns(text, s, t) == parse_answer(text) == s - t


def test_columns_steps_end_with_the_subtraction_by_columns():
    p = (3, 12, 23, 6, 27, 18)
    text = reasoning(p, steps="columns")
    assert text == ("12*23=240+36=276 27*18=270+216=486 3+276=279 279+6=285 "
                    "285-486=-(486-285) 6-5=1 8-8=0 4-2=2 =-201")
    assert text == reasoning(p, steps="digits").rsplit(" ", 1)[0] + " " + column_subtraction(285, 486)


def test_digits_env_passes_the_api_tests_and_bad_steps_are_one_line():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel_api_test(make_env("debate_arith", steps="digits", max_operand=29), num_cycles=30)
        parallel_api_test(make_env("debate_arith", steps="columns", max_operand=29), num_cycles=30)
    with pytest.raises(ValueError, match=r"^debate_arith: steps must be one of pairwise, digits, columns, got 'bytes'$"):
        make_env("debate_arith", steps="bytes")
    with pytest.raises(ValueError, match=r"^debate_arith: steps must be one of pairwise, digits, columns, got 'x'$"):
        reasoning((1, 2, 3, 4, 5, 6), steps="x")
    with pytest.raises(ValueError, match=r"^debate_arith: message_chars must be an integer >= 1, got 0$"):
        make_env("debate_arith", steps="digits", message_chars=0)
