"""agents.envs.signaling: the Lewis referential game's rules, parsing, seeding and the blanked
message (against what a perfect and a blind listener can achieve)."""

from __future__ import annotations

import collections

import pytest

from agents.envs import make_env
from agents.envs.signaling import DEFAULT_OBJECTS


def play(env, message_fn, answer_fn, seed=None, options=None):
    obs, infos = env.reset(seed=seed, options=options)
    assert env.turn_agents == ["speaker"] and obs["listener"] == "Wait."
    obs, rew1, terms, _, infos = env.step({"speaker": message_fn(obs["speaker"]), "listener": "ignored"})
    assert rew1 == {"speaker": 0.0, "listener": 0.0} and not any(terms.values())
    assert env.turn_agents == ["listener"] and obs["speaker"] == "Wait."
    listener_obs = obs["listener"]
    obs, rew2, terms, _, infos = env.step({"listener": answer_fn(listener_obs), "speaker": "ignored"})
    assert all(terms.values()) and env.agents == []
    assert rew2["speaker"] == rew2["listener"]  # shared reward
    return listener_obs, rew2["listener"], infos


def say_object(obs):
    assert obs.startswith("Object: ")
    return obs[len("Object: "):]


def repeat_message(obs):
    return obs.split("\n")[0][len("Message: "):]


def test_observations_are_the_documented_text():
    env = make_env("signaling", n_objects=4, shuffle=False)
    obs, _ = env.reset(seed=0, options={"target": 2})
    assert obs == {"speaker": "Object: candle", "listener": "Wait."}
    obs, *_ = env.step({"speaker": "c\nandle\u00e9"})
    assert obs == {"speaker": "Wait.", "listener": "Message: c andle?\nCandidates: apple, boat, candle, drum"}


def test_a_perfect_pair_succeeds_on_every_object_and_every_seed():
    env = make_env("signaling")
    assert env.objects == list(DEFAULT_OBJECTS[:10])
    for seed in range(5):
        for target in env.objects:
            _, reward, infos = play(env, say_object, repeat_message, seed=seed, options={"target": target})
            assert reward == 1.0
            assert infos["listener"] == {"turn": False, "invalid": False, "invalid_actions": 0, "step": 2,
                                              "success": True, "target": target, "choice": target,
                                              "blank_message": False}


def test_a_wrong_choice_gets_zero_and_is_valid():
    env = make_env("signaling")
    _, reward, infos = play(env, lambda o: "apple", lambda o: "boat", seed=0, options={"target": "apple"})
    assert reward == 0.0
    assert infos["listener"]["invalid"] is False and infos["listener"]["choice"] == "boat"
    assert infos["speaker"]["success"] is False


@pytest.mark.parametrize("answer,choice", [
    ("kite", "kite"), ("KITE", "kite"), ("The kite.", "kite"), ("I pick: kite!", "kite"), ("kite kite", "kite"),
    ("kites", None), ("kite or egg", None), ("", None), ("3", None), ("\u00e9gg", None), ("egg\u00e9", "egg"),  # non-ASCII characters separate words
    ("apple", None),  # not a candidate of this game
])
def test_listener_answers_parse_to_one_candidate_or_are_invalid(answer, choice):
    env = make_env("signaling", objects=["kite", "egg", "drum"])
    _, reward, infos = play(env, lambda o: "kite", lambda o: answer, seed=0, options={"target": "kite"})
    assert infos["listener"]["choice"] == choice
    assert infos["listener"]["invalid"] is (choice is None)
    assert infos["listener"]["invalid_actions"] == int(choice is None)
    assert reward == float(choice == "kite")


@pytest.mark.parametrize("bad", [None, 7, b"kite", ["kite"]])
def test_actions_that_are_not_strings_are_invalid(bad):
    env = make_env("signaling", objects=["kite", "egg"])
    listener_obs, reward, infos = play(env, lambda o: bad, lambda o: bad, seed=0)
    assert listener_obs.startswith("Message: \n")
    assert reward == 0.0
    assert infos["speaker"]["invalid_actions"] == 1 and infos["listener"]["invalid_actions"] == 1


def test_long_messages_are_cut_to_message_chars():
    env = make_env("signaling", message_chars=5)
    listener_obs, reward, _ = play(env, lambda o: "boat boat boat", repeat_message, seed=0,
                                   options={"target": "boat"})
    assert listener_obs.startswith("Message: boat \n") and reward == 1.0


def test_targets_and_candidate_orders_are_drawn_uniformly_by_seed():
    env = make_env("signaling")
    targets, firsts = collections.Counter(), collections.Counter()
    env.reset(seed=123)
    for _ in range(5000):
        obs, _ = env.reset()
        targets[say_object(obs["speaker"])] += 1
        env.step({"speaker": "x"})
        firsts[env.candidates[0]] += 1
        assert sorted(env.candidates) == sorted(env.objects)
    # 5000 draws over 10 objects: 500 expected, sd about 21; 6 sd either side.
    for counts in (targets, firsts):
        assert set(counts) == set(env.objects)
        assert all(370 < n < 630 for n in counts.values()), counts
    unshuffled = make_env("signaling", shuffle=False)
    unshuffled.reset(seed=1)
    assert unshuffled.candidates == unshuffled.objects


def test_blanked_message_leaves_the_listener_at_chance():
    """With the message blanked, the listener's observation is the same whichever object is the target
    (same seed), so every listener succeeds on exactly one target in n: chance, 1/n."""
    for how in ("constructor", "reset option"):
        env = make_env("signaling", blank_message=how == "constructor")
        options = {} if how == "constructor" else {"blank_message": True}
        successes = 0
        for seed in range(50):
            seen = set()
            for target in env.objects:
                listener_obs, reward, infos = play(env, say_object, repeat_message, seed=seed,
                                                   options=options | {"target": target})
                assert listener_obs.startswith("Message: \nCandidates: ")
                assert infos["listener"]["blank_message"] is True
                seen.add(listener_obs)
                successes += reward
            assert len(seen) == 1  # nothing in it depends on the target
        # The perfect listener of the unblanked game answers "" here: invalid every time.
        assert successes == 0
        # The best blind listener (any fixed rule on what it sees) gets 1/n on average.
        first_candidate = 0
        env.reset(seed=9)
        for _ in range(2000):
            env.reset(options=options)
            env.step({"speaker": "x"})
            _, rew, *_ = env.step({"listener": env.candidates[0]})
            first_candidate += rew["listener"]
        assert abs(first_candidate / 2000 - 0.1) < 4 * (0.1 * 0.9 / 2000) ** 0.5
    # The option also switches a blanked env back on for one episode.
    env = make_env("signaling", blank_message=True)
    _, reward, _ = play(env, say_object, repeat_message, seed=0, options={"blank_message": False})
    assert reward == 1.0


def test_bad_target_option_is_one_line():
    env = make_env("signaling", n_objects=3)
    for bad in ("kite", 3, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"^signaling.reset: target must be one of apple, boat, candle or "
                                             r"an index in \[0, 2\], got "):
            env.reset(seed=0, options={"target": bad})
