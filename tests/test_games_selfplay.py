"""Game self-play end to end (`python -m launch train game-...` at reduced size): the run's policy.json,
summary and NashConv curve; resume after SIGKILL bit for bit (the average policy checkpointed); the
last iterate cycling in rock-paper-scissors while the average converges; bad configs in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.trainutil import env, metrics

SMALL = ["model.n_layer=1", "model.n_head=2", "model.n_kv_head=2", "model.d_model=32", "train.progress=false",
         "tracking.wandb=disabled"]


def run_train(root, name, *overrides, recipe, timeout=300, **env_extra):
    cmd = [sys.executable, "-m", "launch", "train", recipe, f"run.name={name}", f"run.output_dir={root}/runs",
           f"data.cache_dir={root}/cache", *SMALL, *overrides]
    return subprocess.run(cmd, cwd=root, env=env(**env_extra), capture_output=True, text=True,
                          timeout=timeout)


KUHN = ["train.max_steps=40", "train.eval_every=20", "train.checkpoint_every=20", "train.log_every=1",
        "rl.episodes_per_step=32", "agents.player_0.lr=1e-3"]


def _timeless(root, name):
    return [{k: v for k, v in r.items() if k not in ("step_time_s", "train_s")} for r in metrics(root, name)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("games")


@pytest.fixture(scope="module")
def kuhn(root):
    out = run_train(root, "kuhn", *KUHN, recipe="game-kuhn")
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "runs" / "kuhn"


def test_kuhn_run_writes_policy_json_whose_nash_conv_is_the_summarys(kuhn):
    import pyspiel
    from open_spiel.python.algorithms import exploitability

    from agents.games.tables import load_policy_json

    summary = json.loads((kuhn / "summary.json").read_text())
    game = pyspiel.load_game("kuhn_poker")
    table = load_policy_json(kuhn / "policy.json", game)  # every one of the 12 states, a distribution each
    assert exploitability.nash_conv(game, table) == pytest.approx(summary["nash_conv"], abs=1e-12)
    assert summary["nash_conv_uniform"] == pytest.approx(11 / 12, abs=1e-12)
    assert summary["nash_conv"] < 11 / 12 and summary["steps"] == 40
    rows = [r for r in metrics(kuhn.parent.parent, "kuhn") if "nash_conv" in r]
    assert [r["step"] for r in rows] == [0, 20, 40]
    assert rows[-1]["nash_conv"] == pytest.approx(summary["nash_conv"], abs=1e-12)
    steps = [r for r in metrics(kuhn.parent.parent, "kuhn") if "agent/player_0/loss" in r]
    assert len(steps) == 40 and all(r["agent/player_0/return"] == -r["agent/player_1/return"] for r in steps)
    assert (kuhn / "games.png").stat().st_size > 0


def _kill_resume_and_compare(root, name: str, whole: str, overrides, recipe: str, kill_after: int) -> None:
    """Run `name` killed (SIGKILL) after step `kill_after`, resume it: its metrics (times aside) and
    policy.json equal the uninterrupted run `whole`'s bit for bit."""
    killed = run_train(root, name, *overrides, recipe=recipe, RECIPES_FAULT_KILL_AFTER_STEP=str(kill_after))
    assert killed.returncode != 0
    resumed = run_train(root, name, *overrides, "train.resume=auto", recipe=recipe)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _timeless(root, name) == _timeless(root, whole)
    assert (root / "runs" / name / "policy.json").read_text() == (root / "runs" / whole / "policy.json").read_text()

def test_resume_after_sigkill_reproduces_the_run_and_its_average_bit_for_bit(root, kuhn):
    _kill_resume_and_compare(root, "kuhn-k", "kuhn", KUHN, "game-kuhn", kill_after=30)


