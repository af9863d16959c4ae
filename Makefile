# `make` lists the targets. Two commands set everything up on a fresh machine: `make train` and `make test`.
# Every target that runs Python creates .venv from requirements.txt when it is missing or older than
# requirements.txt. The text after `##` on a target's line is its line in `make help`.

PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
RECIPE      ?= gpt-tiny
ARGS        ?=
RUN         ?=
OUT         ?=
# `=`, not `?=`: a HOST or PORT in the environment (shells set HOST to the machine's name) must not
# decide where `make serve` listens; HOST=... PORT=... on the command line do.
PORT        = 8000
HOST        = 127.0.0.1
PYTEST_ARGS ?=
FAST_MARKERS = not dist and not slurm

.DEFAULT_GOAL := help
.PHONY: help train validate recipes export test test-fast lint docs kernels bench bench-train bench-parallel \
        bench-generate bench-onnx bench-sync bench-agents gpu-check gpu-wheels slurm clean serve bench-serve bench-serve-tp bench-debate \
        bench-games

help: ## list the targets (this text)
	@echo "usage: make <target> [RECIPE=name] [ARGS=\"key=value ...\"]   (docs: README.md, docs/)"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

train: $(STAMP) ## train RECIPE (default gpt-tiny) with ARGS overrides; creates .venv first if needed
	$(PY) -m launch train $(RECIPE) $(ARGS)

validate: $(STAMP) ## print RECIPE's resolved config with ARGS applied; writes nothing
	$(PY) -m launch validate $(RECIPE) $(ARGS)

recipes: $(STAMP) ## list the recipes in recipes/
	@$(PY) -m launch recipes

export: $(STAMP) ## export a run: make export RUN=runs/<name> OUT=<dir> [FORMAT=hf|onnx|onnx-int8]
	@test -n "$(RUN)" -a -n "$(OUT)" || { echo "usage: make export RUN=runs/<name> OUT=<dir> [FORMAT=hf|onnx|onnx-int8]" >&2; exit 2; }
	$(PY) -m launch export $(RUN) $(OUT) --format $(or $(FORMAT),hf)

# OpenAI-compatible HTTP server over a trained run's models, one per agent (docs/serving.md); SIGTERM/Ctrl-C
# finishes the requests in flight.
serve: $(STAMP) ## serve a run over the OpenAI API: make serve RUN=runs/<name> [PORT=8000 HOST=127.0.0.1 REPLICAS=1 ENGINE=torch|onnxruntime|vllm]
	@test -n "$(RUN)" || { echo "usage: make serve RUN=runs/<name> [PORT=8000] [HOST=127.0.0.1] [REPLICAS=N] [ENGINE=torch|onnxruntime|vllm]" >&2; exit 2; }
	$(PY) -m serve $(RUN) --host $(HOST) --port $(PORT) --replicas $(or $(REPLICAS),1) $(if $(ENGINE),--engine $(ENGINE)) $(ARGS)

# Two workers by default: the suite alone keeps ~1.4 of 2 cores busy (process start-up, waits on
# launched ranks), so a second worker fills the idle time. Each test file stays on one worker
# (--dist loadfile): module fixtures such as the local Slurm cluster are started once.
TEST_WORKERS ?= 2
test: $(STAMP) ## the whole test suite over TEST_WORKERS pytest workers (PYTEST_ARGS passes options to pytest)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 $(PYTEST_ARGS)

test-fast: $(STAMP) ## the quick part: single-process tests only (no `dist` or `slurm` marker)
	$(PY) -m pytest -q -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check .
	$(PY) -m ruff check .

# The recipe table in README.md (from recipes/) and docs/config-reference.md (from trainer/schema.py);
# tests/test_docs.py fails when they are stale.
docs: $(STAMP) ## regenerate the generated parts of README.md and docs/
	$(PY) -m launch docs --write

kernels: $(STAMP) ## prebuild the fused kernels for this machine
	$(PY) -m model.kernels.build

# Kernel table (eager / torch.compile / fused); the training step of ours (torch / fused kernels,
# eager / torch.compile) against a plain PyTorch GPT, added to the same bench/results/<device>.md;
# then our DeepSpeed loop against a plain loop (bench/results/train-cpu.md).
bench: $(STAMP) ## kernel table, training step against plain PyTorch, our loop against a plain loop
	$(PY) bench/bench_kernels.py
	$(PY) bench/bench_step.py
	$(PY) bench/bench_train.py --steps 20 --rounds 3

bench-train: $(STAMP) ## tokens/s of our loop against a plain PyTorch loop (bench/results/train-cpu.md)
	$(PY) bench/bench_train.py $(ARGS)

# Per-rank memory of ZeRO 0-3 on 2 and 4 processes against the ZeRO paper's formulas.
bench-parallel: $(STAMP) ## per-rank ZeRO 0-3 memory against the paper's formulas
	$(PY) bench/bench_parallel.py $(ARGS)

# Decoding tokens/s: DecodeEngine's continuous batching against the old static-batch GPT.generate
# (bench/static_generate.py) on 16 requests of ragged and of equal lengths -> bench/results/generate-cpu.md.
bench-generate: $(STAMP) ## decoding engine against the static-batch decoder
	$(PY) bench/bench_generate.py $(ARGS)

