"""The one typed schema of a recipe.

Every key a recipe, a fragment or the command line may set is declared here, with its type, its
allowed range and a one-line description (the README's config reference is generated from these
descriptions by `python -m launch docs`). Unknown keys, wrong types and out-of-range values are
rejected by pydantic; cross-field rules live in `Recipe._check_consistency`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]


class Section(BaseModel):
    # strict: no silent coercion of "3" into 3 or 1.0 into True; forbid: unknown keys are errors.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


def _f(default, description: str, **kw):
    return Field(default, description=description, **kw)


class RunSection(Section):
    name: str = _f("default", "run name; the run directory is <run.output_dir>/<run.name>",
                   pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str = _f("runs", "folder that holds run directories")
    description: str = _f("", "free text shown in the README table and logged to tracking")
    threads: PosInt | None = _f(None, "torch intra-op threads in each process (torch.set_num_threads); null = "
                                "torch's default (OMP_NUM_THREADS, else the cores). Tiny models on a busy CPU "
                                "run faster on 1: a second thread only adds synchronisation")


class ModelSection(Section):
    style: Literal["gpt2", "llama"] = _f("gpt2", "gpt2: LayerNorm, GELU, learned positions, tied head; "
                                         "llama: RMSNorm, SwiGLU, RoPE, grouped-query attention")
    n_layer: PosInt = _f(4, "transformer blocks")
    n_head: PosInt = _f(4, "attention heads")
    n_kv_head: PosInt | None = _f(None, "key/value heads (grouped-query attention); null = n_head")
    d_model: PosInt = _f(256, "residual stream width")
    d_ff: PosInt | None = _f(None, "MLP hidden width; null = 4*d_model (gpt2) or the Llama rule")
    max_seq_len: PosInt = _f(1024, "longest sequence the model accepts (learned positions / RoPE cache)")
    vocab_size: PosInt | None = _f(None, "embedding rows; null = the tokenizer's vocabulary size")
    dropout: float = _f(0.0, "dropout probability", ge=0.0, lt=1.0)
    bias: bool | None = _f(None, "biases in linear layers and norms; null = style default")
    norm_eps: float = _f(1e-5, "epsilon of LayerNorm/RMSNorm", gt=0.0)
    rope_theta: float = _f(10000.0, "RoPE base (llama style)", gt=0.0)
    tie_embeddings: bool | None = _f(None, "tie lm_head to the token embedding; null = style default")
    init_std: float = _f(0.02, "standard deviation of the GPT-2 style initialisation", gt=0.0)
    kernels: Literal["auto", "fused", "torch"] = _f(
        "auto", "auto: fused kernels where they build, else PyTorch with one warning; fused: fail if a "
        "kernel cannot be built; torch: PyTorch references")
    init_from: str | None = _f(None, "Hugging Face folder (config.json + safetensors) to start from")


class DataSection(Section):
    path: str = _f("stdlib", "'stdlib' (the Python standard library sources), a local file or folder "
                   "(.txt/.md/.py/.jsonl/.json/.parquet), or a hub dataset name")
    text_field: str = _f("text", "column that holds the text in jsonl/parquet/hub data")
    tokenizer: str | None = _f(None, "tokenizer.json to load; null = train a byte-level BPE on the train split")
    vocab_size: PosInt = _f(4096, "vocabulary size of the trained BPE tokenizer", ge=260)
    seq_len: PosInt = _f(256, "tokens per training sequence")
    val_fraction: float = _f(0.05, "fraction of documents held out for validation", gt=0.0, lt=1.0)
    max_documents: PosInt | None = _f(None, "use only the first N documents (null = all)")
    num_proc: PosInt = _f(2, "tokenisation workers")
    split: Literal["iid", "dirichlet", "by_source"] = _f(
        "iid", "how training data is dealt to sync.replicas groups: iid; dirichlet: each group's mix of document "
        "sources drawn from Dirichlet(data.split_alpha); by_source: whole sources per group")
    split_alpha: float = _f(0.1, "Dirichlet concentration of data.split=dirichlet (small = strongly non-IID)", gt=0.0)
    cache_dir: str = _f(".cache/data", "where tokenised corpora are cached (keyed by a hash of the inputs)")


class OptimSection(Section):
    lr: float = _f(1e-3, "peak learning rate", gt=0.0)
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of optim.lr", ge=0.0, le=1.0)
    warmup_steps: NonNegInt = _f(50, "linear warm-up steps")
    schedule: Literal["cosine", "constant"] = _f("cosine", "decay after warm-up")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to biases, norms and embeddings)", ge=0.0)
    beta1: float = _f(0.9, "AdamW beta1", ge=0.0, lt=1.0)
    beta2: float = _f(0.95, "AdamW beta2", ge=0.0, lt=1.0)
    eps: float = _f(1e-8, "AdamW epsilon", gt=0.0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value (0 = off)", ge=0.0)
    optimizer: Literal["adamw", "sgd"] = _f("adamw", "adamw, or sgd: plain stochastic gradient descent (no momentum; "
                                            "weight_decay as L2; the betas and eps unused; used by game self-play, ZeRO-0)")


class TrainSection(Section):
    max_steps: PosInt = _f(1000, "optimizer steps")
    eval_every: PosInt = _f(100, "evaluate on the validation split every N steps (and at the end)")
    eval_batches: PosInt | None = _f(20, "size of the fixed validation sample every evaluation uses, periodic and final: "
                                     "this many batches spread evenly over the split (null = the full split); the "
                                     "final evaluation also reports the full split (val_loss_full)")
    checkpoint_every: PosInt | None = _f(None, "save a checkpoint every N steps (null = only at the end)")
    schedule: Literal["simultaneous", "alternating"] = _f(
        "simultaneous", "multi-agent runs: every trainable agent updates at every step, or the phases of "
        "train.phase_order take turns (the others act but stay frozen: weights and optimizer state unchanged)")
    phase_steps: PosInt = _f(50, "train.schedule=alternating: steps per phase")
    phase_order: list[str] = _f([], "train.schedule=alternating: the phases in order, each an agent name or "
                                "names joined by '+' (updated together), repeated; [] = each trainable agent alone, "
                                "in the order of agents")
    keep_checkpoints: PosInt = _f(2, "newest checkpoints kept on disk")
    resume: str = _f("none", "none | auto (latest checkpoint of this run) | path of a checkpoint folder")
    seed: NonNegInt = _f(1234, "seed of initialisation, data order and dropout")
    log_every: PosInt = _f(1, "write a metrics row every N steps")
    precision: Literal["auto", "fp32", "bf16"] = _f("auto", "auto: bf16 on GPUs that support it, fp32 on CPU")
    nan_policy: Literal["skip", "stop"] = _f("skip", "on a non-finite loss: skip the update and count it, or stop")
    max_nan_steps: PosInt = _f(5, "stop after this many consecutive skipped (non-finite) steps")
    sample_tokens: NonNegInt = _f(64, "tokens generated for the sample at evaluations and at the end")
    sample_prompt: str = _f("def ", "prompt of the generated sample")
    peak_tflops: float | None = _f(None, "one device's peak for MFU; null = the GPU's datasheet bf16 dense peak (known GPUs), "
                                   "or on CPU a matmul ceiling measured at the start of the run on torch's threads", gt=0.0)
    progress: bool = _f(True, "show progress bars on rank 0")
    compile: bool = _f(False, "compile the model's forward (fused kernels included) with torch.compile: the first "
                       "steps are slower while it compiles; generation stays eager; not with parallel.pp > 1 or ZeRO-3")


class ParallelSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = _f(0, "ZeRO stage: 0 off, 1 optimizer state, 2 + gradients, 3 + parameters")
    tp: PosInt = _f(1, "tensor-parallel degree")
    pp: PosInt = _f(1, "pipeline-parallel degree")
    micro_batch: PosInt = _f(8, "sequences per micro-batch per data-parallel rank")
    global_batch: PosInt | None = _f(None, "sequences per optimizer step over all ranks; "
                                     "null = micro_batch x data-parallel degree (no accumulation)")
    activation_checkpointing: bool = _f(False, "recompute each block's activations in the backward pass")
    overlap_comm: bool = _f(False, "overlap gradient reduction with the backward pass (ZeRO)")
    bucket_size: PosInt = _f(50_000_000, "ZeRO reduce/allgather bucket size in elements")
    offload_optimizer: bool = _f(False, "keep optimizer state in CPU memory (ZeRO 1-3)")
    offload_params: bool = _f(False, "keep parameters in CPU memory (ZeRO 3 only)")
    sequence_parallel: bool = _f(False, "split norms and dropout along the sequence across tp ranks")
    pp_partition: Literal["parameters", "uniform"] = _f("parameters", "how blocks are split into pipeline stages")


class LaunchSection(Section):
    procs_per_node: PosInt = _f(1, "processes per node (one per GPU on GPU nodes)")
    nodes: PosInt = _f(1, "nodes")
    hostfile: str | None = _f(None, "DeepSpeed hostfile for several nodes")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "collective backend; auto: nccl on GPU, gloo on CPU")
    timeout_s: PosInt = _f(300, "seconds a collective may wait before the job is stopped")
    # Slurm (`make slurm` / `python -m launch slurm`, launch/slurm.py); ignored by `make train`.
    partition: str | None = _f(None, "Slurm partition (null = the cluster's default)")
    account: str | None = _f(None, "Slurm account charged for the job (null = your default)")
    time: str | None = _f(None, "Slurm time limit, quoted in YAML: '24:00:00', '2-00:00:00', '90' (minutes); "
                          "null = the partition's default", pattern=r"^(UNLIMITED|INFINITE|\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")
    gpus_per_node: NonNegInt = _f(0, "GPUs per Slurm node (0 = CPU nodes); one process per GPU, so it must "
                                  "equal launch.procs_per_node")
    cpus_per_task: PosInt | None = _f(None, "CPUs per node for the job's one task per node (its ranks and data "
                                      "workers); null = Slurm's default")
    requeue: bool = _f(True, "Slurm: after the time-limit warning the run checkpoints and the job requeues itself "
                       "to continue (train.resume=auto)")
    signal_seconds: PosInt = _f(300, "Slurm: seconds before the time limit at which the job is warned (USR1) "
                                "to checkpoint and stop", le=65535)
    slurm_extra: list[str] = _f([], "extra sbatch options, one per item (e.g. --exclusive, --qos=high, "
                                "--constraint=a100)")
    setup: list[str] = _f([], "shell lines run in the Slurm job before training (module load ..., "
                          "source .venv/bin/activate, PYTHON=...)")


class TrackingSection(Section):
    wandb: Literal["offline", "online", "disabled"] = _f("offline", "Weights & Biases mode; offline files go "
                                                         "under the run directory (wandb sync to upload)")
    project: str = _f("llm-recipes", "W&B project")
    entity: str | None = _f(None, "W&B entity (team or user)")
    group: str | None = _f(None, "W&B group (e.g. a Slurm job)")
    tags: list[str] = _f([], "W&B tags")


class SyncOuterSection(Section):
    lr: float = _f(0.7, "DiLoCo outer learning rate (1 with momentum 0 = plain averaging)", gt=0.0)
    momentum: float = _f(0.9, "DiLoCo outer momentum", ge=0.0, lt=1.0)
    nesterov: bool = _f(True, "DiLoCo outer Nesterov momentum")


class SyncSection(Section):
    replicas: PosInt | None = _f(None, "groups of ranks that may hold different weights (null = the data-parallel "
                                 "degree); inside a group DeepSpeed reduces as usual, across groups sync.strategy")
    strategy: Literal["allreduce", "ring", "parameter_server", "gossip", "local_sgd", "diloco", "fedavg",
                      "hybrid"] = _f(
        "allreduce", "allreduce: the engine's own gradient reduction over every rank; ring: our ring all-reduce of "
        "the gradients across groups; parameter_server: the last sync.servers ranks own shards of the weights and "
        "of AdamW, workers push gradients and pull weights; gossip: average with graph neighbours every sync.every steps; local_sgd: "
        "average every sync.every steps; diloco: local_sgd with an outer Nesterov optimizer on the averaged delta; "
        "fedavg: average weighted by each group's training samples; hybrid: DeepSpeed inside a group, sync.across "
        "across groups")
    every: PosInt = _f(1, "steps between synchronisations (local_sgd, diloco, fedavg, gossip, hybrid)")
    servers: PosInt = _f(1, "parameter_server: server ranks (the world's last; they count in launch.procs_per_node)")
    staleness: NonNegInt = _f(0, "parameter_server: 0 synchronous; k >= workers - 1 asynchronous, every push "
                              "applied on its own at most k versions late")
    topology: Literal["ring", "torus", "exponential", "random"] = _f(
        "exponential", "gossip graph: ring, 2-D torus, one-peer exponential, seeded random matching")
    outer: SyncOuterSection = SyncOuterSection()
    weights: Literal["samples", "equal"] = _f("samples", "fedavg weights: each group's training samples n_i, or equal")
    across: Literal["gossip", "diloco", "fedavg", "local_sgd"] = _f("diloco", "hybrid: the strategy across groups")
    compress: Literal["none", "fp16", "int8", "topk", "powersgd"] = _f(
        "none", "compression of what groups exchange (gradients or deltas), with error feedback")
    compress_ratio: float = _f(0.01, "topk: fraction of entries sent", gt=0.0, le=1.0)
    compress_rank: PosInt = _f(4, "powersgd: rank of the low-rank approximation")


# what an agent with policy_of takes from the agent whose policy it uses
ENV_DATA_PREFIX = "env:"  # data.path env:<name>: a corpus of the env's random play (agents/corpus.py)
SHARED_POLICY_KEYS = ("init_from", "adapter", "lora_rank", "lora_alpha", "lora_targets", "lr", "trainable", "algorithm",
                      "ppo_epochs")


class AgentSection(Section):
    """One LLM agent of a multi-agent RL recipe (`agents: {name: {...}}`)."""

    init_from: str | None = _f(None, "the agent's starting policy: a run directory of ours or a Hugging Face folder "
                               "(several agents may share one); null = the recipe's model.*")
    adapter: Literal["none", "lora"] = _f("none", "none: the agent trains its own full weights; lora: one peft "
                                          "adapter per agent over a shared frozen base")
    lora_rank: PosInt = _f(8, "LoRA rank (adapter: lora)")
    lora_alpha: float = _f(16.0, "LoRA scaling alpha (adapter: lora)", gt=0.0)
    lora_targets: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "module names the adapter wraps",
                                 min_length=1)
    algorithm: Literal["reinforce", "grpo", "ppo"] = _f("reinforce", "reinforce with a baseline, grpo "
                                                        "(group-normalised advantages), ppo (clipped, value head)")
    baseline: Literal["mean", "loo", "ema", "none"] = _f("mean", "reinforce baseline: batch mean, leave-one-out, "
                                                         "moving average of earlier batches, none")
    baseline_decay: float = _f(0.9, "decay of the ema baseline", ge=0.0, lt=1.0)
    alpha: float = _f(0.0, "entropy weight: J = E[sum_t gamma^t r_t] + alpha * H(pi)", ge=0.0)
    gamma: float = _f(1.0, "discount of the agent's rewards", ge=0.0, le=1.0)
    returns: Literal["discounted", "reward_to_go"] = _f("discounted", "discounted: gamma^t G_t (the unbiased "
                                                        "gradient of J); reward_to_go: G_t (common practice)")
    lr: float = _f(1e-5, "the agent's learning rate", gt=0.0)
    trainable: bool = _f(True, "false: a frozen partner or opponent (no optimizer)")
    temperature: float = _f(1.0, "sampling temperature (0 = greedy)", ge=0.0)
    top_p: float = _f(1.0, "nucleus sampling mass", gt=0.0, le=1.0)
    clip_eps: float = _f(0.2, "ppo ratio clip", gt=0.0, lt=1.0)
    vf_coef: float = _f(0.5, "ppo value-loss weight", ge=0.0)
    ppo_epochs: PosInt = _f(1, "ppo passes over each batch of episodes")
    policy_of: str | None = _f(None, "another agent whose policy (weights or adapter, and value head) this one acts "
                               "and learns with: one shared policy for several roles; its init_from, adapter, "
                               "lora_*, lr, trainable, algorithm and ppo_epochs are that agent's")


class EnvSection(Section):
    name: str = _f("", "environment of a multi-agent recipe (agents.envs registry: signaling, split_arith, ...)")
    args: dict = _f({}, "keyword arguments of the environment's constructor")
    seed: NonNegInt | None = _f(None, "seed of the environment's episodes (null = train.seed)")
    eval_episodes: PosInt = _f(200, "episodes of each evaluation")
    eval_options: dict = _f({}, "reset options at evaluation (e.g. blank_message: true)")
    eval_group_by: str | None = _f(None, "a key of the env's final infos (e.g. target): evaluation success is also "
                                   "reported per value of it (summary success_by)")
    eval_swap: dict[str, str] = _f({}, "agent -> agent whose policy it uses in an extra evaluation (e.g. {first: "
                                   "second, second: first} swaps two trained adapters; summary success_swapped)")
    eval_metrics: list[str] = _f([], "keys of the env's final infos (e.g. mean_waiting_time, teleports) averaged over "
                                 "the evaluation episodes (summary eval_metrics); an env with baseline_metrics(seed) "
                                 "also gives summary baseline and eval_ratio on the same episodes")


class RLSection(Section):
    episodes_per_step: PosInt = _f(64, "episodes collected per optimizer step (over every data-parallel rank)")
    group_size: PosInt = _f(1, "episodes per initial state (grpo normalises advantages within a group)")
    max_new_tokens: PosInt = _f(16, "tokens an agent may generate per action")
    max_env_steps: PosInt = _f(8, "env steps after which an episode is truncated")
    normalizer: Literal["episodes", "rows", "tokens"] = _f("episodes", "what the policy-gradient sum is divided "
                                                          "by (episodes: the exact estimate of the gradient of J)")
    kl_ref: bool = _f(True, "track the KL divergence of each agent to its initial policy")
    average_every: PosInt = _f(1, "game self-play (env openspiel): the current policy joins the average policy every "
                               "this many steps (its table is one forward over every information state); with "
                               "rl.best_response=exact / psro: the steps of distillation per fictitious-play / "
                               "PSRO iteration")
    average_weighting: Literal["uniform", "linear"] = _f("uniform", "game self-play: iterate t of the average policy "
                                                         "weighs 1 (uniform, fictitious play) or t (linear, as CFR+); "
                                                         "with rl.best_response=exact, best response t")
    distill_states: PosInt | None = _f(None, "game self-play with rl.best_response=exact or psro: information states per "
                                       "distillation step, drawn without replacement per agent (null = all)")
    best_response: Literal["rl", "exact", "psro"] = _f(
        "rl", "game self-play: rl = the policy itself learns by REINFORCE and an exact average of its iterates is "
        "measured; exact = full-width extensive-form fictitious play (XFP): OpenSpiel's exact best response to the "
        "LLM's policy, the LLM distilled toward the average of the best responses so far; psro = PSRO (double "
        "oracle): exact best responses to the Nash mixture of a growing population, the LLM distilled toward "
        "that mixture")


class DistillSection(Section):
    teacher: str | None = _f(None, "knowledge distillation: the teacher, a run directory of ours or recipe:<name> "
                             "(trained first when missing); the student (this recipe's model.*) learns its "
                             "token distributions; data.tokenizer defaults to the teacher's")
    alpha: float = _f(1.0, "weight of the distillation loss; 1 - alpha goes to the next-token cross-entropy",
                      ge=0.0, le=1.0)
    temperature: float = _f(1.0, "softmax temperature of both models in the distillation loss (scaled by T^2)", gt=0.0)


class DebateSection(Section):
    iterations: NonNegInt = _f(3, "env debate_arith: rounds of multi-agent fine-tuning (K): debate, pseudo-label, SFT")
    train_problems: PosInt = _f(500, "env debate_arith: new problems debated per iteration (never the held-out ones)")
    heldout_problems: PosInt = _f(500, "env debate_arith: the fixed held-out problems every evaluation uses")
    min_votes: PosInt = _f(2, "env debate_arith: votes the most common final answer needs to become a pseudo-label")
    sft_epochs: PosInt = _f(1, "env debate_arith: passes over an agent's selected responses per iteration")
    sft_batch: PosInt = _f(32, "env debate_arith: responses per SFT step (cross-entropy on the response tokens)")
    kl_base: float = _f(0.0, "env debate_arith: weight of KL(agent || its starting weights) over the vocabulary at "
                        "the response tokens, added to every SFT step's loss (agents and baseline alike): keeps "
                        "each agent's answer distribution, so the agents' diversity, near the base's", ge=0.0)
    sft_tempered: bool = _f(False, "env debate_arith: SFT fits softmax(logits / T), T each learner's sampling "
                            "temperature (the distribution its responses came from), so only the majority filter "
                            "moves it; false: cross-entropy at T = 1, which also sharpens every agent towards its "
                            "own T < 1 samples each iteration")
    baseline: bool = _f(True, "env debate_arith: also train the single-agent self-training baseline (agent "
                        "'single', from the first agent's settings) side by side")
    samples: PosInt | None = _f(None, "env debate_arith: the baseline's samples per problem; null = agents x rounds "
                                "(the debate's responses per problem, so both generate as many tokens)")
    critics: Literal["shared", "separate"] = _f(
        "shared", "env debate_arith: who answers rounds 2..R. shared: each agent, with its one set of weights "
        "(generator in round 1, critic after); separate: N more engines critic_0.. (each from its agent's settings "
        "and the same base) answer in agent_i's seat from round 2 on and fine-tune on those rounds' responses, "
        "the agents on round 1's only (the multi-agent fine-tuning paper's generator and critic models)")
    agent_data: Literal["all", "split"] = _f(
        "all", "env debate_arith: which problems each seat fine-tunes on. all: every labelled problem; split: "
        "problem k only in seat k mod N (agent and critic), so the agents learn from disjoint problems")


class Recipe(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    parallel: ParallelSection = ParallelSection()
    launch: LaunchSection = LaunchSection()
    tracking: TrackingSection = TrackingSection()
    sync: SyncSection = SyncSection()
    agents: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], AgentSection] = _f(
        {}, "multi-agent RL: agent name -> its policy, algorithm and settings (see agents.<name>.*)")
    env: EnvSection = EnvSection()
    rl: RLSection = RLSection()
    distill: DistillSection = DistillSection()
    debate: DebateSection = DebateSection()

    @model_validator(mode="after")
    def _check_consistency(self) -> Recipe:
        m, d, p = self.model, self.data, self.parallel
        if m.d_model % m.n_head:
            raise ValueError(f"model.d_model={m.d_model} must be divisible by model.n_head={m.n_head}")
        if m.n_kv_head is not None and m.n_head % m.n_kv_head:
            raise ValueError(f"model.n_head={m.n_head} must be divisible by model.n_kv_head={m.n_kv_head}")
        if m.style == "llama" and (m.d_model // m.n_head) % 2:
            raise ValueError(f"model.style=llama needs an even head dimension (d_model/n_head = {m.d_model // m.n_head})")
        if d.seq_len > m.max_seq_len:
            raise ValueError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if m.vocab_size is not None and d.tokenizer is None and m.vocab_size < d.vocab_size:
            raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than data.vocab_size={d.vocab_size}")
        if p.offload_params and p.zero_stage != 3:
            raise ValueError("parallel.offload_params needs parallel.zero_stage=3")
        if p.offload_optimizer and p.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
        if p.pp > 1 and p.zero_stage >= 2:
            raise ValueError(f"parallel.zero_stage={p.zero_stage} cannot be combined with parallel.pp={p.pp} "
                             "(DeepSpeed's pipeline engine supports ZeRO 0 and 1 only; ZeRO 2 and 3 need "
                             "parallel.pp=1, with any parallel.tp)")
        if p.pp > m.n_layer:
            raise ValueError(f"parallel.pp={p.pp} pipeline stages need at least as many layers (model.n_layer={m.n_layer})")
        if p.tp > 1:
            if m.n_head % p.tp or (m.n_kv_head or m.n_head) % p.tp:
                raise ValueError(f"model.n_head={m.n_head} and model.n_kv_head={m.n_kv_head or m.n_head} "
                                 f"must be divisible by parallel.tp={p.tp}")
        if self.train.compile and p.pp > 1:
            raise ValueError(f"train.compile=true cannot be combined with parallel.pp={p.pp} (DeepSpeed's pipeline "
                             "engine runs the stages' layers itself); set train.compile=false or parallel.pp=1")
        if self.train.compile and p.zero_stage == 3:
            raise ValueError("train.compile=true cannot be combined with parallel.zero_stage=3 (ZeRO-3 gathers each "
                             "layer's partitioned parameters in hooks that torch.compile cannot trace); use ZeRO 0-2 "
                             "or train.compile=false")
        self._check_sync()
        self._check_agents()
        self._check_distill()
        self._check_debate()
        if self.train.resume not in ("none", "auto") and not self.train.resume.strip():
            raise ValueError("train.resume must be none, auto or a checkpoint path")
        return self

    def _check_distill(self) -> None:
        if self.distill.teacher is None:
            return
        p = self.parallel
        if p.tp > 1 or p.pp > 1:
            # The loss reads the student's whole logits: tensor parallelism shards them over the
            # vocabulary, and the pipeline engine computes its own loss on the last stage.
            raise ValueError(f"distill.teacher needs parallel.tp=1 and parallel.pp=1 (got tp={p.tp}, pp={p.pp}); "
                             "ZeRO 0-3 and data parallelism are allowed")
        if self.agents or self.sync.strategy != "allreduce":
            raise ValueError("distill.teacher cannot be combined with agents or a sync strategy")

    def _check_debate(self) -> None:
        if self.env.name != "debate_arith":
            if self.debate != DebateSection():
                raise ValueError(f"debate.* keys need env.name=debate_arith (got env.name={self.env.name or 'unset'})")
            return
        if self.agents and self.world_size() != 1:
            raise ValueError(f"env debate_arith runs in one process (launch.procs_per_node=1, launch.nodes=1); got "
                             f"{self.world_size()} processes")
        if self.debate.samples is not None and self.debate.samples < 2:
            raise ValueError(f"debate.samples={self.debate.samples}: the baseline votes over its samples, so it needs "
                             ">= 2 (or null: agents x rounds)")
        cold = [n for n, a in self.agents.items() if a.temperature == 0] if self.debate.sft_tempered else []
        if cold:
            raise ValueError(f"debate.sft_tempered fits each agent's sampling distribution, which a greedy agent has "
                             f"not got: agents.{cold[0]}.temperature must be > 0 (got 0)")
        if self.debate.kl_base > 0 and self.parallel.zero_stage == 3:
            raise ValueError(f"debate.kl_base={self.debate.kl_base} needs parallel.zero_stage <= 2: the anchored SFT "
                             "step (both models' logits at the response tokens) has not been run under ZeRO-3")
        clash = [a for a in self.agents if a.startswith("critic_")]
        if clash and self.debate.critics == "separate":
            raise ValueError(f"agents: {clash[0]!r} is the name of a debate.critics=separate critic; name the "
                             "debaters otherwise (the env's agent_0, agent_1, ...)")
        if self.agents and "single" in self.agents and self.debate.baseline:
            raise ValueError("agents: 'single' is the name of the debate.baseline agent; name the debaters otherwise "
                             "(the env's agent_0, agent_1, ...)")

    def _check_phases(self) -> None:
        t = self.train
        if t.schedule != "alternating":
            if t.phase_order:
                raise ValueError("train.phase_order needs train.schedule=alternating")
            return
        owners = {n for n, a in self.agents.items() if a.trainable and not a.policy_of}
        for phase in t.phase_order:
            for name in phase.split("+"):
                if name not in owners:
                    raise ValueError(f"train.phase_order: {phase!r} names {name!r}, which is not a trainable agent "
                                     f"owning its policy; allowed: {', '.join(sorted(owners))} (join with '+')")

    def _check_agents(self) -> None:
        if not self.agents and self.train.schedule == "alternating":
            raise ValueError("train.schedule=alternating needs agents (it alternates which agents update)")
        if not self.agents:
            # data.path env:<name> (a corpus of random play, launch/agents_chain.py) reads env.* too.
            if self.env.name and self.env.name != self.data.path.removeprefix(ENV_DATA_PREFIX):
                raise ValueError(f"env.name={self.env.name} needs agents: a mapping of agent names to their settings "
                                 f"(or data.path: env:{self.env.name}, a corpus of random play)")
            return
        if not self.env.name:
            raise ValueError(f"agents ({', '.join(self.agents)}) need an environment: set env.name")
        grpo = [n for n, a in self.agents.items() if a.algorithm == "grpo"]
        if grpo and self.rl.group_size < 2:
            raise ValueError(f"agents {', '.join(grpo)} use algorithm=grpo: it needs rl.group_size >= 2 "
                             f"(got {self.rl.group_size})")
        if self.rl.episodes_per_step % self.rl.group_size:
            raise ValueError(f"rl.episodes_per_step={self.rl.episodes_per_step} must be a multiple of "
                             f"rl.group_size={self.rl.group_size}")
        if not any(a.trainable for a in self.agents.values()):
            raise ValueError("every agent has trainable=false: nothing to train")
        self._check_phases()
        self._check_shared_policies()
        for who, whose in self.env.eval_swap.items():
            if who not in self.agents or whose not in self.agents:
                raise ValueError(f"env.eval_swap: {who}: {whose} names an agent this recipe does not have; agents: "
                                 f"{', '.join(self.agents)}")
        if self.sync.strategy != "allreduce":
            raise ValueError("agents: recipes train each agent with its own engine; sync.strategy must stay allreduce")

    def _check_shared_policies(self) -> None:
        for name, a in self.agents.items():
            owner = a.policy_of
            if owner is None:
                continue
            key = f"agents.{name}.policy_of={owner}"
            if owner not in self.agents or owner == name:
                raise ValueError(f"{key}: must name another agent of this recipe ({', '.join(self.agents)})")
            if self.agents[owner].policy_of is not None:
                raise ValueError(f"{key}: {owner} itself uses {self.agents[owner].policy_of}'s policy; name the agent "
                                 "that owns it")
            for k in SHARED_POLICY_KEYS:
                if k in a.model_fields_set and getattr(a, k) != getattr(self.agents[owner], k):
                    raise ValueError(f"{key}: agents.{name}.{k} comes from {owner} ({getattr(self.agents[owner], k)!r}); "
                                     f"leave it unset (got {getattr(a, k)!r})")

    def _check_sync(self) -> None:
        s, p = self.sync, self.parallel
        if s.strategy == "allreduce":
            if s.replicas is not None:
                raise ValueError("sync.replicas needs a sync.strategy other than allreduce (allreduce: DeepSpeed's "
                                 "own reduction over every rank, one set of weights)")
            if self.data.split != "iid":
                raise ValueError(f"data.split={self.data.split} deals data to sync.replicas groups: it needs "
                                 "sync.strategy local_sgd, diloco, fedavg, gossip or hybrid")
            return
        if p.zero_stage and (s.strategy == "parameter_server" or s.compress == "powersgd"):
            what = "sync.strategy=parameter_server" if s.strategy == "parameter_server" else "sync.compress=powersgd"
            raise ValueError(f"{what} needs each rank's whole gradient (full matrices): it needs parallel.zero_stage=0 "
                             f"(got {p.zero_stage})")
        if p.offload_optimizer or p.offload_params:
            raise ValueError(f"sync.strategy={s.strategy} exchanges the optimizer's partitions where DeepSpeed keeps "
                             "them on the device: it needs parallel.offload_optimizer=false and offload_params=false")
        if p.pp > 1:
            raise ValueError(f"sync.strategy={s.strategy} needs parallel.pp=1 (DeepSpeed's PipelineModule builds its "
                             "groups over the whole world, so a job cannot hold several pipeline replicas)")
        kind = s.across if s.strategy == "hybrid" else s.strategy
        if kind == "parameter_server" and (p.tp > 1 or self.data.split != "iid"):
            raise ValueError("sync.strategy=parameter_server gives each worker the whole model and one data share: it "
                             f"needs parallel.tp=1 (got {p.tp}) and data.split=iid (got {self.data.split})")
        if s.compress != "none" and kind not in ("ring", "diloco"):
            raise ValueError(f"sync.compress={s.compress} compresses what replicas exchange as gradients or deltas: "
                             f"it needs sync.strategy ring or diloco (or hybrid with sync.across=diloco), not {kind}")
        if self.data.split != "iid" and kind == "ring":
            raise ValueError(f"data.split={self.data.split} gives each replica its own data: it needs a strategy "
                             "that lets replicas differ (local_sgd, diloco, fedavg, gossip, hybrid), not ring")

    # ---- derived quantities -------------------------------------------------------------------
    def world_size(self) -> int:
        return self.launch.procs_per_node * self.launch.nodes

    def server_ranks(self) -> int:
        """Ranks that serve parameters and train nothing (sync.strategy=parameter_server)."""
        return self.sync.servers if self.sync.strategy == "parameter_server" else 0

    def train_world(self, world_size: int | None = None) -> int:
        """The processes that train: all of them (`world_size`, default the recipe's) but servers."""
        return (world_size or self.world_size()) - self.server_ranks()

    def dp_degree(self, world_size: int | None = None) -> int:
        """Data-parallel degree over `world_size` training ranks (default: the recipe's)."""
        world = world_size or self.train_world()
        mp = self.parallel.tp * self.parallel.pp
        if world % mp:
            raise ValueError(f"world size {world} (launch.nodes x launch.procs_per_node) is not divisible by "
                             f"parallel.tp={self.parallel.tp} x parallel.pp={self.parallel.pp}")
        return world // mp

    def grad_accum_steps(self, world_size: int | None = None) -> int:
        dp = self.dp_degree(world_size)
        per_step = self.parallel.micro_batch * dp
        gb = self.parallel.global_batch or per_step
        if gb % per_step:
            raise ValueError(f"parallel.global_batch={gb} must be divisible by parallel.micro_batch="
                             f"{self.parallel.micro_batch} x data-parallel degree {dp}")
        return gb // per_step

    def global_batch(self, world_size: int | None = None) -> int:
        return self.parallel.global_batch or self.parallel.micro_batch * self.dp_degree(world_size)
