r"""The learners of a multi-agent run: where each agent's policy starts, the models and DeepSpeed
engines that hold the agents' weights, and one policy-gradient update of an engine.

Two kinds of agent (`agents.<name>.adapter`):
    none  the agent's own full weights, its own engine (`trainer.replica`, component `agent_<name>`);
    lora  one peft LoRA adapter per agent (`agents.lora`) over a frozen base shared by every LoRA agent
          that starts from the same `init_from`: one model, one engine (component `lora_<i>`) whose
          optimizer has one parameter group per trainable agent (its adapter, its lr); the rollout
          generates all of them in one engine call, each row under its agent's adapter.
A frozen agent (`trainable: false`) keeps a plain module (or its adapter out of the optimizer).

The update of one engine sums the losses of its agents (each under its adapter): every agent's loss
touches only its own parameters, so one backward and one step equal one per agent, except that the
global gradient-norm clip (optim.grad_clip) then spans the engine's agents together.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
import yaml

from trainer import checkpoint as ckpt
from trainer.consolidate import consolidate_once
from trainer.dims import ParallelDims
from trainer.errors import UsageError
from trainer.model_setup import build_model
from trainer.replica import Replica, build_replica
from trainer.schema import AgentSection, ModelSection, Recipe
from trainer.step import Stepper

from .config import agent_settings, optimizer_passes
from .policy import AgentPolicy, token_logprobs
from .rl import objectives as obj

__all__ = ["Agent", "Base", "Learner", "build_learners", "resolve_base", "update"]


# ---- where policies start -------------------------------------------------------------------------


@dataclass
class Base:
    """A starting policy: the model settings, the tokenizer file, and the checkpoint its weights come
    from (None: initialise from the seed; `state` holds them once consolidated)."""

    model: ModelSection
    tokenizer_path: Path
    checkpoint: Path | None = None
    meta: dict | None = None
    state: dict | None = None


def resolve_base(init_from: str | None, recipe: Recipe, agent: str) -> Base:
    """What `agents.<agent>.init_from` names (see the module docstring); one line when unusable."""
    key = f"agents.{agent}.init_from"
    if init_from is None:
        if not recipe.data.tokenizer:
            raise UsageError(f"{key} is null (the recipe's model.* from its seed) and data.tokenizer is not set: "
                             "give the agent a run or Hugging Face folder, or data.tokenizer")
        return Base(recipe.model, Path(recipe.data.tokenizer))
    path = Path(init_from)
    if not path.is_dir():
        raise UsageError(f"{key}={init_from}: no such directory (a run directory of ours or a Hugging Face folder)")
    tok = path / "tokenizer.json"
    if not tok.is_file():
        raise UsageError(f"{key}={init_from} has no tokenizer.json")
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        folder = ckpt.latest_checkpoint(path / "checkpoints")
        if folder is None:
            raise UsageError(f"{key}={init_from}: the run has no finished checkpoint")
        meta = ckpt.verify(folder)
        names = meta.get("components", ["model"])
        if len(names) != 1:
            raise UsageError(f"{key}={init_from}: the run holds {len(names)} models ({', '.join(names)}); start "
                             "from a single-model run or its export")
        cfg = yaml.safe_load((path / "config.yaml").read_text())
        model = ModelSection(**{**cfg["model"], "vocab_size": meta["model_config"]["vocab_size"]})
        return Base(model, tok, checkpoint=folder, meta=meta)
    if (path / "config.json").is_file():
        return Base(recipe.model.model_copy(update={"init_from": str(path)}), tok)
    raise UsageError(f"{key}={init_from} is neither a run directory (config.yaml, checkpoints/) nor a Hugging "
                     "Face folder (config.json)")


def agent_recipe(recipe: Recipe, settings: AgentSection, base: Base) -> Recipe:
    """The recipe one agent's engine is built from: its model, its learning rate, one micro-batch
    per step (the loop does one backward and one step per update)."""
    return recipe.model_copy(update={
        "model": base.model,
        "optim": recipe.optim.model_copy(update={"lr": settings.lr}),
        "parallel": recipe.parallel.model_copy(update={"micro_batch": 1, "global_batch": None}),
    })




# ---- agents and their engines -----------------------------------------------------------------------


@dataclass
class Agent:
    name: str
    settings: AgentSection
    policy: AgentPolicy
    module: torch.nn.Module  # what generates (an engine's module, or a frozen one)
    learner: Learner | None = None  # None: frozen
    adapter: str | None = None
    ref: torch.nn.Module | None = None  # the initial policy (a copy; None with an adapter: the base)
    baseline: obj.MovingAverageBaseline | None = None
    policy_name: str = ""  # the agent whose policy this one uses (agents.<name>.policy_of); itself by default

    def __post_init__(self):
        self.policy_name = self.policy_name or self.name

    def value_head(self, module) -> torch.nn.Module | None:
        """The agent's value head in `module` (its engine's model), None unless it trains by PPO."""
        if self.settings.algorithm != "ppo" or not self.settings.trainable:
            return None
        from .value import value_head

        return value_head(module, self.policy_name)

    def reference_logprobs(self, ids, targets):
        """Log-probabilities of the initial policy (for the KL figure)."""
        if self.adapter is not None:
            from .lora import use_adapter

            with use_adapter(self.module, None):
                return token_logprobs(self.module, ids, targets, temperature=self.policy.logprob_temperature)
        return token_logprobs(self.ref, ids, targets, temperature=self.policy.logprob_temperature)


@dataclass
class Learner:
    """One engine and the trainable agents whose weights it holds."""

    replica: Replica
    stepper: Stepper
    agents: list[str] = field(default_factory=list)  # whose losses each update sums (with agents sharing a policy)
    lora: dict[str, dict] = field(default_factory=dict)  # adapter specs, for export
    groups: list[str] = field(default_factory=list)  # a LoRA engine's optimizer groups: one per trained adapter


def _tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _lora_spec(a: AgentSection) -> dict:
    return {"rank": a.lora_rank, "alpha": a.lora_alpha, "targets": list(a.lora_targets)}


def build_learners(recipe: Recipe, dims: ParallelDims, device: torch.device) -> tuple[dict[str, Agent], list[Learner]]:
    """Collective: every agent (in recipe order) and the engines of the trainable ones. An agent with
    `policy_of` acts with the other agent's module (and adapter, value head) and its loss joins that
    agent's update: one shared policy for several roles."""
    settings = agent_settings(recipe)
    bases: dict[str | None, Base] = {}
    tokenizers = {}  # one per base: agents sharing a base share its tokenizer
    for name, a in settings.items():
        if a.init_from not in bases:
            base = bases[a.init_from] = resolve_base(a.init_from, recipe, name)
            if base.checkpoint is not None:
                base.state = consolidate_once(base.checkpoint, base.meta, dims,
                                              base.meta.get("components", ["model"])[0])
            tokenizers[a.init_from] = _tokenizer(base.tokenizer_path)
    agents: dict[str, Agent] = {}
    learners: list[Learner] = []
    shared: dict[str | None, torch.nn.Module] = {}  # init_from -> the LoRA agents' model
    for name, a in settings.items():
        if a.policy_of is not None:
            continue
        base, state = bases[a.init_from], bases[a.init_from].state
        tok = tokenizers[a.init_from]
        vocab = tok.get_vocab_size()
        adapter = name if a.adapter == "lora" else None
        policy, baseline = _policy(name, a, tok, recipe, adapter), _baseline(a)
        sub = agent_recipe(recipe, a, base)
        if adapter is not None:
            if a.init_from not in shared:
                shared[a.init_from] = _build_lora(recipe, settings, a.init_from, sub, dims, device, vocab, state,
                                                  learners)
            module = shared[a.init_from]
            learner = next((lr for lr in learners if lr.replica.module is module and name in lr.agents), None)
            agents[name] = Agent(name, a, policy, module, learner, adapter, baseline=baseline)
        elif a.trainable:
            replica = build_replica(sub, dims, device, vocab, state_dict=state, name=f"agent_{name}",
                                    prepare=_with_value_heads([name] if a.algorithm == "ppo" else []))
            learner = Learner(replica, Stepper(replica.engine, dims, device), [name])
            learners.append(learner)
            ref = _frozen_copy(sub, vocab, state, recipe.train.seed, device) if recipe.rl.kl_ref else None
            agents[name] = Agent(name, a, policy, replica.module, learner, ref=ref, baseline=baseline)
        else:
            agents[name] = Agent(name, a, policy, _frozen_copy(sub, vocab, state, recipe.train.seed, device))
    for name, a in settings.items():
        if a.policy_of is None:
            continue
        owner = agents[a.policy_of]
        policy = _policy(name, a, owner.policy.tokenizer, recipe, owner.adapter)
        agents[name] = Agent(name, a, policy, owner.module, owner.learner, owner.adapter, owner.ref, _baseline(a),
                             policy_name=owner.name)
        if owner.learner is not None:
            owner.learner.agents.append(name)
    return {n: agents[n] for n in recipe.agents}, learners


