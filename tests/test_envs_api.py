"""agents.envs: the registry, and every registered text env against PettingZoo's own checks
(parallel_api_test, parallel_seed_test, the AEC api_test through parallel_to_aec), its spaces, its
random state and its errors."""

from __future__ import annotations

import random
import warnings

import pettingzoo
import pytest
from packaging.version import Version
from pettingzoo.test import api_test, parallel_api_test, parallel_seed_test
from pettingzoo.utils import parallel_to_aec

from agents.envs import ENVS, SignalingEnv, SplitArithEnv, env_arguments, make_env, register_env

NAMES = ["signaling", "split_arith", "gvr_arith"]
SETTINGS = [("signaling", {}), ("signaling", {"n_objects": 3, "shuffle": False, "message_chars": 4}),
            ("split_arith", {}), ("split_arith", {"turns": 0, "ops": ["-", "*"], "min_operand": -50}),
            ("split_arith", {"turns": 2, "message_chars": 5}), ("gvr_arith", {}),
            ("gvr_arith", {"ops": ["-", "*"], "min_operand": -20, "message_chars": 3})]


def test_registry_names_the_known_envs():
    assert {"signaling", "split_arith"} <= set(ENVS)
    assert isinstance(make_env("signaling"), SignalingEnv)
    assert isinstance(make_env("split_arith", turns=1), SplitArithEnv)
    with pytest.raises(ValueError, match=r"^unknown env 'chess'; known envs: debate_arith, gvr_arith, openspiel, signaling, split_arith, traffic$"):
        make_env("chess")
    with pytest.raises(ValueError, match=r"^env 'signaling' has no argument 'n_object'; allowed: n_objects, "
                                         r"objects, message_chars, shuffle, blank_message, render_mode$"):
        make_env("signaling", n_object=3)
    assert env_arguments("split_arith") == ["min_operand", "max_operand", "ops", "turns", "message_chars",
                                            "render_mode"]


def test_register_env_adds_a_constructor():
    register_env("tiny_signaling", lambda **kw: SignalingEnv(n_objects=2, **kw))
    try:
        env = make_env("tiny_signaling", shuffle=False)  # open-ended constructor: arguments pass through
        assert env.objects == ["apple", "boat"] and env.shuffle is False
    finally:
        del ENVS["tiny_signaling"]
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        register_env("", SignalingEnv)


