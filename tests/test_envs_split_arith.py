"""agents.envs.split_arith: who knows what, the turn order, answer parsing and rewards, checked
against arithmetic done here on what the observations say."""

from __future__ import annotations

import operator
import re

import pytest

from agents.envs import make_env

PY_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def known(obs):
    """(op, name, value) read from an acting agent's observation."""
    task, know = obs.split("\n")[:2]
    op = re.fullmatch(r"Task: a ([-+*]) b", task).group(1)
    name, value = re.fullmatch(r"You know: ([ab]) = (-?\d+)", know).groups()
    return op, name, int(value)


def test_observations_are_the_documented_text_and_turns_alternate():
    env = make_env("split_arith", turns=3)
    obs, infos = env.reset(seed=0, options={"a": 12, "b": 30, "op": "+"})
    assert obs == {"first": "Task: a + b\nYou know: a = 12\nMessage:", "second": "Wait."}
    order = []
    for msg in ["a is 12", "b\tis 30\u00e9", "ok"]:
        order.append(env.turn_agents[0])
        obs, rewards, *_ = env.step({a: msg for a in env.agents})
        assert rewards == {"first": 0.0, "second": 0.0}
    assert order == ["first", "second", "first"]
    assert env.turn_agents == ["second"]
    assert obs == {"first": "Wait.",
                   "second": "Task: a + b\nYou know: b = 30\nfirst: a is 12\nsecond: b is 30?\nfirst: ok\nAnswer:"}
    obs, rewards, terms, _, infos = env.step({"second": "It is 42."})
    assert rewards == {"first": 1.0, "second": 1.0} and all(terms.values()) and env.agents == []
    assert infos["first"] == {"turn": False, "invalid": False, "invalid_actions": 0, "step": 4, "success": True,
                              "answer": 42, "expected": 42, "a": 12, "b": 30, "op": "+"}


@pytest.mark.parametrize("turns,order", [(0, ["second"]), (1, ["first", "second"]),
                                         (2, ["first", "second", "second"])])
def test_number_of_turns(turns, order):
    env = make_env("split_arith", turns=turns)
    env.reset(seed=1)
    seen = []
    while env.agents:
        seen.append(env.turn_agents[0])
        env.step({a: "" for a in env.agents})
    assert seen == order


@pytest.mark.parametrize("ops", [["+"], ["-"], ["*"], ["+", "-", "*"]])
def test_a_perfect_pair_always_succeeds_and_the_answer_is_checked_exactly(ops):
    env = make_env("split_arith", ops=ops, min_operand=-20, max_operand=120, turns=1)
    seen_ops = set()
    for seed in range(200):
        obs, _ = env.reset(seed=seed)
        op, name, a = known(obs["first"])
        assert name == "a" and op in ops and -20 <= a <= 120
        seen_ops.add(op)
        obs, *_ = env.step({"first": str(a)})
        op2, name, b = known(obs["second"])
        assert (op2, name) == (op, "b") and -20 <= b <= 120
        told = int(obs["second"].split("\n")[2][len("first: "):])
        right = PY_OPS[op](told, b)
        # the right answer, then an off-by-one one on the same episode replayed from its seed
        _, rewards, _, _, infos = env.step({"second": f"= {right}."})
        assert rewards["second"] == 1.0 and infos["second"]["expected"] == right
        env.reset(seed=seed)
        env.step({"first": str(a)})
        _, rewards, _, _, infos = env.step({"second": str(right + 1)})
        assert rewards == {"first": 0.0, "second": 0.0} and infos["first"]["success"] is False
        assert infos["second"]["invalid"] is False
    assert seen_ops == set(ops)


@pytest.mark.parametrize("answer,parsed", [("42", 42), ("-7 apples", -7), ("a=3, b=4, so 7", 3), ("4 2", 4),
                                           ("forty-two", None), ("", None), ("- 5", 5), ("0042", 42)])
def test_answers_are_the_first_integer_or_invalid(answer, parsed):
    env = make_env("split_arith", turns=0, min_operand=-100)
    env.reset(seed=0, options={"a": 40, "b": 2, "op": "+"})
    _, rewards, _, _, infos = env.step({"second": answer})
    assert infos["second"]["answer"] == parsed
    assert infos["second"]["invalid"] is (parsed is None)
    assert infos["second"]["invalid_actions"] == int(parsed is None)
    assert rewards["second"] == float(parsed == 42)


def test_non_string_actions_count_as_invalid_and_read_as_empty():
    env = make_env("split_arith", turns=1)
    env.reset(seed=0)
    obs, *_ = env.step({"first": None})
    assert obs["second"].split("\n")[2] == "first: "
    _, rewards, _, _, infos = env.step({"second": 42})
    assert infos["first"]["invalid_actions"] == 1 and infos["second"]["invalid_actions"] == 1
    assert rewards["second"] == 0.0


def test_operands_are_drawn_uniformly_and_fixing_one_keeps_the_others():
    env = make_env("split_arith", min_operand=0, max_operand=9, ops=["+", "*"])
    counts = [0] * 10
    env.reset(seed=5)
    for _ in range(5000):
        env.reset()
        counts[env.a] += 1
        counts[env.b] += 1
    assert all(850 < c < 1150 for c in counts), counts  # 1000 expected, sd 30
    env.reset(seed=3)
    a, b, op = env.a, env.b, env.op
    env.reset(seed=3, options={"b": 7 if b != 7 else 6})
    assert (env.a, env.op) == (a, op) and env.b != b


@pytest.mark.parametrize("options,message", [
    ({"a": 100}, r"^split_arith.reset: a must be an integer in \[0, 99\], got 100$"),
    ({"b": "3"}, r"^split_arith.reset: b must be an integer in \[0, 99\], got '3'$"),
    ({"op": "*"}, r"^split_arith.reset: op must be one of \+, got '\*'$"),
])
def test_bad_reset_options_are_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        make_env("split_arith").reset(seed=0, options=options)
