"""README.md and docs/ stay true to the code: generated parts current, links resolve, every `make`
target, `python -m launch` command and recipe they name exists, and `make help` lists every target."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from launch import docs
from launch.cli import build_parser
from tests.trainutil import REPO
from trainer.recipe import available_recipes

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _text(page) -> str:
    return page.read_text()


def _makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m for m in re.findall(r"^([a-zA-Z0-9_-]+):", text, re.M)}


def _phony() -> set[str]:
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    return set(re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split())


def test_generated_parts_are_current():
    assert docs.stale() == [], "run `make docs`"


def test_readme_recipe_table_lists_every_recipe():
    readme = _text(REPO / "README.md")
    table = readme[readme.index("<!-- recipes:start -->"):readme.index("<!-- recipes:end -->")]
    assert re.findall(r"^\| `([\w.-]+)` \|", table, re.M) == available_recipes()


def test_readme_is_short():
    assert len(_text(REPO / "README.md").splitlines()) <= 150


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", _text(page)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target} (no such file)"
        if anchor and dest.suffix == ".md":
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}
            assert anchor in slugs, f"{page.name}: link to {target} (no such heading)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_make_targets_commands_and_recipes_exist(page):
    text = _text(page)
    targets = _makefile_targets()
    for t in re.findall(r"`make ([a-z][\w-]*)", text) + re.findall(r"^make ([a-z][\w-]*)", text, re.M):
        assert t in targets, f"{page.name}: `make {t}` is not a Makefile target"
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for c in re.findall(r"python -m launch ([a-z]+)", text):
        assert c in commands, f"{page.name}: `python -m launch {c}` is not a command"
    recipes = set(available_recipes())
    for r in re.findall(r"RECIPE=([a-z][\w-]*)", text) + re.findall(r"-m launch (?:train|validate) ([a-z][\w-]*)", text):
        assert r in recipes, f"{page.name}: recipe {r} does not exist"


def test_make_help_is_the_default_and_lists_every_target():
    out = subprocess.run(["make", "-s"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"^  ([a-z][\w-]*) ", out.stdout, re.M))
    targets = _makefile_targets()
    assert listed == targets, (sorted(targets - listed), sorted(listed - targets))
    assert _phony() == targets, "the .PHONY line must name every target"


def _collected(*make_args: str, files: list[str]) -> set[str]:
    """Test ids pytest collects from `files` (through `make` when make_args are given; its
    targets already pass -q, and a second -q would print counts instead of ids)."""
    args = ["--collect-only", *files]
    if make_args:
        # -o: never (re)build .venv here; PY: this interpreter, whichever venv runs the suite
        cmd = ["make", "-s", "-o", ".venv/.installed", *make_args, f"PY={sys.executable}",
               "PYTEST_ARGS=" + " ".join(args)]
    else:
        cmd = [sys.executable, "-m", "pytest", "-q", *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return set(re.findall(r"^(tests/\S+::\S+)$", out.stdout, re.M))


def test_make_test_fast_leaves_out_exactly_the_multiprocess_and_slurm_tests():
    """Collected through the real target: what `make test-fast` drops from two files that mix
    single-process, `dist` and `slurm` tests is exactly the tests carrying those markers (read from
    the test functions themselves)."""
    files = ["tests/test_accelerate_launch.py", "tests/test_slurm.py"]
    every, fast = _collected(files=files), _collected("test-fast", files=files)
    marked = set()
    for test_id in every:
        path, name = test_id.split("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        marks = {m.name for m in getattr(getattr(module, name.split("[")[0]), "pytestmark", [])}
        if marks & {"dist", "slurm"}:
            marked.add(test_id)
    assert marked and fast  # both kinds are present, so the check means something
    assert any("accelerate" in t for t in marked) and any("test_slurm" in t for t in marked)
    assert fast == every - marked