def _policy(name: str, a: AgentSection, tokenizer, recipe: Recipe, adapter: str | None) -> AgentPolicy:
    """How agent `name` prompts and samples (its own settings), acting with `adapter` (None: the
    module's own weights)."""
    return AgentPolicy(name, tokenizer, temperature=a.temperature, top_p=a.top_p if a.top_p < 1 else None,
                       max_new_tokens=recipe.rl.max_new_tokens, adapter=adapter)


def _baseline(a: AgentSection) -> obj.MovingAverageBaseline | None:
    return obj.MovingAverageBaseline(a.baseline_decay) if a.baseline == "ema" else None


def _frozen_copy(sub: Recipe, vocab: int, state: dict | None, seed: int, device) -> torch.nn.Module:
    """The starting policy as a plain module without gradients (a frozen agent, or the reference of
    the KL figure): built from the base's weights, not copied from an engine, whose parameters ZeRO-3
    partitions. The process-wide generators are left as they were."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_model(sub, vocab)
    if state is not None:
        module.load_state_dict(state)
    return module.to(device).eval().requires_grad_(False)


def _with_value_heads(names: list[str]):
    """A `build_replica` prepare step adding the PPO agents' value heads (agents.value); None when none."""
    if not names:
        return None
    from .value import add_value_heads

    return lambda model: add_value_heads(model, names)


