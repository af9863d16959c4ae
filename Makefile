# Two commands set everything up on a fresh machine: `make train` and `make test`.
# Both create .venv from requirements.txt when it is missing or older than requirements.txt.

PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
RECIPE      ?= gpt-tiny
ARGS        ?=
RUN         ?=
OUT         ?=
PYTEST_ARGS ?=

.PHONY: train test validate export recipes bench bench-train bench-parallel bench-generate bench-sync kernels lint gpu-check clean slurm docs gpu-wheels

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

train: $(STAMP)
	$(PY) -m launch train $(RECIPE) $(ARGS)

validate: $(STAMP)
	$(PY) -m launch validate $(RECIPE) $(ARGS)

recipes: $(STAMP)
	@$(PY) -m launch recipes

export: $(STAMP)
	@test -n "$(RUN)" -a -n "$(OUT)" || { echo "usage: make export RUN=runs/<name> OUT=<dir>" >&2; exit 2; }
	$(PY) -m launch export $(RUN) $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

bench-train: $(STAMP)
	$(PY) bench/bench_train.py $(ARGS)

# Decoding tokens/s: DecodeEngine's continuous batching against the old static-batch GPT.generate
# (bench/static_generate.py) on 16 requests of ragged and of equal lengths -> bench/results/generate-cpu.md.
bench-generate: $(STAMP)
	$(PY) bench/bench_generate.py $(ARGS)

kernels: $(STAMP)
	$(PY) -m model.kernels.build

# Kernel table (eager / torch.compile / fused); the training step of ours (torch / fused kernels,
# eager / torch.compile) against a plain PyTorch GPT, added to the same bench/results/<device>.md;
# then our DeepSpeed loop against a plain loop (bench/results/train-cpu.md).
bench: $(STAMP)
	$(PY) bench/bench_kernels.py
	$(PY) bench/bench_step.py
	$(PY) bench/bench_train.py --steps 20 --rounds 3

# One script for a lent H100/H200 (see bench/gpu_check.sh); its table lands in bench/results/.
gpu-check:
	bash bench/gpu_check.sh

# Wheels that gpu-check installs on a machine without network (pytest, ninja and their deps), for
# each Python the GPU machine may have.  pip evaluates dependency markers with this interpreter even
# with --python-version, so pytest's extra dependencies below Python 3.11 are named explicitly.
GPU_WHEEL_PYTHONS ?= 3.9 3.10 3.11 3.12 3.13
gpu-wheels: $(STAMP)
	for v in $(GPU_WHEEL_PYTHONS); do \
	  $(PY) -m pip download --quiet --only-binary=:all: --python-version $$v -d build/gpu-wheels \
	    pytest ninja exceptiongroup tomli typing_extensions || exit 1; \
	done

clean:
	rm -rf build .cache .pytest_cache

# make slurm RECIPE=<name> [NODES=n GPUS_PER_NODE=g PARTITION=p TIME=hh:mm:ss ACCOUNT=a ARGS="..." DRY_RUN=1]
slurm: $(STAMP)
	$(PY) -m launch slurm $(RECIPE) $(ARGS) \
	  $(if $(NODES),--nodes $(NODES)) $(if $(GPUS_PER_NODE),--gpus-per-node $(GPUS_PER_NODE)) \
	  $(if $(PARTITION),--partition $(PARTITION)) $(if $(TIME),--time $(TIME)) \
	  $(if $(ACCOUNT),--account $(ACCOUNT)) $(if $(DRY_RUN),--dry-run)

# Regenerate the README's config reference from trainer/schema.py.
docs: $(STAMP)
	$(PY) -c "import re,sys; from launch.cli import config_reference as c; p='README.md'; s=open(p).read(); \
	open(p,'w').write(re.sub(r'<!-- config-reference:start -->.*<!-- config-reference:end -->', lambda m: '<!-- config-reference:start -->\n'+c()+'<!-- config-reference:end -->', s, flags=re.S))"

# Every sync strategy side by side at the same token budget, 4 replicas, then 8 (bench/results/sync-cpu*.md),
# and our ring all-reduce against gloo's (bench/results/ring-cpu.md).
bench-sync: $(STAMP)
	$(PY) bench/bench_sync.py --replicas 4 --steps 200 $(ARGS)
	$(PY) bench/bench_sync.py --replicas 8 --steps 100 $(ARGS)
	$(PY) bench/bench_ring.py

# Per-rank memory of ZeRO 0-3 on 2 and 4 processes against the ZeRO paper's formulas.
bench-parallel: $(STAMP)
	$(PY) bench/bench_parallel.py $(ARGS)
