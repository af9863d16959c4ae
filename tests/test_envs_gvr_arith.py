"""gvr_arith: generator -> verifier -> refiner on arithmetic (the PettingZoo API tests are in
tests/test_envs_api.py with the other envs)."""

from __future__ import annotations

import numpy as np
import pytest

from agents.envs import make_env


def _play(env, generator: str, verifier: str, refiner: str, **options):
    obs, infos = env.reset(seed=0, options=options)
    seen = {}
    for agent, action in (("generator", generator), ("verifier", verifier), ("refiner", refiner)):
        assert env.turn_agents == [agent] and infos[agent]["turn"]
        seen[agent] = obs[agent]
        assert all(obs[a] == "Wait." for a in env.agents if a != agent)
        obs, rewards, terms, truncs, infos = env.step({agent: action})
    assert not env.agents and all(terms.values()) and not any(truncs.values())
    return seen, rewards, infos


def test_each_role_sees_what_came_before_and_the_final_answer_is_rewarded():
    env = make_env("gvr_arith", message_chars=12)
    seen, rewards, infos = _play(env, "it is 8", "No, 3+4 is 7!", "7.", a=3, b=4)
    assert seen["generator"] == "Task: 3 + 4\nAnswer:"
    assert seen["verifier"] == "Task: 3 + 4\nProposed: it is 8\nVerdict:"
    assert seen["refiner"] == "Task: 3 + 4\nProposed: it is 8\nVerifier: No, 3+4 is 7\nFinal:"  # cut to 12
    assert rewards == {"generator": 1.0, "verifier": 1.0, "refiner": 1.0}  # shared credit
    final = infos["refiner"]
    assert final["success"] and not final["generator_correct"] and not final["verifier_accepted"]
    assert final["verifier_right"] and final["refiner_changed"] and (final["answer"], final["proposal"]) == (7, 8)


@pytest.mark.parametrize("verdict,accepted,invalid", [("YES it is", True, False), ("nope, no", False, False),
                                                      ("maybe", False, True), ("yesterday no", False, False)])
def test_verdicts(verdict, accepted, invalid):
    env = make_env("gvr_arith")
    _, rewards, infos = _play(env, "7", verdict, "7", a=3, b=4)
    assert infos["verifier"]["verifier_accepted"] is accepted
    assert infos["verifier"]["invalid_actions"] == int(invalid)
    assert infos["verifier"]["verifier_right"] is accepted  # the proposal 7 was right
    assert rewards["refiner"] == 1.0


def test_an_answer_without_a_number_is_invalid_and_unrewarded():
    env = make_env("gvr_arith", ops=["*"], min_operand=-3, max_operand=3)
    _, rewards, infos = _play(env, "-6", "yes", "no idea", a=-2, b=3)
    assert infos["refiner"]["invalid_actions"] == 1 and infos["refiner"]["answer"] is None
    assert infos["refiner"]["generator_correct"] and not infos["refiner"]["success"]
    assert set(rewards.values()) == {0.0}


def test_random_play_never_computes_the_task():
    """Random play (the base's corpus) names operands or numbers in the result range: about as often
    right as chance, far from what a trained pipeline must reach."""
    env = make_env("gvr_arith", max_operand=4)
    rng = np.random.default_rng(0)
    right = []
    for i in range(400):
        env.reset(seed=i)
        while env.agents:
            env.step({a: env.random_action(a, rng) for a in env.turn_agents})
        right.append(env.answer == env.expected)
    assert 0.05 < np.mean(right) < 0.35