def _build_lora(recipe: Recipe, settings: dict[str, AgentSection], init_from, sub: Recipe, dims, device, vocab,
                state, learners) -> torch.nn.Module:
    """The shared model of every LoRA agent starting from `init_from` (one adapter per agent that owns
    its policy): an engine when one of them trains."""
    from .lora import adapter_parameters, add_adapters

    members = [n for n, a in settings.items() if a.adapter == "lora" and a.init_from == init_from and a.policy_of is None]
    specs = {n: _lora_spec(settings[n]) for n in members}
    training = [n for n in members if settings[n].trainable]
    critics = [n for n in training if settings[n].algorithm == "ppo"]

    def prepare(model):
        add_adapters(model, specs)
        for n in members:
            if n not in training:
                for p in adapter_parameters(model, n):
                    p.requires_grad_(False)
        return _with_value_heads(critics)(model) if critics else model

    if not training:
        return prepare(_frozen_copy(sub, vocab, state, recipe.train.seed, device)).to(device).eval()

    def groups(module):  # one group per trainable agent: its adapter (and value head), its learning rate
        from .value import value_parameters

        return [{"params": adapter_parameters(module, n) + (value_parameters(module, n) if n in critics else []),
                 "lr": settings[n].lr, "weight_decay": 0.0} for n in training]

    index = sum(1 for lr in learners if lr.lora)
    replica = build_replica(sub, dims, device, vocab, state_dict=state, name=f"lora_{index}", prepare=prepare,
                            params=groups)
    learners.append(Learner(replica, Stepper(replica.engine, dims, device), list(training),
                            {n: specs[n] for n in members}, groups=list(training)))
    return replica.module


# ---- one engine's update -------------------------------------------------------------------------------


def gather_per_rank(values: list, dims: ParallelDims) -> list[list]:
    """Every rank's list, in rank order (collective over the data-parallel group)."""
    if dims.dp == 1:
        return [list(values)]
    out = [None] * dims.dp
    tdist.all_gather_object(out, list(values), group=dims.dp_group)
    return out


def gather_objects(values: list, dims: ParallelDims) -> list:
    """Every rank's list, concatenated in rank order (collective over the data-parallel group)."""
    return [v for part in gather_per_rank(values, dims) for v in part]


def sum_over_ranks(values: list[float], dims: ParallelDims) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dims.dp > 1:
        tdist.all_reduce(t, group=dims.dp_group)
    return t.tolist()


@dataclass
class AgentBatch:
    """One agent's rows for an update: tokens with advantages, the loss normaliser, and for PPO the
    rows' return targets and the log-probabilities and values before the update (no gradient)."""

    tokens: object  # rollout.TokenBatch
    norm: float
    returns: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    old_values: torch.Tensor | None = None


