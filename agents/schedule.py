"""Which agents update at a step: every trainable one (`train.schedule: simultaneous`), or the agents
of the current phase (`alternating`).

    train:
      schedule: alternating
      phase_steps: 50
      phase_order: [generator, verifier, refiner]    # or "a+b" for a phase that updates two agents

Phases follow `phase_order` (default: each trainable agent owning its policy alone, in the order of
`agents`) for `phase_steps` steps each, over and over; step s (0-based) is in phase
(s // phase_steps) % len(order). A phase is a function of the step alone, so a run resumed inside a
phase continues it. The agents outside the phase still act in every rollout; they are frozen, which
in `agents.learners.update` means: a full-weight agent's engine does not step at all; LoRA adapters
that share an engine with the phase's adapters have their weights and optimizer state put back
after the step, bit for bit (the engine's one learning-rate clock moves on for all of them).
An agent sharing a policy (`policy_of`) updates with its owner.
"""

from __future__ import annotations

from trainer.schema import Recipe


def phases(recipe: Recipe) -> list[set[str]]:
    """The phases of an alternating schedule: sets of owning agents' names."""
    order = recipe.train.phase_order or [n for n, a in recipe.agents.items() if a.trainable and not a.policy_of]
    return [set(phase.split("+")) for phase in order]


def active_agents(recipe: Recipe, step: int) -> set[str] | None:
    """The policy owners that update at 0-based step `step`; None: every trainable agent."""
    if recipe.train.schedule != "alternating":
        return None
    order = phases(recipe)
    return order[(step // recipe.train.phase_steps) % len(order)]


def phase_index(recipe: Recipe, step: int) -> int | None:
    if recipe.train.schedule != "alternating":
        return None
    return (step // recipe.train.phase_steps) % len(phases(recipe))
