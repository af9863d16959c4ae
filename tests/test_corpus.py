"""Corpora of random play (agents.corpus): the text a multi-agent recipe's base is pretrained on."""

from __future__ import annotations

import json

import numpy as np

from agents.corpus import episode_text, write_corpus
from agents.envs import make_env
from agents.policy import AgentPolicy


class _Chars:
    """A character-level tokenizer: enough for AgentPolicy's prompt formatting."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def get_vocab_size(self):
        return 128


def test_each_turn_is_the_policy_prompt_then_the_action_and_a_line_break():
    env = make_env("signaling", n_objects=4)
    text = episode_text(env, np.random.default_rng(0))
    speaker, listener = AgentPolicy("speaker", _Chars()), AgentPolicy("listener", _Chars())
    first = speaker.prompt_text(f"Object: {env.target}")
    assert text.startswith(first + " ")
    message = text[len(first) + 1:].split("\n", 1)[0]
    assert message in env.objects
    second = listener.prompt_text(f"Message: {message}\nCandidates: {', '.join(env.candidates)}")
    assert second in text and text.endswith(f"{env.choice}\n") and env.choice in env.candidates


def test_random_play_wins_at_chance_and_the_speaker_often_names_the_target():
    env = make_env("signaling", n_objects=10)
    rng = np.random.default_rng(1)
    wins = named = 0
    n = 4000
    for _ in range(n):
        text = episode_text(env, rng)
        named += text.split("speaker: ", 1)[1].split("\n", 1)[0] == env.target
        wins += env.choice == env.target
    assert abs(wins / n - 0.1) < 0.02  # the listener answers at random: success 1/n
    assert abs(named / n - 0.55) < 0.03  # half the time the target, else uniform (1/10 of it the target)


def test_the_corpus_file_is_written_once_and_keyed_by_its_inputs(tmp_path):
    a = write_corpus("split_arith", {"turns": 1}, episodes=20, seed=3, folder=tmp_path)
    mtime = a.stat().st_mtime_ns
    assert write_corpus("split_arith", {"turns": 1}, episodes=20, seed=3, folder=tmp_path) == a
    assert a.stat().st_mtime_ns == mtime
    b = write_corpus("split_arith", {"turns": 1}, episodes=20, seed=4, folder=tmp_path)
    assert b != a
    docs = [json.loads(line)["text"] for line in a.read_text().splitlines()]
    assert len(docs) == 20 and all("Answer:\nsecond: " in d for d in docs)


def test_traffic_episodes_are_written_whole_with_the_corpus_player():
    env = make_env("traffic", net="2x2grid", num_seconds=200, delta_time=10)  # 20 decisions per light
    text = episode_text(env, np.random.default_rng(0))
    turns = text.count("\nNext phase (0-3)?\n")
    assert turns == 20 * 4  # every decision of every light, past the old 64-step cap's share
    answers = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("tl_") and ": " in line]
    assert len(answers) == turns and set(answers) <= {"0", "1", "2", "3"}
    assert episode_text(env, np.random.default_rng(0), max_steps=5).count("Next phase") == 5 * 4
    env.close()  # the cut episode holds libsumo (one simulation per process) until closed


def test_an_env_without_a_corpus_player_plays_its_random_action():
    class Env:
        possible_agents = agents = ["a"]
        turn_agents = ["a"]

        def reset(self, seed=None):
            self.t = 0
            return {"a": "obs"}, {}

        def random_action(self, agent, rng):
            return "r"

        def step(self, actions):
            self.t += 1
            done = self.t >= 100  # longer than the old 64-step cap
            return {"a": "obs"}, {"a": 0.0}, {"a": done}, {"a": False}, {}

    text = episode_text(Env(), np.random.default_rng(0), template="{observation}:")
    assert text == "obs: r\n" * 100
