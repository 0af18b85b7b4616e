# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each (re)creates the virtualenv in $(VENV) when pyproject.toml changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test env clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade uv
	# uv resolves the CUDA build of torch from PyPI; it runs fine on CPU.
	$(BIN)/uv pip install --python $(BIN)/python -e '.[test]' \
	  || $(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/invariance demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python bench/bench_shards_vs_pairwise.py
	$(BIN)/python bench/bench_memory.py

clean:
	rm -rf $(VENV) invariance-demo .pytest_cache
