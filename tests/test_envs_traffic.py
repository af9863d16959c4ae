"""agents.envs.traffic (sumo-rl over SUMO, text observations and actions) and its baselines: PettingZoo's
API checks, the text against sumo-rl's own numeric observation, invalid actions, determinism, libsumo
and a second simultaneous env, the fixed-time baseline, bad arguments. Short episodes (10-20 steps)."""

from __future__ import annotations

import re
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from agents.envs import make_env, traffic
from agents.envs.traffic import NETS, TrafficEnv, make_simulation, sumo_seed
from agents.envs.traffic_baselines import fixed_time, max_queue, parse_observation, play

SHORT = {"num_seconds": 100, "delta_time": 10}


def test_parallel_api_test_and_seed_test_pass():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = make_env("traffic", **SHORT)
        parallel_api_test(env, num_cycles=100)
        env.close()
        # two envs at once: the second runs on TraCI (and says so once)
        warnings.filterwarnings("ignore", message="traffic: libsumo runs one simulation per process")
        parallel_seed_test(lambda: make_env("traffic", num_seconds=50, delta_time=10), num_cycles=10)


def test_observation_text_matches_sumo_rl_numeric_observation():
    env = TrafficEnv(net="2x2grid", num_seconds=200, delta_time=5)
    assert env.possible_agents == ["tl_1", "tl_2", "tl_5", "tl_6"] and env.turn_agents == []
    obs, infos = env.reset(seed=1)
    assert env.turn_agents == env.possible_agents and all(i["turn"] for i in infos.values())
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(30):
        for a in env.agents:
            text, num = obs[a], env.numeric[a]
            assert len(text) <= env.observation_space(a).max_length and len(text) < 200
            assert text.endswith(f"Next phase (0-{env._phases[a] - 1})?")
            o = parse_observation(text)
            ts = env.sim.traffic_signals[env.ts_ids[a]]
            n_phases, lanes = ts.num_green_phases, ts.lanes
            assert len(num) == n_phases + 1 + 2 * len(lanes) == n_phases + 1 + 2 * len(o["lanes"])
            assert num[:n_phases].tolist() == [1.0 if i == o["phase"] else 0.0 for i in range(n_phases)]
            assert num[n_phases] == (1.0 if o["can_switch"] else 0.0)
            conn = env.sim.sumo
            for i, (lane, (halted, vehicles)) in enumerate(zip(lanes, o["lanes"].values())):
                capacity = conn.lane.getLength(lane) / (2.5 + conn.lane.getLastStepLength(lane))
                assert num[n_phases + 1 + i] == pytest.approx(min(1.0, vehicles / capacity), abs=1e-6)
                assert num[n_phases + 1 + len(lanes) + i] == pytest.approx(min(1.0, halted / capacity), abs=1e-6)
                checked += vehicles > 0
            # the green lanes of each phase, from the light's controlled links
            links = conn.trafficlight.getControlledLinks(env.ts_ids[a])
            names = list(o["lanes"])
            for p, green in zip(ts.green_phases, o["green"]):
                expected = {lk[0][0] for s, lk in enumerate(links) if lk and p.state[s] in "Gg"}
                assert {lanes[names.index(n)] for n in green} == expected
        actions = {a: env.random_action(a, rng) for a in env.agents}
        obs, *_ = env.step(actions)
    assert checked > 20  # lanes with traffic were compared, not only empty ones
    env.close()


