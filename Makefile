# Two commands matter: `make demo` and `make test`. Each builds the venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first and pinned in every pip call: unpinned, pip resolves a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q "verl[verl-core]==0.9.1" $(TORCH)
	$(PIP) install -q -e ".[dev]" $(TORCH)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/verl-anchor demo

# Style first (seconds): ruff's lint (pyflakes, pycodestyle, import order, bugbear) and its formatter.
test: venv
	$(VENV)/bin/ruff check verl_anchor tests benchmarks
	$(VENV)/bin/ruff format --check verl_anchor tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: venv
	$(PY) benchmarks/bench_stats.py

clean:
	rm -rf $(VENV)