def _agent_batch(agent: Agent, ar, module, recipe: Recipe, dims: ParallelDims, episodes_global: int) -> AgentBatch:
    """The agent's token batch with advantages (a baseline over every rank's rows, so they do not depend
    on the layout) and its loss normaliser (global count / ranks: DeepSpeed averages over the ranks).
    PPO: A = G - V(s) under the policy before the update, whitened over every rank's rows."""
    a = agent.settings
    steps = ar.step_tensors()
    returns = obj.discounted_returns(steps.rewards, a.gamma, steps.step_mask, from_start=a.returns == "discounted")
    row_returns = returns[steps.acted]  # [N] in the token batch's row order
    batch = ar.token_batch()
    old = None
    if a.algorithm == "ppo":
        with torch.no_grad():
            old = token_logprobs(module, batch.input_ids, batch.targets, temperature=agent.policy.logprob_temperature,
                                 adapter=agent.adapter, value_head=agent.value_head(module))
        rows = list(zip(row_returns.tolist(), old.values.double().tolist()))
    else:
        rows = row_returns.tolist()
    parts = gather_per_rank(rows, dims)  # every rank's rows: their returns (and values) and counts
    everyone = torch.tensor([v for part in parts for v in part], dtype=torch.float64)
    if a.algorithm == "ppo":
        adv_all = obj.normalize_advantages(everyone[:, 0] - everyone[:, 1]) if len(everyone) else everyone
    elif a.algorithm == "grpo":
        # Groups are consecutive episodes (one rank holds whole groups); an agent acts once per episode.
        adv_all = obj.grpo_advantages(everyone, recipe.rl.group_size)
    elif a.baseline == "ema":
        adv_all = agent.baseline.advantages(everyone)
    else:
        adv_all = obj.reinforce_advantages(everyone, baseline=a.baseline)
    start = sum(len(part) for part in parts[:dims.dp_rank])
    batch.set_advantages(adv_all[start:start + len(row_returns)])
    if recipe.rl.normalizer == "tokens":  # the same setting on every rank: the collective runs on all or none
        norm = sum_over_ranks([float(batch.mask.sum())], dims)[0]
    else:
        norm = episodes_global if recipe.rl.normalizer == "episodes" else float(len(everyone))
    norm = max(norm, 1.0) / dims.dp
    if old is None:
        return AgentBatch(batch, norm)
    return AgentBatch(batch, norm, row_returns.float(), old.logprobs, old.values)


def _zero_loss(module) -> torch.Tensor:
    """A loss of 0 that reaches every trainable weight, for a rank with no rows this step: its
    backward joins the engine's gradient collectives like the other ranks'. Under ZeRO-3 a weight
    outside a forward is an empty shard (its gradient would not fit), so it goes through a forward."""
    params = [p for p in module.parameters() if p.requires_grad]
    if params and hasattr(params[0], "ds_id"):
        ids = torch.zeros((1, 1), dtype=torch.long, device=params[0].device)
        return module(ids).float().sum() * 0.0
    return sum(p.sum() for p in params) * 0.0


LOSS_TERMS = ("policy_loss", "entropy_loss", "value_loss")  # each rank's share of the job's loss
TOKEN_MEANS = ("kl", "clip_fraction", "approx_kl")  # means over each rank's tokens


def _reduce_figures(figures: dict[str, dict], agents: dict[str, Agent], recipe: Recipe, dims: ParallelDims) -> None:
    """Collective: each agent's figures over every rank, in place: the loss terms averaged over the
    ranks (each rank's term is its rows over the global count / ranks, as DeepSpeed averages
    gradients), the per-token means weighted by each rank's tokens. A rank without rows adds 0."""
    names = sorted(figures)
    keys = {n: [k for k in LOSS_TERMS + TOKEN_MEANS if _has_figure(agents[n], recipe, k)] for n in names}
    local = []
    for n in names:
        f, t = figures[n], figures[n].get("tokens", 0.0)
        local += [f.get(k, 0.0) * (t if k in TOKEN_MEANS else 1.0) for k in keys[n]] + [t]
    total, i = sum_over_ranks(local, dims), 0
    for n in names:
        t = total[i + len(keys[n])]
        for k in keys[n]:
            figures[n][k] = total[i] / (t if k in TOKEN_MEANS else dims.dp) if (t or k not in TOKEN_MEANS) else None
            i += 1
        i += 1


def _has_figure(agent: Agent, recipe: Recipe, key: str) -> bool:
    if key in ("value_loss", "clip_fraction", "approx_kl"):
        return agent.settings.algorithm == "ppo"
    return key != "kl" or recipe.rl.kl_ref


