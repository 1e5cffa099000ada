# A newcomer's targets: install, test, lint, demo, bench, docs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and on its own, pinned, so that pip does not pick the newest
# release (a multi-GB CUDA build) when a matching build is already available locally.
# Override for a GPU machine, e.g. `make install TORCH="torch==2.13.0 --index-url <cuda index>"`.
TORCH ?= torch==2.13.0

.PHONY: install test lint demo bench effect docs clean

install: $(BIN)/safelora

$(BIN)/safelora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[test]'

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check safelora_cli tests benchmarks
	$(BIN)/mypy safelora_cli

demo: install
	rm -rf demo
	$(BIN)/safelora demo demo
	$(BIN)/safelora patch --base demo/base --aligned demo/aligned --adapter demo/adapter --out demo/patched
	$(BIN)/safelora inspect --base demo/base --aligned demo/aligned --adapter demo/adapter --sort cosine

# bench_adapter.py: peak memory with an r = 8 and an r = 64 adapter on the same models (~4 GB of data).
# bench_subspace.py: subspace files (exact and rank 8) against the two-model run, 1.1B shape.
bench: install
	$(BIN)/python benchmarks/bench_patch.py
	$(BIN)/python benchmarks/bench_adapter.py bench-data
	$(BIN)/python benchmarks/bench_subspace.py --shape 1b --ranks 8

# Does patching restore refusals and keep the task? Trains a toy trio, patches, evaluates (docs/effect.md).
# `install` brings transformers and peft (the eval extra) with the test extra.
effect: install
	$(BIN)/python benchmarks/effect/run.py --out build/effect

docs: install
	$(BIN)/python -m safelora_cli.clidoc > docs/cli.md

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache .mypy_cache .ruff_cache
