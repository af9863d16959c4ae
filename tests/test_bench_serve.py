"""`make bench-serve ARGS="--parts router"` (bench/bench_serve.py): the pairing of the policies' runs and the
figures drawn from them (per-pair p99 TTFT ratios, their median, pooled p99, hit rates, balance), on made-up
results and on a reduced real run (a tiny model trained here, 2 routers of 3 replicas each)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from tests.trainutil import REPO, env, train_once

sys.path.insert(0, str(REPO / "bench"))
import bench_serve as bs  # noqa: E402


def fake_run(ttfts: list[float], replicas: list[int], agents: list[int], hits: int, gap: float = 0.1) -> dict:
    """One policy's run: requests sent `gap` s apart, each 0.05 s long, TTFT in seconds."""
    res = [{"ttft": t, "e2e": 0.05, "tokens": 4, "tpot": 0.01, "gaps": [0.01], "replica": r,
            "start": i * gap, "end": i * gap + 0.05} for i, (t, r) in enumerate(zip(ttfts, replicas))]
    bs.annotate(res, [{"agent": a} for a in agents])
    return {"wall": len(res) * gap, "results": res, "lookups": len(res), "hits": hits, "spills": 0}


def test_pairs_alternate_the_order():
    assert bs.pair_orders(4, ["cache_aware", "round_robin"]) == [
        ["cache_aware", "round_robin"], ["round_robin", "cache_aware"]] * 2
    assert bs.pair_orders(3, ["cache_aware", "round_robin", "least_loaded"]) == [
        ["cache_aware", "round_robin", "least_loaded"], ["round_robin", "least_loaded", "cache_aware"],
        ["least_loaded", "cache_aware", "round_robin"]]


def test_trace_pairs_get_their_own_agents():
    """Pair k's trace: seed k and agents k*agents.. (prefixes new to every replica); pair 0 is the load part's."""
    assert bs.trace_requests(20, 6) == bs.trace_requests(20, 6, seed=0, first_agent=0)
    later = bs.trace_requests(20, 6, seed=3, first_agent=18)
    assert {r["agent"] for r in later} <= set(range(18, 24))
    first = {bs.agent_prefix(a) for a in range(6)}
    assert not any(r["prompt"].startswith(p) for r in later for p in first)


def test_agents_with_tools_have_longer_prefixes_of_their_own():
    """--agent-tools k: each agent's prefix is its usual one plus k tool definitions of its own (the
    long-prefix trace); 0 is the usual trace."""
    assert bs.agent_prefix(4, 0) == bs.agent_prefix(4)
    long = [bs.agent_prefix(a, 16) for a in range(6)]
    assert all(x.startswith(bs.agent_prefix(a)) and len(x) > 5 * len(bs.agent_prefix(a)) for a, x in enumerate(long))
    assert len(set(long)) == 6 and len({x[len(bs.agent_prefix(a)):] for a, x in enumerate(long)}) == 6
    reqs = bs.trace_requests(12, 6, seed=1, first_agent=6, tools=16)
    assert all(r["prompt"].startswith(bs.agent_prefix(r["agent"], 16)) for r in reqs)
    assert [r["agent"] for r in reqs] == [r["agent"] for r in bs.trace_requests(12, 6, seed=1, first_agent=6)]


def test_replica_cache_counters_are_summed_over_replicas():
    text = "\n".join([
        "# TYPE serve_prefix_cache_hits_total counter",
        'serve_prefix_cache_lookups_total{replica="0",module="model"} 10',
        'serve_prefix_cache_lookups_total{replica="1",module="model"} 5',
        'serve_prefix_cache_hits_total{replica="0",module="model"} 7',
        'serve_prefix_cache_hits_total{replica="1",module="model"} 1',
        'serve_prefix_cache_prompt_tokens_total{replica="0",module="model"} 1000.0',
        'serve_prefix_cache_hit_tokens_total{replica="2",module="model"} 640',
        "router_prefix_hits_total 99"])
    assert bs.cache_counts(text) == {"lookups": 15, "hits": 8, "prompt_tokens": 1000, "hit_tokens": 640}


