"""bench/bench_debate.py: a finished seed's run is reused only when it was trained with that seed and the
bench's overrides (one had been copied in under another seed's name), and the table's means and goals
follow from the runs' summaries."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_debate", ROOT / "bench" / "bench_debate.py")
bd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bd)


def _finished(runs: Path, name: str, seed: int, debate: dict, rows: list[dict]) -> None:
    run = runs / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed}, "debate": debate}))
    (run / "summary.json").write_text(json.dumps({"per_iteration": rows}))


ROWS = [{"iteration": 0, "single": 0.70, "vote": 0.80, "debate": 0.82, "diversity": 0.30,
         "baseline/single": 0.70, "baseline/vote": 0.78},
        {"iteration": 1, "single": 0.75, "vote": 0.82, "debate": 0.85, "diversity": 0.27,
         "baseline/single": 0.78, "baseline/vote": 0.80}]


def test_a_run_trained_with_another_seed_or_override_is_refused(tmp_path):
    _finished(tmp_path, "debate-arith-30-s0", 1234, {"sft_epochs": 1}, ROWS)
    with pytest.raises(SystemExit, match="train.seed=1234, not 0"):
        bd.run_seed(0, tmp_path, [], "debate-arith-30")
    _finished(tmp_path, "debate-arith-30-s1", 1, {"sft_epochs": 1}, ROWS)
    with pytest.raises(SystemExit, match="debate.sft_epochs=1, not 3"):
        bd.run_seed(1, tmp_path, ["debate.sft_epochs=3"], "debate-arith-30")
    summary, took, _ = bd.run_seed(1, tmp_path, ["debate.sft_epochs=1"], "debate-arith-30")
    assert summary["per_iteration"] == ROWS and took is None  # read, not rerun


def test_table_and_goals_follow_from_the_summaries():
    other = [{**r, "debate": r["debate"] - 0.02, "diversity": r["diversity"] + 0.01} for r in ROWS]
    table, goals = bd.aggregate({1: {"per_iteration": ROWS}, 2: {"per_iteration": other}})
    assert table[1]["debate"]["mean"] == pytest.approx((0.85 + 0.83) / 2)
    assert (table[1]["debate"]["min"], table[1]["debate"]["max"]) == pytest.approx((0.83, 0.85))
    assert goals["debate_minus_single_before"] == pytest.approx(0.81 - 0.70)
    assert goals["debate_minus_baseline_after"] == pytest.approx(0.84 - 0.80)
    assert goals["diversity_ratio"] == pytest.approx(0.275 / 0.305)
    assert goals["debate_beats_single_by_5_before"] and goals["beats_baseline_by_2_after"]
    assert goals["diversity_kept_80"]  # 90% of its start
