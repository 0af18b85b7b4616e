# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each (re)creates the virtualenv in $(VENV) from uv.lock when pyproject.toml or uv.lock changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test env lock lock-check clean bench browser image container-engine

# uv.lock is the one dependency set (make, CI, docker/Dockerfile). `uv sync --frozen` installs
# exactly the locked versions and fails instead of re-resolving; --inexact keeps packages the
# lock does not name (uv's bootstrap, a debugger you added). uv itself is bootstrapped with pip,
# then the lock's uv (the test extra) replaces it.
$(STAMP): pyproject.toml uv.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade uv
	UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv sync --frozen --inexact --extra test --python $(BIN)/python
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/invariance demo

# The report test opens reports/index.html in a real headless browser: Debian's chromium
# (playwright drives it through executable_path; its own browser download is not used).
browser:
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The image test (tests/test_image.py) builds docker/Dockerfile with a real engine: Debian's docker.io
# (dockerd, started by the test on its own socket) and debootstrap (a stand-in base image made from
# the Debian mirror where no registry serves rayproject/ray).
container-engine:
	command -v dockerd >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap)

test: $(STAMP) browser container-engine
	$(BIN)/python -m pytest -q -ra

# The driver/worker image (docker/README.md). BASE_IMAGE: another base, e.g. the stand-in of
# docker/base-standin.sh on a machine that reaches no registry.
IMAGE      ?= ghcr.io/lab/invariance:0.1.0-ray2.60.0-cu128
VARIANT    ?= cu128
BASE_IMAGE ?=
image:
	docker build -f docker/Dockerfile --build-arg VARIANT=$(VARIANT) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) -t $(IMAGE) .

# After editing dependencies in pyproject.toml: re-resolve, then commit uv.lock.
lock: $(STAMP)
	$(BIN)/uv lock

# Fails when uv.lock no longer matches pyproject.toml (CI runs it).
lock-check: $(STAMP)
	$(BIN)/uv lock --check

bench: $(STAMP)
	$(BIN)/python bench/bench_shards_vs_pairwise.py
	$(BIN)/python bench/bench_memory.py
	$(BIN)/python bench/bench_throughput.py
	$(BIN)/python bench/bench_reads.py
	$(BIN)/python bench/bench_feature_api.py
	$(BIN)/python bench/bench_reruns.py
	$(BIN)/python bench/bench_storage.py

clean:
	rm -rf $(VENV) invariance-demo .pytest_cache
