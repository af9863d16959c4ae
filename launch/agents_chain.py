"""Recipe chains (multi-agent runs, distillation), resolved by the launcher before any rank starts.

- `agents.<name>.init_from: recipe:<other>` — the run that recipe makes (`<run.output_dir>/<its
  run.name>`, in this recipe's output folder). When that run has not finished (no summary.json), the
  launcher trains it first, as `make train RECIPE=<other>` would, with this recipe's run.output_dir
  and data.cache_dir, then starts the agents from it. So `make train RECIPE=marl-signaling` pretrains
  its base on the first call and reuses it afterwards.
- `distill.teacher: recipe:<other>` — the same for a distillation teacher; `data.tokenizer` then
  defaults to the teacher run's tokenizer.json (student and teacher must share it).
- `data.path: env:<env name>` — a corpus of random play of the recipe's `env.*`
  (`agents.corpus.write_corpus`, `data.max_documents` episodes, default 20,000), written once into
  `data.cache_dir` and read like any JSON-lines file.

Ranks started by a launcher resolve the same names without training anything (the parent did).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trainer.errors import UsageError
from trainer.schema import ENV_DATA_PREFIX, Recipe

RECIPE_PREFIX = "recipe:"
DEFAULT_CORPUS_EPISODES = 20_000


def chained_run_dir(recipe: Recipe, other: str) -> Path:
    from trainer.recipe import load_recipe

    sub = load_recipe(other, [])
    return Path(recipe.run.output_dir) / sub.run.name


def resolve_chain(recipe: Recipe, train_missing: bool) -> Recipe:
    """`recipe` with every `recipe:` init_from and distill.teacher replaced by its run directory
    (trained first when `train_missing` and unfinished) and an `env:` data path replaced by its corpus file.
    The agents' settings are checked first: a bad env argument (e.g. debate_arith's agents=1) is one line
    before any base is trained, not after it."""
    if recipe.agents and train_missing:
        from agents.config import check_agents

        check_agents(recipe)
    recipe = resolve_corpus(recipe)
    agents = dict(recipe.agents)
    for name, a in agents.items():
        if (a.init_from or "").startswith(RECIPE_PREFIX):
            run_dir = _chained(recipe, a.init_from, f"agents.{name}.init_from", train_missing)
            agents[name] = a.model_copy(update={"init_from": str(run_dir)})
    recipe = recipe.model_copy(update={"agents": agents})
    return resolve_teacher(recipe, train_missing)


def resolve_teacher(recipe: Recipe, train_missing: bool) -> Recipe:
    teacher = recipe.distill.teacher
    if teacher is None:
        return recipe
    if teacher.startswith(RECIPE_PREFIX):
        teacher = str(_chained(recipe, teacher, "distill.teacher", train_missing))
    if not (Path(teacher) / "checkpoints").is_dir() or not (Path(teacher) / "tokenizer.json").is_file():
        raise UsageError(f"distill.teacher={teacher}: not a run directory of ours (checkpoints/, tokenizer.json); "
                         "give a run directory or recipe:<name>")
    update = {"distill": recipe.distill.model_copy(update={"teacher": teacher})}
    if recipe.data.tokenizer is None:
        update["data"] = recipe.data.model_copy(update={"tokenizer": str(Path(teacher) / "tokenizer.json")})
    return recipe.model_copy(update=update)


def _chained(recipe: Recipe, ref: str, key: str, train_missing: bool) -> Path:
    """The run directory `recipe:<other>` names, trained first when unfinished and `train_missing`."""
    other = ref[len(RECIPE_PREFIX):]
    run_dir = chained_run_dir(recipe, other)
    if not (run_dir / "summary.json").is_file():
        if not train_missing:
            raise UsageError(f"{key}={ref}: {run_dir} has not finished; train it first (make train RECIPE={other})")
        _train_first(recipe, other, key)
    return run_dir


def _train_first(recipe: Recipe, other: str, key: str) -> None:
    print(f"{key}=recipe:{other}: that run has not finished; training it first", flush=True)
    cmd = [sys.executable, "-m", "launch", "train", other, f"run.output_dir={recipe.run.output_dir}",
           f"data.cache_dir={recipe.data.cache_dir}", "train.resume=auto",
           f"train.progress={str(recipe.train.progress).lower()}", f"tracking.wandb={recipe.tracking.wandb}"]
    rc = subprocess.call(cmd)
    if rc != 0:
        raise UsageError(f"{key}=recipe:{other}: training {other} failed (exit {rc}); see its output above")


def resolve_corpus(recipe: Recipe) -> Recipe:
    path = recipe.data.path
    if not path.startswith(ENV_DATA_PREFIX):
        return recipe
    from agents.corpus import write_corpus  # torch (agents.policy): only for a corpus

    episodes = recipe.data.max_documents or DEFAULT_CORPUS_EPISODES
    try:  # an unknown env or argument is found when the env is made (a cached corpus had a good one)
        file = write_corpus(path[len(ENV_DATA_PREFIX):], dict(recipe.env.args), episodes, recipe.train.seed,
                            recipe.data.cache_dir)
    except (ValueError, TypeError) as e:
        raise UsageError(f"data.path={path}: {e}") from None
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"path": str(file), "max_documents": None})})