def test_rps_last_iterate_cycles_while_the_average_converges(root):
    """Rock-paper-scissors, entropy weight 0: the policy itself (no averaging) keeps circling the
    equilibrium (1/3, 1/3, 1/3), far from it at every late evaluation with each action in turn the
    most played; the reach-weighted average of the same iterates stays near it. (game-kuhn's settings:
    one shared policy, Adam, the uniform average; game-rps-biased has since moved to SGD, two networks
    and the linear average.)"""
    out = run_train(root, "rps", "env.args.game=matrix_rps", "agents.player_0.alpha=0", "agents.player_1.alpha=0",
                    "agents.player_0.lr=3e-4", "optim.schedule=constant", "train.max_steps=300",
                    "train.eval_every=10", "train.checkpoint_every=1000", "rl.episodes_per_step=32",
                    recipe="game-kuhn")
    assert out.returncode == 0, out.stderr[-3000:]
    late = [r for r in metrics(root, "rps") if "nash_conv" in r and r["step"] >= 100]
    last = [r["nash_conv_last"] for r in late]
    average = [r["nash_conv"] for r in late]
    assert min(last) > 0.3  # never near the equilibrium (a pure pair is 2)
    leaders = [max(("Rock", "Paper", "Scissors"), key=lambda a: r[f"last/player_0/{a}"]) for r in late]
    assert set(leaders) == {"Rock", "Paper", "Scissors"}  # it cycles through all three
    assert sum(average) < 0.25 * sum(last)
    summary = json.loads((root / "runs" / "rps" / "summary.json").read_text())
    assert summary["nash_conv"] < 0.15 and summary["max_abs_from_equilibrium"] < 0.05


@pytest.mark.parametrize("overrides, message", [
    (["env.args.game=chess_960"], "unknown game 'chess_960'"),
    (["env.args.params={players: 3}"], "has 3 players; NashConv"),
    (["launch.procs_per_node=2", "rl.episodes_per_step=32"], "one process"),
    (["agents.player_0.algorithm=ppo"], "trains by reinforce"),
])
def test_bad_game_settings_stop_with_one_line(root, overrides, message):
    out = run_train(root, "bad", *overrides, recipe="game-kuhn")
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in out.stderr


RPS_BIASED = ["train.max_steps=30", "train.eval_every=10", "train.checkpoint_every=20", "train.log_every=1"]


def test_sgd_two_networks_linear_average_resume_after_sigkill_bit_for_bit(root):
    """game-rps-biased's settings (optim.optimizer sgd, one network per seat, rl.average_weighting
    linear): killed after step 25, resumed from step 20, the metrics and policy.json are the
    uninterrupted run's bit for bit (SGD's engines and the linear average's count checkpointed)."""
    whole = run_train(root, "brps", *RPS_BIASED, recipe="game-rps-biased")
    assert whole.returncode == 0, whole.stderr[-3000:]
    summary = json.loads((root / "runs" / "brps" / "summary.json").read_text())
    assert summary["average_weighting"] == "linear" and summary["steps"] == 30
    _kill_resume_and_compare(root, "brps-k", "brps", RPS_BIASED, "game-rps-biased", kill_after=25)


@pytest.mark.parametrize("overrides, message", [
    (["rl.average_weighting=cubic"], "'rl.average_weighting': Input should be 'uniform' or 'linear'"),
    (["rl.best_response=oracle"], "'rl.best_response': Input should be 'rl', 'exact' or 'psro'"),
    (["optim.optimizer=lion"], "'optim.optimizer': Input should be 'adamw' or 'sgd'"),
])
def test_bad_averaging_and_best_response_keys_stop_with_one_line(root, overrides, message):
    out = run_train(root, "bad-keys", *overrides, recipe="game-kuhn")
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in out.stderr


XFP = ["rl.best_response=exact", "rl.average_every=3", "rl.distill_states=4", "train.max_steps=12",
       "train.eval_every=6", "train.checkpoint_every=4", "train.log_every=1", "agents.player_0.lr=3e-3",
       "optim.schedule=constant"]