def update(learner: Learner, agents: dict[str, Agent], rollout, recipe: Recipe, dims: ParallelDims,
           episodes_global: int, active: set[str] | None = None) -> dict[str, dict]:
    """Collective over the learner's engine: every one of its agents' loss, one backward and one step
    per pass (PPO agents make agents.<name>.ppo_epochs passes over the batch; the agents of one
    engine make the same number, config.check_loop_settings). Returns each agent's figures (policy and
    entropy terms, KL to the start on the first pass; PPO's value loss, clip fraction and approximate
    KL to the rollout policy on the last pass; the step's loss).

    `active` (an alternating schedule's phase, agents.schedule): the policy owners that update; the
    others' losses are left out and their adapters put back after the step (`_frozen_groups`)."""
    module = learner.replica.module
    members = [n for n in learner.agents if active is None or agents[n].policy_name in active]
    if not members:
        return {}
    with learner.replica.component.rng.active():
        batches = {n: _agent_batch(agents[n], rollout.agents[n], module, recipe, dims, episodes_global)
                   for n in members}
    figures: dict[str, dict] = {n: {} for n in members}
    first = [True]

    def loss_fn(engine, _):
        total = None
        for n, ab in batches.items():
            ag, a, b = agents[n], agents[n].settings, ab.tokens
            if b.input_ids.shape[0] == 0:
                continue
            head = ag.value_head(engine.module)
            pt = token_logprobs(engine.module, b.input_ids, b.targets, temperature=ag.policy.logprob_temperature,
                                adapter=ag.adapter, value_head=head)
            out = obj.objective_loss(a.algorithm, pt.logprobs, pt.entropy, pt.mask, b.advantages, alpha=a.alpha,
                                     old_logprobs=ab.old_logprobs, values=pt.values, returns=ab.returns,
                                     clip_eps=a.clip_eps, vf_coef=a.vf_coef, normalizer=ab.norm)
            f = figures[n]
            f["tokens"] = float(pt.mask.sum())
            if first[0]:
                f["policy_loss"] = float(out["policy"].detach())
                f["entropy_loss"] = float(out["entropy"].detach())
                if recipe.rl.kl_ref:
                    with torch.no_grad():
                        ref = ag.reference_logprobs(b.input_ids, b.targets)
                    f["kl"] = float(obj.kl_estimate(pt.logprobs.detach(), ref.logprobs, pt.mask))
            if a.algorithm == "ppo":
                f["value_loss"] = float(out["value"].detach())
                f.update(obj.ppo_stats(pt.logprobs.detach(), ab.old_logprobs, pt.mask, a.clip_eps))
            total = out["loss"] if total is None else total + out["loss"]
        return _zero_loss(engine.module) if total is None else total

    learner.stepper.loss_fn = loss_fn
    finite = True
    frozen = [i for i, g in enumerate(learner.groups) if active is not None and g not in active]
    with learner.replica.component.rng.active(), _frozen_groups(learner, frozen):
        for _ in range(max(optimizer_passes(agents[n].settings) for n in members)):
            result = learner.stepper.run([None])
            finite = finite and result.finite
            first[0] = False
    if dims.dp > 1:
        _reduce_figures(figures, agents, recipe, dims)
    for f in figures.values():
        f.pop("tokens", None)
        f["skipped"] = not finite
    if len(members) == 1:
        figures[members[0]]["loss"] = float(result.loss) if result.finite else None
    return figures


@contextlib.contextmanager
def _frozen_groups(learner: Learner, indices: list[int]):
    """Put the optimizer groups `indices` of a LoRA engine (frozen adapters of an alternating phase)
    back as they were after the block: their weights and their AdamW state, bit for bit. A step
    leaves neither alone even with no gradient from the loss: AdamW moves a parameter by its
    momentum, and the engine may hand it a zero gradient."""
    if not indices:
        yield
        return
    opt = learner.replica.engine.optimizer
    if not isinstance(opt, torch.optim.Optimizer) or len(opt.param_groups) != len(learner.groups):
        raise UsageError(f"train.schedule=alternating: the engine of {', '.join(learner.groups)} does not keep "
                         f"one optimizer group per adapter ({type(opt).__name__}); use parallel.zero_stage=0 in fp32")
    params = [p for i in indices for p in opt.param_groups[i]["params"]]
    kept = [(p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()})
            for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, (data, state) in zip(params, kept):
                p.copy_(data)
                if state:
                    opt.state[p] = state
                else:
                    opt.state.pop(p, None)
