"""Command line: `python -m launch <command> ...` (the Makefile targets call this).

    train RECIPE [key=value ...]     train a recipe (one process here; several via the deepspeed launcher)
    validate RECIPE [key=value ...]  resolve and validate a recipe, print it as YAML, write nothing
    export RUN_DIR OUT_DIR           write a run's latest checkpoint as a Hugging Face folder
                                     (--format onnx | onnx-int8: an ONNX Runtime folder instead)
    slurm RECIPE [key=value ...]     render launch/sbatch template for a recipe and submit it (sbatch)
    recipes                          list the recipes in recipes/
    docs [--write | --check]         print the config reference as a markdown table; --write regenerates
                                     the generated parts of README.md and docs/ (launch/docs.py), --check
                                     exits 1 naming the stale ones

Every usage error (bad recipe, bad key, bad data, unusable checkpoint) is one line on stderr
and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE = 2


def _fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def _usage_errors() -> tuple[type[BaseException], ...]:
    from trainer.checkpoint import CheckpointError
    from trainer.data import DataError
    from trainer.errors import UsageError
    from trainer.recipe import ConfigError

    return ConfigError, DataError, CheckpointError, UsageError


def cmd_validate(args) -> int:
    import yaml

    from agents.config import check_agents
    from trainer.recipe import check_layout, load_recipe, recipe_to_dict

    recipe = load_recipe(args.recipe, args.overrides)
    check_layout(recipe)
    check_agents(recipe)
    print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")
    return 0


def cmd_train(args) -> int:
    from trainer.recipe import check_layout, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.run.threads is not None:  # before any work, so a chained base recipe trains on them too
        import torch

        torch.set_num_threads(recipe.run.threads)
    # Started by a launcher (deepspeed, torchrun, `accelerate launch --multi_gpu`, Slurm's per-node
    # supervisor): the world size is the launcher's; launch.* only says how many processes to start here.
    launched = "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched:
        from launch.multiproc import adopt_launcher_env, check_accelerate_env

        check_accelerate_env(recipe)
        adopt_launcher_env()
    world = int(os.environ["WORLD_SIZE"]) if launched else recipe.world_size()
    check_layout(recipe, world)
    from agents.sync.checks import check_sync

    check_sync(recipe, world)  # bad sync settings stop here, before any process starts
    from launch.agents_chain import resolve_chain

    # `recipe:` starting points are trained first by the first process (ranks find them finished).
    recipe = resolve_chain(recipe, train_missing=not launched)
    if recipe.agents:
        from agents.config import check_agents

        check_agents(recipe, world)
    if world > 1 and not launched:
        from launch.multiproc import run_deepspeed

        return run_deepspeed(recipe, args.recipe, args.overrides)

    from agents.sync.strategies import build_synchronizer
    from launch.multiproc import register_exit_record, setup_rank_process
    from trainer.distributed import destroy, init_distributed
    from trainer.loop import TrainingStopped, train

    sync = build_synchronizer(recipe, world)

    exit_box = None
    if launched:
        setup_rank_process(recipe)
        exit_box = register_exit_record(recipe)
    dist = init_distributed(recipe.launch.backend, recipe.launch.timeout_s)
    code = 0
    try:
        if dist.rank >= dist.world_size - recipe.server_ranks():  # a parameter server: no training loop
            from agents.sync.ps_sync import run_server

            run_server(recipe, dist.world_size, dist.rank)
        elif recipe.agents:
            from agents.train import train_agents

            train_agents(recipe, dist)
        else:
            train(recipe, dist, sync=sync)
    except TrainingStopped as stop:
        if dist.is_main:
            print(f"stopped: {stop}", file=sys.stderr, flush=True)
        code = stop.exit_code
    except _usage_errors() as e:
        code = EXIT_USAGE
        if launched:  # the launcher repeats it when this rank is the one that refused
            from launch.multiproc import record_usage_error

            record_usage_error(recipe, str(e))
        raise
    finally:
        if exit_box is not None:
            exit_box["code"] = code if sys.exc_info()[0] is None or code == EXIT_USAGE else 1
        destroy()
    return code


def cmd_export(args) -> int:
    from launch.export import export_run

    out = export_run(args.run_dir, args.out_dir, args.checkpoint, args.format)
    print(f"exported {out['checkpoint']} to {out['out_dir']} ({out['params'] / 1e6:.2f}M parameters)"
          + (f": {out['note']}" if out["note"] else ""))
    return 0


def cmd_slurm(args) -> int:
    from launch.slurm import submit

    return submit(args)


def config_reference() -> str:
    """Markdown table of every recipe key (docs/config-reference.md holds this text)."""
    from trainer.schema import AgentSection, Recipe

    lines = ["| key | default | description |", "|---|---|---|"]
    for section, field in Recipe.model_fields.items():
        if section == "agents":  # a mapping: name -> AgentSection
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `agents` | `{{}}` | {desc} |")
            section, fields = "agents.<name>", AgentSection.model_fields
        else:
            fields = field.annotation.model_fields
        for key, f in fields.items():
            default = f.default if not callable(f.default_factory) else f.default_factory()
            desc = (f.description or "").replace("|", "\\|")
            lines.append(f"| `{section}.{key}` | `{default}` | {desc} |")
    return "\n".join(lines) + "\n"


def cmd_docs(args) -> int:
    from launch import docs

    if args.write:
        changed = docs.write()
        print("regenerated: " + (", ".join(changed) if changed else "nothing changed"))
        return 0
    if args.check:
        stale = docs.stale()
        for s in stale:
            print(f"stale: {s} (run `make docs`)", file=sys.stderr)
        return 1 if stale else 0
    print(config_reference(), end="")
    return 0


def cmd_recipes(args) -> int:
    from trainer.recipe import available_recipes, load_recipe

    for name in available_recipes():
        r = load_recipe(name)
        print(f"{name:28s} {r.world_size()} proc  {r.run.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (("train", cmd_train, "train a recipe"),
                               ("validate", cmd_validate, "resolve and validate a recipe")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("recipe", help="recipe name in recipes/ or a path to a .yaml file")
        s.add_argument("overrides", nargs="*", help="dotted.key=value overrides (YAML values)")
        s.set_defaults(fn=fn)
    s = sub.add_parser("export", help="export a run to a Hugging Face (or ONNX Runtime) folder")
    s.add_argument("run_dir")
    s.add_argument("out_dir")
    s.add_argument("--format", default="hf", help="hf (default), onnx, or onnx-int8 (the ONNX model and an "
                   "int8-weight copy)")
    s.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the run's latest)")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("slurm", help="render the sbatch script of a recipe and submit it")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--nodes", type=int, default=None)
    s.add_argument("--gpus-per-node", type=int, default=None)
    s.add_argument("--partition", default=None)
    s.add_argument("--time", default=None, help="hh:mm:ss")
    s.add_argument("--account", default=None)
    s.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    s.set_defaults(fn=cmd_slurm)
    s = sub.add_parser("docs", help="print the config reference (markdown), or regenerate the docs")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="regenerate the generated parts of README.md and docs/")
    mode.add_argument("--check", action="store_true", help="exit 1 when a generated part is stale")
    s.set_defaults(fn=cmd_docs)
    s = sub.add_parser("recipes", help="list recipes")
    s.set_defaults(fn=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except _usage_errors() as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