def test_exact_best_response_run_resumes_after_sigkill_bit_for_bit(root):
    """rl.best_response=exact (XFP with the LLM as the average policy) on Kuhn: the NashConv measured is
    the LLM's own table (policy.json), the XFP iteration advances every rl.average_every steps; killed
    after step 6 it resumes from the checkpoint of step 4, inside the second iteration (the average of
    the best responses, hence the target, and the state-sampling generator restored), and reproduces the uninterrupted run bit for bit."""
    import pyspiel
    from open_spiel.python.algorithms import exploitability

    from agents.games.tables import load_policy_json

    whole = run_train(root, "xfp", *XFP, recipe="game-kuhn")
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = root / "runs" / "xfp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_response"] == "exact" and summary["xfp_iterations"] == 4
    game = pyspiel.load_game("kuhn_poker")
    assert exploitability.nash_conv(game, load_policy_json(run / "policy.json", game)) == pytest.approx(
        summary["nash_conv"], abs=1e-12)
    steps = [r for r in metrics(root, "xfp") if "agent/player_0/kl" in r]
    assert [r["xfp_iteration"] for r in steps] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    _kill_resume_and_compare(root, "xfp-k", "xfp", XFP, "game-kuhn", kill_after=6)


PSRO = [o.replace("=exact", "=psro") for o in XFP]


def test_psro_run_counts_its_population_and_resumes_after_sigkill_bit_for_bit(root):
    """rl.best_response=psro on Kuhn: a member joins the population every rl.average_every steps (the
    LLM's first table, then one best response per iteration), the NashConv measured is the LLM's own
    table, and killed after step 6 the run resumes from step 4's checkpoint (the population restored,
    the meta-game re-solved to the same target) and reproduces the uninterrupted run bit for bit."""
    import pyspiel
    from open_spiel.python.algorithms import exploitability

    from agents.games.tables import load_policy_json

    whole = run_train(root, "psro", *PSRO, recipe="game-kuhn")
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = root / "runs" / "psro"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_response"] == "psro" and summary["psro_iterations"] == 4
    assert summary["psro_population"] == 5 and 0 <= summary["nash_conv_target"] < summary["nash_conv_uniform"]
    game = pyspiel.load_game("kuhn_poker")
    assert exploitability.nash_conv(game, load_policy_json(run / "policy.json", game)) == pytest.approx(
        summary["nash_conv"], abs=1e-12)
    steps = [r for r in metrics(root, "psro") if "agent/player_0/kl" in r]
    assert [r["psro_iteration"] for r in steps] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert [r["psro_population"] for r in steps] == [2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert all(1 <= r["psro_support"] <= 2 * r["psro_population"] for r in steps)
    _kill_resume_and_compare(root, "psro-k", "psro", PSRO, "game-kuhn", kill_after=6)


def test_leduc_runs_and_measures_its_936_states(root):
    out = run_train(root, "leduc", "train.max_steps=3", "train.eval_every=3", "rl.episodes_per_step=8",
                    recipe="game-leduc")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((root / "runs" / "leduc" / "summary.json").read_text())
    assert summary["information_states"] == 936
    assert summary["nash_conv_uniform"] == pytest.approx(4.747222222222222, abs=1e-9)
    assert 0 < summary["nash_conv"] < 14


def test_leduc_psro_recipe_runs_at_reduced_size(root):
    """game-leduc-psro for 40 steps (2 PSRO iterations of 20 distillation steps): a population of 3 (the
    GPT's first table and two best responses), the target's NashConv measured beside the GPT's, the run's
    policy.json the GPT's table."""
    import pyspiel
    from open_spiel.python.algorithms import exploitability

    from agents.games.tables import load_policy_json

    out = run_train(root, "leduc-psro", "train.max_steps=40", "train.eval_every=40", "rl.distill_states=16",
                    recipe="game-leduc-psro")
    assert out.returncode == 0, out.stderr[-3000:]
    run = root / "runs" / "leduc-psro"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_response"] == "psro" and summary["information_states"] == 936
    assert summary["psro_iterations"] == 2 and summary["psro_population"] == 3
    assert 0 <= summary["nash_conv_target"] < 14 and 0 < summary["nash_conv"] < 14
    game = pyspiel.load_game("leduc_poker")
    assert exploitability.nash_conv(game, load_policy_json(run / "policy.json", game)) == pytest.approx(
        summary["nash_conv"], abs=1e-9)