def test_annotate_queue_and_cold():
    res = [{"ttft": 0.01, "e2e": 1.0, "replica": 0, "start": 0.0, "end": 1.0},  # agent 0 cold on replica 0
           {"ttft": 0.01, "e2e": 1.0, "replica": 0, "start": 0.5, "end": 1.5},  # agent 0 again, after its prefill
           {"ttft": 0.01, "e2e": 1.0, "replica": 1, "start": 0.6, "end": 1.6},  # agent 0 on replica 1: cold
           {"ttft": 0.01, "e2e": 1.0, "replica": 0, "start": 0.7, "end": 1.7}]  # agent 1: cold, two in flight
    bs.annotate(res, [{"agent": a} for a in (0, 0, 0, 1)])
    assert [r["cold"] for r in res] == [True, False, True, True]
    assert [r["queue"] for r in res] == [0, 1, 0, 2]


def test_annotate_counts_a_warm_up_as_history():
    """--router-warmup: requests sent before the measured trace make its agents warm on their replicas (and
    are not themselves counted)."""
    warm = [{"ttft": 0.01, "e2e": 0.1, "replica": 0, "start": -2.0, "end": -1.9}]  # agent 0 on replica 0
    bs.annotate(warm, [{"agent": 0}])
    res = [{"ttft": 0.01, "e2e": 1.0, "replica": 0, "start": 0.0, "end": 1.0},  # warm: the warm-up served it
           {"ttft": 0.01, "e2e": 1.0, "replica": 1, "start": 0.1, "end": 1.1}]  # cold: not on replica 1
    bs.annotate(res, [{"agent": 0}, {"agent": 0}], history=warm)
    assert [r["cold"] for r in res] == [False, True] and [r["queue"] for r in res] == [0, 0]
    bs.annotate(res, [{"agent": 0}, {"agent": 0}])
    assert [r["cold"] for r in res] == [True, True]


def test_router_summary_medians_pairs_and_pools_requests():
    """Pair ratios are each pair's p99 over round-robin's; the headline is their median; pooled figures are
    over every request of every pair."""
    n = 100
    reps, agents = [i % 3 for i in range(n)], [i % 6 for i in range(n)]
    pairs = []
    for k, (ca_slow, rr_slow) in enumerate([(0.2, 1.0), (0.9, 1.0), (0.3, 0.4)]):
        ca = [0.01] * (n - 2) + [ca_slow] * 2  # the p99 of 100 requests: between the two largest -> the slow one
        rr = [0.02] * (n - 2) + [rr_slow] * 2
        pairs.append({"order": bs.pair_orders(3, list(bs.ROUTER_POLICIES.split(",")))[k], "seed": k,
                      "load_average": 1.0, "runs": {"cache_aware": fake_run(ca, reps, agents, hits=80),
                                                    "round_robin": fake_run(rr, reps, agents, hits=30)}})
    s = bs.router_summary(pairs, ["cache_aware", "round_robin"], rate=10.0)
    per_pair = s["p99_ttft_vs_round_robin_per_pair"]
    assert per_pair == pytest.approx([0.2, 0.9, 0.75])
    assert s["p99_ttft_vs_round_robin"] == pytest.approx(0.75)  # the median, not the mean (0.617) nor pooled
    ca, rr = s["policies"]["cache_aware"], s["policies"]["round_robin"]
    assert ca["num_prompts"] == rr["num_prompts"] == 3 * n
    raw = [x["ttft"] * 1000 for p in pairs for x in p["runs"]["cache_aware"]["results"]]
    assert ca["p99_ttft_ms"] == pytest.approx(bs.percentile(raw, 99))
    assert s["p99_ttft_vs_round_robin_pooled"] == pytest.approx(ca["p99_ttft_ms"] / rr["p99_ttft_ms"])
    assert s["hit_rate_vs_round_robin"] == pytest.approx(80 / 30)
    assert s["vs_round_robin"]["cache_aware"]["hit_rate_per_pair"] == pytest.approx([80 / 30] * 3)
    assert ca["routed_per_replica"] == [102, 99, 99] and s["in_flight_ratio"] == pytest.approx(102 / 99)
    assert len(s["requests"]["round_robin"]["pair"]) == 3 * n and s["requests"]["round_robin"]["pair"][-1] == 2
    b = ca["ttft_breakdown"]
    assert b["cold"]["requests"] == 3 * 6  # each pair: each of 6 agents' first request on its one replica
    assert b["tail"]["requests"] >= 3 and b["warm"]["requests"] == 3 * n - 18
    assert ca["replica_cache_hit_rate"] is None and ca["spills_to_holder"] == 0  # runs without those counters
    md = bs.router_markdown({"command": "python bench/bench_serve.py --parts router", "run": "runs/x", "machine": "cpu",
                             "agents": 6, "rate": 10.0, "cache_slack": None, "requests_per_trace": n, "num_pairs": 3,
                             "load_averages_at_start": [1, 1, 1], "load_averages_at_end": [1, 1, 1], **s}, "x.json")
    assert "median of the 3 pairs' ratios **0.75x** (goal <= 0.5x: missed)" in md
    assert "per pair 0.20, 0.90, 0.75" in md and "| 2 | round_robin cache_aware |" in md


