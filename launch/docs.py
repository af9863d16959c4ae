"""Generated parts of the documentation (`make docs` = `python -m launch docs --write`).

Each generated part sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers in a markdown
file and is rewritten from its source; tests/test_docs.py fails when one is stale:

    README.md                   recipes           the recipes in recipes/ (name, processes, layout, description)
    docs/config-reference.md    config-reference  every recipe key of trainer/schema.py
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def layout(recipe) -> str:
    """One cell saying how a recipe splits its processes: degrees, ZeRO stage, sync strategy."""
    p = recipe.parallel
    s = recipe.sync
    servers = s.servers if s.strategy == "parameter_server" else 0
    dp = (recipe.world_size() - servers) // (p.tp * p.pp)
    degrees = " x ".join([f"tp{p.tp}"] * (p.tp > 1) + [f"pp{p.pp}"] * (p.pp > 1) + [f"dp{dp}"] * (dp > 1))
    zero = f"ZeRO-{p.zero_stage}" + (" + CPU offload" if p.offload_params or p.offload_optimizer else "")
    parts = [degrees] * bool(degrees) + [zero]
    if s.strategy == "parameter_server":
        mode = "synchronous" if s.staleness == 0 else f"asynchronous, staleness <= {s.staleness}"
        parts.append(f"parameter server on {servers} more rank{'s' * (servers > 1)}, {mode}")
    elif s.strategy != "allreduce":
        what = s.strategy + (f" ({s.across} across)" if s.strategy == "hybrid" else "")
        parts.append(f"{s.replicas or dp} replicas, {what}" + (f" + {s.compress}" if s.compress != "none" else ""))
    return ", ".join(parts)


def recipes_table() -> str:
    """Markdown table of recipes/ (the README's recipe table is this text)."""
    from trainer.recipe import available_recipes, load_recipe

    lines = ["| recipe | model | processes | layout | description |", "|---|---|---:|---|---|"]
    for name in available_recipes():
        r = load_recipe(name)
        desc = r.run.description.replace("|", "\\|")
        model, where = r.model.style, layout(r)
        if r.agents:  # a multi-agent recipe: its agents start from runs (or recipes) of their own
            from agents.config import agent_settings

            agents = agent_settings(r)  # an agent sharing another's policy as that policy's settings
            starts = sorted({(a.init_from or "model.*").removeprefix("recipe:") for a in agents.values()})
            model = "from " + ", ".join(f"`{x}`" for x in starts)
            kinds = sorted({a.algorithm + (" + LoRA" if a.adapter == "lora" else "") for a in agents.values()})
            if r.env.name == "debate_arith":  # agents/debate/ fine-tunes by SFT, never by the agents' RL algorithm
                kinds = ["SFT on majority answers"]
            shared = sum(a.policy_of is not None for a in agents.values())
            policies = len(agents) - shared
            where += (f", {len(agents)} agents ({', '.join(kinds)}"
                      + (f"; {policies} polic{'y' if policies == 1 else 'ies'}" if shared else "") + f") in `{r.env.name}`")
        lines.append(f"| `{name}` | {model} | {r.world_size()} | {where} | {desc} |")
    return "\n".join(lines) + "\n"


def _config_reference() -> str:
    from launch.cli import config_reference

    return config_reference()


GENERATED: dict[str, dict[str, Callable[[], str]]] = {
    "README.md": {"recipes": recipes_table},
    "docs/config-reference.md": {"config-reference": _config_reference},
}


def _section(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)


def render(text: str, name: str, body: str) -> str:
    pattern = _section(name)
    if not pattern.search(text):
        raise ValueError(f"no <!-- {name}:start --> ... <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text, count=1)


def stale(root: Path = REPO) -> list[str]:
    """`file: section` for every generated section that differs from its source."""
    out = []
    for rel, sections in GENERATED.items():
        text = (root / rel).read_text()
        for name, make in sections.items():
            if render(text, name, make()) != text:
                out.append(f"{rel}: {name}")
    return out


def write(root: Path = REPO) -> list[str]:
    """Regenerate every section in place; returns the files that changed."""
    changed = []
    for rel, sections in GENERATED.items():
        path = root / rel
        text = old = path.read_text()
        for name, make in sections.items():
            text = render(text, name, make())
        if text != old:
            path.write_text(text)
            changed.append(rel)
    return changed
