"""Recipe composition, strict validation and the one-line error contract of the command line."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from trainer.recipe import (
    CONFIGS_DIR,
    RECIPES_DIR,
    REPO_ROOT,
    ConfigError,
    available_recipes,
    load_recipe,
    validate_fragment,
)
from trainer.schema import Recipe, Section


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_validates(name):
    r = load_recipe(name)
    assert r.run.name == name
    assert r.dp_degree() >= 1 and r.grad_accum_steps() >= 1


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS_DIR)))
def test_every_fragment_validates(path):
    validate_fragment(path)


def test_default_recipe_exists_and_composes():
    r = load_recipe("gpt-tiny")
    assert r.model.style == "gpt2" and r.data.path == "stdlib" and r.parallel.zero_stage == 0


def test_overrides_are_yaml_typed():
    r = load_recipe("gpt-tiny", ["train.max_steps=50", "optim.lr=3e-4", "model.style=llama",
                                 "tracking.tags=[a, b]", "model.init_from=null"])
    assert r.train.max_steps == 50 and isinstance(r.train.max_steps, int)
    assert r.optim.lr == pytest.approx(3e-4)
    assert r.model.style == "llama" and r.tracking.tags == ["a", "b"] and r.model.init_from is None


def test_an_override_of_one_aliased_agent_changes_that_agent_only():
    """Recipes write their agents as YAML aliases (`agent_1: *debater`), which load as one shared mapping."""
    r = load_recipe("debate-arith", ["agents.agent_1.temperature=0.3", "agents.agent_2.lr=1e-5"])
    assert [r.agents[a].temperature for a in ("agent_0", "agent_1", "agent_2")] == [0.7, 0.3, 0.7]
    assert [r.agents[a].lr for a in ("agent_0", "agent_1", "agent_2")] == [3e-4, 3e-4, 1e-5]


def test_recipe_by_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("defaults: [model/gpt-tiny, data/stdlib]\ntrain:\n  max_steps: 7\n")
    r = load_recipe(str(p))
    assert r.run.name == "mine" and r.train.max_steps == 7 and r.model.n_layer == 4  # from model/gpt-tiny


@pytest.mark.parametrize("overrides, fragment", [
    (["train.max_stepz=5"], "unknown key 'train.max_stepz'"),
    (["nosuch.key=1"], "unknown key 'nosuch'"),
    (["train.max_steps=ten"], "'train.max_steps'"),
    (["train.max_steps=0"], "'train.max_steps'"),
    (["optim.lr=-1"], "'optim.lr'"),
    (["model.style=gpt5"], "'model.style'"),
    (["model.n_head=5"], "divisible by model.n_head=5"),
    (["data.seq_len=4096"], "exceeds model.max_seq_len"),
    (["parallel.zero_stage=2", "parallel.pp=2"], "cannot be combined"),
    (["parallel.zero_stage=3", "parallel.tp=2", "parallel.pp=2", "launch.procs_per_node=4"],
     "ZeRO 2 and 3 need parallel.pp=1"),
    (["parallel.tp=3"], "divisible by parallel.tp=3"),
    (["train.max_steps"], "must look like section.key=value"),
    (["train.max_steps.x=1"], "is a value, not a section"),
    (["parallel.offload_params=true"], "needs parallel.zero_stage=3"),
])
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_recipe("gpt-tiny", overrides)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_zero3_combines_with_tensor_parallelism():
    r = load_recipe("gpt-tiny-tp2-dp2-zero3", ["parallel.offload_params=true", "parallel.offload_optimizer=true"])
    assert (r.parallel.zero_stage, r.parallel.tp, r.parallel.pp, r.dp_degree()) == (3, 2, 1, 2)


def test_strict_types_do_not_coerce():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_recipe("gpt-tiny", ["train.max_steps='10'"])
    with pytest.raises(ConfigError, match="parallel.activation_checkpointing"):
        load_recipe("gpt-tiny", ["parallel.activation_checkpointing=1"])


def test_unknown_recipe_lists_available():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*gpt-tiny"):
        load_recipe("nope")


def test_bad_fragment_and_bad_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("defaults: [model/does-not-exist]\n")
    with pytest.raises(ConfigError, match="unknown fragment 'model/does-not-exist'"):
        load_recipe(str(p))
    p.write_text("train:\n  max_steps: [1\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(str(p))
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(str(p))


def test_layout_checks_need_world_size():
    r = load_recipe("gpt-tiny", ["parallel.tp=2", "launch.procs_per_node=3"])
    with pytest.raises(ValueError, match="world size 3.*parallel.tp=2"):
        r.dp_degree()
    r = load_recipe("gpt-tiny", ["parallel.global_batch=20", "parallel.micro_batch=8"])
    with pytest.raises(ValueError, match="global_batch=20"):
        r.grad_accum_steps()
    assert load_recipe("gpt-tiny", ["parallel.micro_batch=16", "parallel.global_batch=32"]).grad_accum_steps() == 2


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)


@pytest.mark.parametrize("args, fragment", [
    (["train", "gpt-tiny", "train.max_stepz=5"], "unknown key 'train.max_stepz'"),
    (["train", "no-such-recipe"], "unknown recipe"),
    (["train", "gpt-tiny", "model.n_head=7"], "divisible"),
    (["train", "gpt-tiny", "launch.procs_per_node=3", "parallel.tp=2"], "parallel.tp=2"),
    (["validate", "gpt-tiny", "optim.lr=abc"], "'optim.lr'"),
])
def test_cli_usage_errors_are_one_line_exit_2_and_write_nothing(tmp_path, args, fragment):
    out = _cli(*args, f"run.output_dir={tmp_path}/runs", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == [], "a rejected config must not write anything"


def test_cli_validate_prints_resolved_config(tmp_path):
    out = _cli("validate", "gpt-tiny", "train.max_steps=9", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "max_steps: 9" in out.stdout and "zero_stage: 0" in out.stdout


# ---- the code may only read keys the schema declares ------------------------------------------

def _declared() -> dict[str, set[str]]:
    return {name: set(field.annotation.model_fields) for name, field in Recipe.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, Section)}


def _config_reads(tree) -> list[tuple[str, str, int]]:
    """Attribute chains `<x>.<section>.<key>` where <x> is a recipe variable."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id in {"recipe", "cfg", "r"}):
            found.append((node.value.attr, node.attr, node.lineno))
    return found


