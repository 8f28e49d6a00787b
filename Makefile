# Everything runs in the project's own virtual environment (.venv), so a PEP 668 system Python and a second
# checkout are never touched. Exact versions come from constraints.txt (the tested set; `make lock` renews it).
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: install demo test test-fast bench bench-trl lock

# torch 2.13.0 (CPU) comes from the machine's local wheel with plain pip.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Run the InstructGPT recipe on the embedded tiny default (offline, CPU).
demo: install
	$(BIN)/rl4llm run instructgpt
	$(BIN)/rl4llm compare instructgpt --last 1

# All tests, including the end-to-end pipeline runs.
test: install
	$(BIN)/python -m pytest -q --durations=15

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

# Renew constraints.txt: resolve pyproject.toml's ranges in a scratch environment and freeze the result.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q -e ".[test,bench]"
	(echo "# The exact tested set of rl4llm's dependencies (make lock); make install uses it as pip constraints."; \
	 .lock-venv/bin/python -m pip freeze --exclude-editable) > constraints.txt
	rm -rf .lock-venv
