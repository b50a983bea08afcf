# The two commands of the README. Each one sets up what it needs (scripts/setup.sh) and then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl

.PHONY: setup demo quick test test-fast lint format bench clean

setup:
	@bash scripts/setup.sh

demo: setup          ## the whole pipeline on the built-in Meta-World default
	$(VENV)/bin/wm demo --profile default --out demo

quick: setup         ## the 5-minute smoke version of the demo
	$(VENV)/bin/wm demo --profile quick --out demo-quick

test: lint           ## the lint, then the test suite (what CI runs)
	$(PY) -m pytest -q tests

test-fast: setup     ## skips the long learning tests and the Slurm cluster
	$(PY) -m pytest -q -m "not slow and not slurm" tests

lint: setup          ## ruff: the rules in pyproject.toml [tool.ruff.lint], and the tree formatted as ruff format does
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup        ## ruff format (style in pyproject.toml [tool.ruff]): run it before committing; make lint checks it
	$(VENV)/bin/ruff format .

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf .pytest_cache build *.egg-info