def test_router_summary_pools_the_replicas_cache_counters_and_spills_to_holders():
    n = 30
    reps, agents = [i % 3 for i in range(n)], [i % 6 for i in range(n)]
    pairs = []
    for k, (ca_hits, rr_hits) in enumerate([(27, 9), (24, 15)]):
        ca, rr = fake_run([0.01] * n, reps, agents, hits=20), fake_run([0.02] * n, reps, agents, hits=10)
        ca.update(spills=3, spills_to_holder=2, cache_lookups=n, cache_hits=ca_hits, cache_prompt_tokens=100 * n,
                  cache_hit_tokens=80 * ca_hits)
        rr.update(cache_lookups=n, cache_hits=rr_hits, cache_prompt_tokens=100 * n, cache_hit_tokens=80 * rr_hits)
        pairs.append({"order": ["cache_aware", "round_robin"], "seed": k, "load_average": 1.0,
                      "runs": {"cache_aware": ca, "round_robin": rr}})
    s = bs.router_summary(pairs, ["cache_aware", "round_robin"], rate=10.0)
    ca, rr = s["policies"]["cache_aware"], s["policies"]["round_robin"]
    assert (ca["spills"], ca["spills_to_holder"], rr["spills_to_holder"]) == (6, 4, 0)
    assert ca["replica_cache"]["hits"] == 51 and ca["replica_cache_hit_rate"] == pytest.approx(51 / 60)
    assert rr["replica_cache_hit_rate"] == pytest.approx(24 / 60)
    assert s["pairs"][1]["round_robin"]["replica_cache_hit_rate"] == pytest.approx(15 / 30)
    vs = s["vs_round_robin"]["cache_aware"]
    assert vs["replica_cache_hit_rate_pooled"] == pytest.approx(51 / 24)
    assert vs["replica_cache_token_hit_rate_pooled"] == pytest.approx(51 / 24)
    md = bs.router_markdown({"command": "c", "run": "runs/x", "machine": "cpu", "agents": 6, "rate": 10.0,
                             "cache_slack": None, "requests_per_trace": n, "num_pairs": 2,
                             "load_averages_at_start": [1, 1, 1], "load_averages_at_end": [1, 1, 1],
                             "regime": {"prefix_tokens_mean": 110.0, "prefix_blocks_all_agents": 36,
                                        "cache_blocks_per_replica": 256, "prefixes_vs_one_cache": 36 / 256}, **s}, "x.json")
    assert "prompts with a hit **2.12x** (0.85 against 0.40)" in md
    assert "| cache_aware | 40 / 60 | 0.67 | 6 (4) | 0.85 | 0.68 |" in md
    assert "fill 36 whole 16-token blocks: 0.14x one replica's prefix cache (256 blocks" in md


