"""The layers stay layered: model <- trainer <- launch. A lower layer never imports an upper one,
and importing the model imports neither the trainer nor DeepSpeed (DeepSpeed is loaded by a run
that builds an engine or a pipeline, inside the functions that need it)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.trainutil import REPO, env

UPPER = {"model": ("trainer", "launch", "agents", "serve", "bench"),
         "trainer": ("launch", "agents", "serve", "bench")}


def _imports(path) -> list[tuple[str, int]]:
    """Every module an import statement in `path` names, at any depth (functions included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
    return out


@pytest.mark.parametrize("layer", sorted(UPPER))
def test_lower_layers_do_not_import_upper_ones(layer):
    bad = [f"{p.relative_to(REPO)}:{line} imports {name}"
           for p in sorted((REPO / layer).rglob("*.py"))
           for name, line in _imports(p) if name.split(".")[0] in UPPER[layer]]
    assert not bad, bad


def test_the_scan_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from launch.export import x\n")
    assert _imports(f) == [("launch.export", 2)]


def test_importing_the_model_loads_neither_trainer_nor_deepspeed():
    modules = sorted("model." + ".".join(p.relative_to(REPO / "model").with_suffix("").parts)
                     for p in (REPO / "model").rglob("*.py") if p.name != "__init__.py")
    code = ("import sys, importlib\n"
            f"for m in ['model', *{modules!r}]: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'trainer', 'launch'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    assert len(modules) > 5