@pytest.mark.parametrize("name,kwargs", SETTINGS)
def test_parallel_api_test_passes_without_warnings(name, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PettingZoo reports most API slips as warnings
        parallel_api_test(make_env(name, **kwargs), num_cycles=100)
        parallel_seed_test(lambda: make_env(name, **kwargs), num_cycles=100)


@pytest.mark.skipif(Version(pettingzoo.__version__) >= Version("1.25"),
                    reason="the AEC api_test of pettingzoo >= 1.25 reads obs.dtype (NumPy observations only)")
@pytest.mark.parametrize("name,kwargs", SETTINGS)
def test_aec_api_test_passes_through_parallel_to_aec(name, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # The AEC test's recommendations for numeric envs, which text envs do not follow by design
        # (Text spaces of per-role lengths, roles as agent names); its checks still raise.
        for advice in ("Observation is not a NumPy array", "Observation space for each agent probably",
                       "Action space for each agent probably", "We recommend agents to be named",
                       "Agents have different observation space sizes"):
            warnings.filterwarnings("ignore", message=advice)
        api_test(parallel_to_aec(make_env(name, **kwargs)), num_cycles=50)


def _random_action(rng: random.Random, space):
    pick = rng.random()
    if pick < 0.4:
        return space.sample()
    if pick < 0.6:
        return "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(0, 200)))  # unicode, long
    if pick < 0.7:
        return rng.choice([None, 3, b"egg", ["egg"]])  # not a string
    return rng.choice(["apple", "Boat!", "the kite.", "42", "-7", "= 12.", "apple boat", "", "\n\t"])


@pytest.mark.parametrize("name,kwargs", SETTINGS)
def test_observations_stay_in_their_spaces_and_bad_actions_never_crash(name, kwargs):
    env = make_env(name, **kwargs)
    rng = random.Random(0)
    for episode in range(300):
        obs, infos = env.reset(seed=episode)
        invalid = dict.fromkeys(env.agents, 0)
        steps = 0
        while env.agents:
            for a in env.agents:
                assert env.observation_space(a).contains(obs[a]), (a, obs[a])
                assert infos[a]["turn"] == (a in env.turn_agents)
                assert infos[a]["step"] == steps
            assert len(env.turn_agents) == 1
            actions = {a: _random_action(rng, env.action_space(a)) for a in env.agents}
            actor = env.turn_agents[0]
            obs, rewards, terms, truncs, infos = env.step(actions)
            steps += 1
            invalid[actor] += infos[actor]["invalid"]
            for a in infos:
                assert infos[a]["invalid_actions"] == invalid[a]
                if a != actor:
                    assert infos[a]["invalid"] is False  # only the acting agent's action is read
                assert rewards[a] in (0.0, 1.0)
                if infos[a]["invalid"]:
                    assert rewards[a] == 0.0
            if not env.agents:
                assert all(terms.values()) and not any(truncs.values())
                success = {infos[a]["success"] for a in infos}
                assert len(success) == 1 and set(rewards.values()) == {float(success.pop())}


@pytest.mark.parametrize("name", NAMES)
def test_seeds_reproduce_episodes_and_state_dict_resumes_the_stream(name):
    def play(env, n, seed=None):
        out = []
        for i in range(n):
            obs, _ = env.reset(seed=seed if i == 0 else None)
            trace = [dict(obs)]
            while env.agents:
                obs, rew, _, _, info = env.step({a: "1 apple" for a in env.turn_agents})
                trace.append((dict(obs), rew, info))
            out.append(trace)
        return out

    a = play(make_env(name), 30, seed=7)
    assert play(make_env(name), 30, seed=7) == a
    assert play(make_env(name), 30, seed=8) != a
    env = make_env(name)
    play(env, 12, seed=7)
    state = env.state_dict()
    rest = play(env, 18)
    assert rest == a[12:]
    fresh = make_env(name)
    fresh.load_state_dict(state)
    assert fresh.episodes == 12
    assert play(fresh, 18) == rest


@pytest.mark.parametrize("name", NAMES)
def test_step_misuse_is_one_clear_error(name):
    env = make_env(name)
    with pytest.raises(RuntimeError, match="episode is over; call reset"):
        env.step({})
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"unknown agent 'nobody'; agents: "):
        env.step({"nobody": "x"})
    while env.agents:
        env.step({})  # a missing action is an invalid one, not a crash
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step({})


@pytest.mark.parametrize("name,kwargs,message", [
    ("signaling", {"n_objects": 1}, r"^signaling: n_objects must be an integer in \[2, 26\], got 1$"),
    ("signaling", {"n_objects": 2.0}, r"^signaling: n_objects must be an integer in \[2, 26\], got 2.0$"),
    ("signaling", {"objects": ["cat", "cat"]}, r"^signaling: objects must be at least 2 distinct names"),
    ("signaling", {"objects": ["Cat", "dog"]}, r"^signaling: object name 'Cat' is not allowed; names are one"),
    ("signaling", {"objects": "cat,dog"}, r"^signaling: objects must be a list of names"),
    ("signaling", {"message_chars": 0}, r"^signaling: message_chars must be an integer >= 1, got 0$"),
    ("signaling", {"render_mode": "human"}, r"^SignalingEnv: render_mode must be None or 'ansi'"),
    ("split_arith", {"turns": -1}, r"^split_arith: turns must be an integer >= 0, got -1$"),
    ("split_arith", {"ops": ["/"]}, r"^split_arith: ops must be a non-empty list of distinct operators from \+, -, \*"),
    ("split_arith", {"ops": []}, r"^split_arith: ops must be a non-empty list"),
    ("split_arith", {"min_operand": 5, "max_operand": 4},
     r"^split_arith: max_operand must be an integer in \[5, 1000000000\], got 4$"),
])
def test_bad_arguments_are_one_line(name, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        make_env(name, **kwargs)
    assert "\n" not in str(err.value)


def test_render_ansi_shows_whose_turn_it_is():
    env = make_env("signaling", render_mode="ansi", shuffle=False, n_objects=3)
    env.reset(seed=0, options={"target": "boat"})
    assert env.render() == "[speaker]\nObject: boat"
    env.step({"speaker": "b"})
    assert env.render() == "[listener]\nMessage: b\nCandidates: apple, boat, candle"
    env.step({"listener": "boat"})
    assert env.render() == "(episode over)"
    assert make_env("signaling").render() is None