def test_invalid_actions_are_counted_and_keep_the_phase():
    env = TrafficEnv(**SHORT)
    obs, _ = env.reset(seed=0)
    assert parse_observation(obs["tl_t"])["phase"] == 0
    for _ in range(2):  # hold phase 0 past yellow + min green
        obs, *_ = env.step({"tl_t": "0"})
    expected = 0
    for i, action in enumerate(["go!", "2", "-1", 1, "", None, "phase 1 please"]):
        obs, rewards, terms, truncs, infos = env.step({"tl_t": action} if action is not None else {})
        bad = action != "phase 1 please"
        assert infos["tl_t"]["invalid"] is bad and infos["tl_t"]["invalid_actions"] == min(i + 1, 6)
        assert isinstance(rewards["tl_t"], float) and not terms["tl_t"] and not truncs["tl_t"]
        if not bad:
            expected = 1
        assert parse_observation(obs["tl_t"])["phase"] == expected
        assert env.sim.traffic_signals["t"].green_phase == expected
    while env.agents:
        obs, rewards, terms, truncs, infos = env.step({"tl_t": "1"})
    assert truncs["tl_t"] and not terms["tl_t"] and infos["tl_t"]["invalid_actions"] == 6
    assert {"mean_waiting_time", "teleports", "vehicles", "backlog"} <= set(infos["tl_t"])
    assert "success" not in infos["tl_t"]
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step({"tl_t": "0"})
    env.reset(seed=0)
    with pytest.raises(ValueError, match="unknown agent 'x'"):
        env.step({"x": "0"})
    env.close()


def _episode(env, seed, policy):
    obs, _ = env.reset(seed=seed)
    texts = [obs["tl_t"]]
    while env.agents:
        obs, rewards, _, _, infos = env.step({"tl_t": policy(obs["tl_t"])})
        texts.append(obs.get("tl_t", "") + f" r={rewards['tl_t']}")
    return texts, infos["tl_t"]


def test_same_seed_same_episode_and_state_dict_resumes():
    env = TrafficEnv(num_seconds=200, delta_time=10)
    a, fa = _episode(env, 7, max_queue)
    b, fb = _episode(TrafficEnv(num_seconds=200, delta_time=10), 7, max_queue)
    c, _ = _episode(env, 8, max_queue)
    assert a == b and fa == fb and a != c
    assert fa["sumo_seed"] == sumo_seed(7) and fa["step"] == 20
    env.reset(seed=3)
    state = env.state_dict()
    first, _ = _episode(env, None, max_queue)
    env.load_state_dict(state)
    assert env.agents == [] and _episode(env, None, max_queue)[0] == first


def test_final_infos_and_fixed_time_baseline_share_the_demand():
    env = TrafficEnv(num_seconds=300, delta_time=10)
    heuristic = play(env, lambda o: max_queue(o, "vehicles"), seed=2)
    fixed = fixed_time(seed=2, num_seconds=300, delta_time=10)
    for r in (heuristic, fixed):
        assert r["vehicles"] == r["departed"] + r["backlog"] > 100  # ~0.7 vehicles/s are due
        assert 0 < r["network_waiting_time"] and 0 < r["mean_waiting_time"] < 300
        assert r["teleports"] == 0 and r["sumo_seed"] == sumo_seed(2)
    assert heuristic["steps"] == 30 and heuristic["invalid_actions"] == 0
    assert heuristic["vehicles"] == fixed["vehicles"]  # the demand does not depend on the lights
    assert heuristic["mean_waiting_time"] < fixed["mean_waiting_time"]


def test_waiting_time_is_sumos_own_tripinfo_waiting_time(tmp_path):
    trips = tmp_path / "trips.xml"
    sim = make_simulation("single-intersection", 300, 10, 2, 5, "diff-waiting-time", 300, fixed_ts=True,
                          sumo_args=f"--tripinfo-output {trips} --tripinfo-output.write-unfinished")
    sim.reset(seed=4)
    while not sim.step(None)[2]["__all__"]:
        pass
    m = sim.episode_metrics()
    sim.close()
    rows = ET.parse(trips).getroot().findall("tripinfo")
    assert len(rows) == m["departed"] > 100
    waiting = sum(float(r.get("waitingTime")) for r in rows) / len(rows)
    # SUMO counts speed <= 0.1 m/s as waiting, the halting count speed < 0.1 m/s
    assert m["network_waiting_time"] == pytest.approx(waiting, rel=1e-3)
    assert m["mean_waiting_time"] >= m["network_waiting_time"]