@pytest.mark.dist
def test_router_part_reduced_run(tmp_path):
    """2 pairs of 12 requests, both routers up: the JSON's pairs alternate, its ratios are the pairs' own
    figures', its pooled p99 is over both pairs' requests; the markdown section names the command."""
    train_once(tmp_path, "tiny", "train.max_steps=4", "model.max_seq_len=512")
    out = tmp_path / "serve.md"
    cmd = [sys.executable, "bench/bench_serve.py", "--run", str(tmp_path / "runs" / "tiny"), "--parts", "router",
           "--pairs", "2", "--router-requests", "12", "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.with_suffix(".json").read_text())["router"]
    assert [p["order"] for p in r["pairs"]] == [["cache_aware", "round_robin"], ["round_robin", "cache_aware"]]
    ratios = [p["cache_aware"]["p99_ttft_ms"] / p["round_robin"]["p99_ttft_ms"] for p in r["pairs"]]
    assert r["p99_ttft_vs_round_robin_per_pair"] == pytest.approx(ratios)
    assert r["p99_ttft_vs_round_robin"] == pytest.approx(statistics.median(ratios))
    for pol in ("cache_aware", "round_robin"):
        pooled = r["policies"][pol]
        assert pooled["num_prompts"] == 24 and pooled["prefix_lookups"] == 24
        assert sum(pooled["routed_per_replica"]) == 24
        assert pooled["p99_ttft_ms"] == pytest.approx(bs.percentile(r["requests"][pol]["ttft_ms"], 99), abs=0.01)
        assert pooled["prefix_hits"] == sum(p[pol]["prefix_hits"] for p in r["pairs"])
        assert pooled["replica_cache"]["lookups"] == 24  # the replicas' own counters: every prompt looked up
        assert pooled["replica_cache"]["hits"] <= 24
    assert r["policies"]["cache_aware"]["replica_cache"]["hits"] > 0  # an agent's later requests on its replica
    # Pair 2's agents are new: under both policies the first request of each is a cold miss there too.
    for pol in ("cache_aware", "round_robin"):
        rq = r["requests"][pol]
        assert {a for a in rq["agent"][12:]} <= set(range(6, 12))
        firsts = {a: 12 + rq["agent"][12:].index(a) for a in set(rq["agent"][12:])}
        assert all(rq["cold"][i] for i in firsts.values()), (pol, firsts, rq["cold"])
    assert r["p99_ttft_vs_round_robin_pooled"] == pytest.approx(
        r["policies"]["cache_aware"]["p99_ttft_ms"] / r["policies"]["round_robin"]["p99_ttft_ms"])
    text = out.read_text()
    assert "<!-- bench-serve: router -->" in text and f"Command: `python bench/bench_serve.py {' '.join(cmd[2:])}`" in text
    assert "median of the 2 pairs' ratios" in text
    assert r["regime"]["cache_blocks_per_replica"] == 16 * 512 // 16 and r["agent_tools"] == 0


def test_json_puts_lists_of_numbers_on_one_line():
    d = {"ttft_ms": [1, 2.5, -3e-05, None, True], "pairs": [{"order": ["a, b", "c"], "x": [1, 2]}], "e": []}
    text = bs.dump_json(d)
    assert json.loads(text) == d
    assert '"ttft_ms": [1, 2.5, -3e-05, null, true]' in text and '"x": [1, 2]' in text
    assert '"a, b",\n' in text  # strings stay one per line


def test_text_part_times_the_choice_against_whole_decodings(tmp_path, monkeypatch):
    """`--parts text` on a small byte-level BPE saved as a run's tokenizer: one row per length, its ratio the
    two timings', the completion's text checked inside; the markdown names the command and the lengths."""
    from tests.trainutil import byte_bpe_tokenizer

    byte_bpe_tokenizer("def f(x):\n    return x  # caf\u00e9 \u20ac").save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setattr(bs, "TEXT_LENGTHS", (16, 64))
    r = bs.text_test(tmp_path, "python bench/bench_serve.py --parts text", repeats=1)
    assert [x["tokens"] for x in r["lengths"]] == [16, 64]
    for x in r["lengths"]:
        assert x["ratio"] == pytest.approx(x["whole_decoding_us_per_token"] / x["incremental_us_per_token"])
    text = bs.text_markdown(r, "serve.json")
    assert "Command: `python bench/bench_serve.py --parts text`" in text and "| 64 |" in text and "best of 1 passes" in text