bench-onnx: $(STAMP) ## ONNX Runtime fp32/int8 and int8 weight-only PyTorch against eager (bench/results/onnx-cpu.md)
	$(PY) bench/bench_onnx.py $(ARGS)

# OpenSpiel's CFR and XFP beside the game-* runs (train them first): NashConv against iterations and seconds.
bench-games: $(STAMP) ## OpenSpiel CFR and XFP and our tabular PSRO beside our game runs (bench/results/games-cpu.md)
	$(PY) bench/bench_games.py --runs $(wildcard runs/game-kuhn runs/game-rps-biased runs/game-leduc runs/game-leduc-psro) $(ARGS)

# Every sync strategy side by side at the same token budget, 4 replicas, then 8 (bench/results/sync-cpu*.md),
# and our ring all-reduce against gloo's (bench/results/ring-cpu.md).
bench-sync: $(STAMP) ## every sync strategy at the same token budget; our ring against gloo's
	$(PY) bench/bench_sync.py --replicas 4 --steps 200 $(ARGS)
	$(PY) bench/bench_sync.py --replicas 8 --steps 100 $(ARGS)
	$(PY) bench/bench_ring.py

# Serving, three parts (about 6 minutes): 16 concurrent OpenAI clients against the same 16 requests one
# at a time; Poisson arrivals at several rates and a shared-prefix multi-agent trace; 3 replicas behind
# the router, cache-aware against round-robin -> bench/results/serve-cpu.md and .json.
bench-serve: $(STAMP) ## serving: batching (chunked vs whole prefill), Poisson load, the router over 3 replicas, prefix cache, chunked prefill (bench/results/serve-cpu.md)
	$(PY) bench/bench_serve.py $(ARGS)

# The agents layer's speed goals, each a ratio measured side by side in one run: batched multi-agent
# rollouts against agent by agent (rollout-cpu.md), 8 LoRA adapters per batch against none (lora-cpu.md),
# a policy-gradient update against a pre-training step of the same model (pg-step-cpu.md); then
# marl-signaling over seeds and entropy weights (signaling-cpu.md, about an hour).
bench-agents: $(STAMP) ## agents: rollouts, LoRA batching, policy-gradient step, signaling and split-arith learning (bench/results/)
	$(PY) bench/bench_rollout.py --threads 1 --rounds 5
	$(PY) bench/bench_lora.py --threads 1
	$(PY) bench/bench_pg_step.py --threads 1
	$(PY) bench/bench_signaling.py
	$(PY) bench/bench_split_arith.py --parallel 2

bench-serve-tp: $(STAMP) ## tensor-parallel serving: tokens/s and memory per rank, --tp 2 against one process (bench/results/serve-tp*.md)
	$(PY) bench/bench_serve_tp.py $(ARGS)
	$(PY) bench/bench_serve_tp_load.py

bench-debate: $(STAMP) ## debate-arith over 3 seeds (one shared base) -> bench/results/debate-cpu.md
	$(PY) bench/bench_debate.py --seeds 0 1 2

# One script for a lent H100/H200 (see bench/gpu_check.sh); its table lands in bench/results/.
gpu-check: ## on a GPU machine: build the CUDA kernels, run the gpu tests and benchmarks
	bash bench/gpu_check.sh

# Wheels that gpu-check installs on a machine without network (pytest, ninja and their deps), for
# each Python the GPU machine may have.  pip evaluates dependency markers with this interpreter even
# with --python-version, so pytest's extra dependencies below Python 3.11 are named explicitly.
GPU_WHEEL_PYTHONS ?= 3.9 3.10 3.11 3.12 3.13
gpu-wheels: $(STAMP) ## make what gpu-check needs offline: wheels (build/gpu-wheels), training data (build/gpu-data), an ONNX decoder (build/gpu-onnx)
	for v in $(GPU_WHEEL_PYTHONS); do \
	  $(PY) -m pip download --quiet --only-binary=:all: --python-version $$v -d build/gpu-wheels \
	    pytest ninja exceptiongroup tomli typing_extensions || exit 1; \
	done
	$(PY) bench/gpu_train.py prepare build/gpu-data
	$(PY) bench/gpu_onnx.py prepare build/gpu-onnx

# make slurm RECIPE=<name> [NODES=n GPUS_PER_NODE=g PARTITION=p TIME=hh:mm:ss ACCOUNT=a ARGS="..." DRY_RUN=1]
slurm: $(STAMP) ## submit RECIPE to Slurm (NODES= GPUS_PER_NODE= PARTITION= TIME= ACCOUNT= DRY_RUN=1)
	$(PY) -m launch slurm $(RECIPE) $(ARGS) \
	  $(if $(NODES),--nodes $(NODES)) $(if $(GPUS_PER_NODE),--gpus-per-node $(GPUS_PER_NODE)) \
	  $(if $(PARTITION),--partition $(PARTITION)) $(if $(TIME),--time $(TIME)) \
	  $(if $(ACCOUNT),--account $(ACCOUNT)) $(if $(DRY_RUN),--dry-run)

clean: ## remove build outputs and the data cache (build/, .cache/, .pytest_cache/)
	rm -rf build .cache .pytest_cache