def test_a_second_simultaneous_env_falls_back_to_traci_with_the_same_episode():
    first, second = TrafficEnv(num_seconds=60, delta_time=10), TrafficEnv(num_seconds=60, delta_time=10)
    o1, _ = first.reset(seed=5)
    if traffic._libsumo is False:
        pytest.skip("libsumo is not installed")
    assert first.backend == "libsumo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o2, _ = second.reset(seed=5)
    assert second.backend == "traci" and o1 == o2
    # one warning per process (an earlier test may have had it)
    assert any("one simulation per process" in str(w.message) for w in caught) or "busy" in traffic._warned
    while first.agents:
        o1, r1, *_, i1 = first.step({"tl_t": max_queue(o1["tl_t"])})
        o2, r2, *_, i2 = second.step({"tl_t": max_queue(o2["tl_t"])})
        assert o1 == o2 and r1 == r2
    assert i1 == i2 and first.backend is None and second.backend is None  # closed at the episode's end
    third = TrafficEnv(num_seconds=60, delta_time=10)
    third.reset(seed=5)
    assert third.backend == "libsumo"  # freed by the first env's end
    third.close()
    assert third.backend is None


def test_bad_arguments_name_the_allowed_values():
    with pytest.raises(ValueError, match=re.escape(f"unknown net 'manhattan'; nets: {', '.join(NETS)}")):
        TrafficEnv(net="manhattan")
    with pytest.raises(ValueError, match="unknown reward_fn 'speed'; reward_fns: diff-waiting-time, "
                                         "average-speed, queue, pressure"):
        make_env("traffic", reward_fn="speed")
    with pytest.raises(ValueError, match=r"yellow_time must be an integer in \[1, 4\], got 5"):
        TrafficEnv(delta_time=5, yellow_time=5)
    with pytest.raises(ValueError, match="num_seconds must be an integer >= 10"):
        TrafficEnv(num_seconds=5)
    with pytest.raises(ValueError, match="delta_time must be an integer >= 1"):
        fixed_time(delta_time=0)
    with pytest.raises(ValueError, match="has no argument 'seconds'; allowed: net, num_seconds, delta_time"):
        make_env("traffic", seconds=10)
    with pytest.raises(ValueError, match="render_mode"):
        TrafficEnv(render_mode="human")


def test_random_action_is_a_valid_phase_and_render():
    env = TrafficEnv(net="2x2grid", render_mode="ansi", **SHORT)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    drawn = {env.random_action("tl_1", rng) for _ in range(50)}
    assert drawn == {str(i) for i in range(env._phases["tl_1"])}
    assert env.render().startswith("[tl_1]\nPhase 0 for 0s, must hold.\nHalted/vehicles: ")
    env.close()
    assert env.render() == "(episode over)"


def test_baseline_metrics_is_fixed_time_on_the_episode_reset_seed_starts():
    env = TrafficEnv(**SHORT)
    base = env.baseline_metrics(3)
    fixed = fixed_time(seed=3, **SHORT)
    assert {k: v for k, v in base.items() if k != "wall_s"} == {k: v for k, v in fixed.items() if k != "wall_s"}
    assert base["sumo_seed"] == sumo_seed(3)
    played = play(env, max_queue, seed=3)
    assert played["vehicles"] == base["vehicles"]  # the same demand as the agents' episode of that seed


def test_corpus_action_is_max_queue_about_half_of_the_time_and_random_action_stays_uniform():
    env = TrafficEnv(net="2x2grid", num_seconds=300, delta_time=10)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    same = total = 0
    while env.agents:
        for a in env.agents:
            o = parse_observation(obs[a])
            scores = [sum(o["lanes"][n][0] for n in names) for names in o["green"]]
            if scores.count(max(scores)) == 1 and max(scores) > 0:  # a clear max-queue phase
                total += 1
                same += env.corpus_action(a, rng) == max_queue(obs[a])
        obs, *_ = env.step({a: max_queue(obs[a]) for a in env.agents})
    assert total > 30
    assert abs(same / total - (0.5 + 0.5 / 4)) < 0.15  # half max-queue, else uniform over 4 phases
    draws = [env.random_action("tl_1", rng) for _ in range(2000)]
    assert all(abs(draws.count(str(p)) / 2000 - 0.25) < 0.04 for p in range(4))
