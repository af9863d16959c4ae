"""Load a recipe: compose YAML fragments, apply overrides, validate against the schema.

Resolution order (later wins):
  1. the fragments named in the recipe's `defaults:` list, in order (`configs/<group>/<name>.yaml`;
     a fragment may itself list `defaults:`),
  2. the recipe's own keys,
  3. command-line overrides `dotted.key=value` (values parsed as YAML).
Every failure is a `ConfigError` whose message names the file or dotted key and what is allowed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .schema import Recipe

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
RECIPES_DIR = REPO_ROOT / "recipes"


class ConfigError(ValueError):
    """A recipe, fragment or override is invalid. The message is one line for the user."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 needs a dot: `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe or fragment must be a mapping of sections, got {type(data).__name__}")
    return _unaliased(data)


def _unaliased(node: Any) -> Any:
    """`node` with every mapping and list its own copy. YAML aliases (`agent_1: *debater`) load as one shared
    object, which deepcopy keeps shared; without this an override of agents.agent_1.lr would set every agent's."""
    if isinstance(node, dict):
        return {k: _unaliased(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unaliased(v) for v in node]
    return node


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def available_fragments() -> list[str]:
    return sorted(str(p.relative_to(CONFIGS_DIR).with_suffix("")) for p in CONFIGS_DIR.rglob("*.yaml"))


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe is a name in recipes/ (with or without .yaml) or a path to a YAML file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = RECIPES_DIR / f"{p.name if p.suffix == '' else p.stem}.yaml"
    if p.parent == Path(".") and candidate.exists():
        return candidate
    raise ConfigError(f"unknown recipe {recipe!r}; available: {', '.join(available_recipes())} "
                      "(or a path to a .yaml file)")


def _compose(path: Path, stack: tuple[Path, ...] = ()) -> dict:
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"{path}: circular defaults ({chain})")
    data = _read_yaml(path)
    defaults = data.pop("defaults", [])
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: 'defaults' must be a list of fragment names like model/gpt-tiny")
    merged: dict = {}
    for name in defaults:
        frag = CONFIGS_DIR / f"{name}.yaml"
        if not frag.exists():
            raise ConfigError(f"{path}: unknown fragment {name!r} in defaults; available: "
                              f"{', '.join(available_fragments())}")
        merged = deep_merge(merged, _compose(frag, (*stack, path)))
    return deep_merge(merged, data)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
        raise ConfigError(f"override {item!r}: key {key!r} must be a dotted path like train.max_steps")
    try:
        value = parse_yaml_value(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the text; the schema decides whether a string is allowed
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: the first problem, with its dotted key and what is allowed."""
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    kind = e["type"]
    if kind == "extra_forbidden":
        section = e["loc"][:-1]
        allowed = _allowed_keys(section)
        msg = f"unknown key '{loc}'; allowed here: {', '.join(allowed)}"
    elif kind == "value_error":
        msg = str(e.get("ctx", {}).get("error", e["msg"]))
    else:
        msg = f"'{loc}': {e['msg']} (got {e.get('input')!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {msg}{more}"


def _allowed_keys(section: tuple) -> list[str]:
    from .schema import AgentSection

    model: type = Recipe
    for i, part in enumerate(section):
        if model is Recipe and str(part) == "agents" and len(section) > i + 1:
            model = AgentSection  # agents.<name>.<key>
            return sorted(model.model_fields) if len(section) == i + 2 else []
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def load_recipe(recipe: str, overrides: list[str] | None = None) -> Recipe:
    path = resolve_recipe_path(recipe)
    data = _compose(path)
    data.setdefault("run", {}).setdefault("name", path.stem)
    data = apply_overrides(data, overrides or [])
    source = f"{path}" + (" with overrides" if overrides else "")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def validate_fragment(path: Path) -> None:
    """A fragment on its own must only use declared sections and keys with valid values."""
    data = _compose(path)
    try:
        Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None


def recipe_to_dict(recipe: Recipe) -> dict:
    return recipe.model_dump(mode="json")


def check_layout(recipe: Recipe, world_size: int | None = None) -> None:
    """Checks that need the world size (degrees and batch divisibility) as a ConfigError."""
    if recipe.train_world(world_size) < 1:
        raise ConfigError(f"sync.servers={recipe.server_ranks()} must be below the number of processes "
                          f"{world_size or recipe.world_size()} (launch.nodes x launch.procs_per_node): at least "
                          "one rank must train")
    try:
        recipe.grad_accum_steps(recipe.train_world(world_size))
    except ValueError as e:
        raise ConfigError(str(e)) from None
