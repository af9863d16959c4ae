"""Recipe chains resolved by the launcher (launch/agents_chain.py): `init_from: recipe:<name>` and
`data.path: env:<name>`."""

from __future__ import annotations

import json
import subprocess

import pytest

from launch import agents_chain
from trainer.errors import UsageError
from trainer.recipe import load_recipe


def _recipe(tmp_path, *extra):
    return load_recipe("marl-signaling", [f"run.output_dir={tmp_path}/runs", f"data.cache_dir={tmp_path}/cache",
                                          *extra])


def test_a_finished_chained_run_is_used_as_it_is(tmp_path, monkeypatch):
    base = tmp_path / "runs" / "marl-signaling-base"
    base.mkdir(parents=True)
    (base / "summary.json").write_text("{}")
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("nothing should be trained"))
    r = agents_chain.resolve_chain(_recipe(tmp_path), train_missing=True)
    assert {a.init_from for a in r.agents.values()} == {str(base)}


def test_an_unfinished_chained_run_is_trained_first_with_this_recipes_folders(tmp_path, monkeypatch):
    calls = []

    def fake_call(cmd, **kw):
        calls.append(cmd)
        run = tmp_path / "runs" / "marl-signaling-base"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({}))
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    r = agents_chain.resolve_chain(_recipe(tmp_path), train_missing=True)
    assert len(calls) == 1  # two agents share the base: trained once
    cmd = calls[0]
    assert cmd[cmd.index("train") + 1] == "marl-signaling-base"
    assert f"run.output_dir={tmp_path}/runs" in cmd and f"data.cache_dir={tmp_path}/cache" in cmd
    assert "train.resume=auto" in cmd  # an interrupted base continues
    assert all(a.init_from == str(tmp_path / "runs" / "marl-signaling-base") for a in r.agents.values())


def test_ranks_never_train_a_missing_base_and_a_failed_base_stops_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="has not finished; train it first"):
        agents_chain.resolve_chain(_recipe(tmp_path), train_missing=False)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: 3)
    with pytest.raises(UsageError, match="training marl-signaling-base failed \\(exit 3\\)"):
        agents_chain.resolve_chain(_recipe(tmp_path), train_missing=True)


def test_an_env_data_path_becomes_its_corpus_file(tmp_path):
    r = load_recipe("marl-signaling-base", [f"data.cache_dir={tmp_path}", "data.max_documents=50"])
    out = agents_chain.resolve_corpus(r)
    path = tmp_path / "env-corpus"
    assert out.data.path.startswith(str(path)) and out.data.max_documents is None
    assert len((path / out.data.path.split("/")[-1]).read_text().splitlines()) == 50
    with pytest.raises(UsageError, match="unknown env 'chess'"):
        agents_chain.resolve_corpus(load_recipe("marl-signaling-base", ["data.path=env:chess", "env.name=chess"]))
