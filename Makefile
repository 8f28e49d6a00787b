PYTHON ?= python3
STAMP := .make/installed

.PHONY: install demo test test-fast bench

# Install the project and its dependencies (torch 2.13.0 CPU comes from the machine's local wheel with plain pip).
$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q -e ".[test]"
	mkdir -p .make && touch $(STAMP)

install: $(STAMP)

# Run the InstructGPT recipe on the embedded tiny default (offline, CPU).
demo: install
	rl4llm run instructgpt
	rl4llm compare instructgpt --last 1

# All tests, including the end-to-end pipeline runs.
test: install
	$(PYTHON) -m pytest -q --durations=15

test-fast: install
	$(PYTHON) -m pytest -q -m "not e2e"

# Wall time of each pipeline from a clean directory, with every stage's metrics (run on an idle machine).
bench: install
	for p in instructgpt instructgpt-dpo deepseek-r1-zero deepseek-r1; do \
		$(PYTHON) benchmarks/pipeline_wall_time.py --pipeline $$p; done