def test_code_reads_only_declared_config_keys():
    declared = _declared()
    problems, count = [], 0
    for folder in ("trainer", "launch", "model", "agents", "bench"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for section, key, line in _config_reads(ast.parse(path.read_text())):
                if section not in declared or key.startswith("model_"):
                    continue  # recipe.world_size(), recipe.model.model_copy(): methods, not keys
                count += 1
                if key not in declared[section]:
                    problems.append(f"{path.relative_to(REPO_ROOT)}:{line}: {section}.{key}")
    assert count > 30, "the scan found too few config reads; has the variable naming changed?"
    assert not problems, "code reads undeclared config keys: " + ", ".join(problems)


def test_scan_catches_an_undeclared_key():
    tree = ast.parse("x = recipe.train.not_a_key\ny = recipe.train.max_steps\n")
    reads = _config_reads(tree)
    assert ("train", "not_a_key", 1) in reads and ("train", "max_steps", 2) in reads
    assert "not_a_key" not in _declared()["train"]


def test_recipes_command_lists_every_file_of_recipes_dir():
    """`python -m launch recipes` prints one line per file in recipes/ (so nothing there is
    ignored, e.g. a .yml), with the description the file itself gives."""
    import yaml

    out = _cli("recipes", cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0]: line for line in out.stdout.splitlines()}
    files = sorted(RECIPES_DIR.iterdir())
    assert sorted(listed) == sorted(p.stem for p in files) and "gpt-tiny" in listed
    for p in files:
        description = yaml.safe_load(p.read_text())["run"]["description"]
        assert listed[p.stem].endswith(f"proc  {description}"), (p.name, listed[p.stem])


def test_config_reference_doc_is_current():
    from launch.cli import config_reference

    doc = (REPO_ROOT / "docs" / "config-reference.md").read_text()
    start = doc.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = doc.index("<!-- config-reference:end -->")
    assert doc[start:end] == config_reference(), "docs/config-reference.md is stale: run `make docs`"
