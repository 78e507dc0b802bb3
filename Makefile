# What a newcomer types after `git clone`: `make demo` and `make test`.
# `make test` runs the suite on this machine's Python 3.11 with today's releases (constraints.txt).
# The platforms users train on are pin sets in platforms/ (Kaggle's TPU image, Colab's TPU and GPU
# runtimes, the newest releases on Python 3.13), each a venv of its own made by .ci/stack:
# `make test-platform STACK=newest` (TIER=core for the fast tier plus parity and training).
# CI (.ci/run) runs them all.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STACK ?= newest
TIER  ?= full
# `make wheelhouse PLATFORM=platforms/kaggle-tpu.txt` builds Kaggle's offline install for the Python
# its first line names (3.12 there); PYTHON_VERSION=... overrides it.
PLATFORM   ?= platforms/kaggle-tpu.txt
PYTHON_VERSION ?= $(shell sed -n 's/^\# python: *//p' $(PLATFORM) | head -n 1)
WHEELHOUSE ?= wheelhouse
PYTEST = -m pytest -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder --durations=15

.PHONY: demo test test-tpu-search test-fast test-oldest test-platform install install-oldest wheelhouse clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off --upgrade pip
	# constraints.txt pins the torch/torchvision pair the suite is tested with.
	$(PY) -m pip install --progress-bar off -c constraints.txt -e ".[dev,demo]"
	touch $(STAMP)

install: $(STAMP)

install-oldest:
	.ci/stack kaggle-tpu install

demo: $(STAMP)
	$(VENV)/bin/torch2flax demo

# The TPU compile tests (tests/test_tpu_check.py) load the libtpu this venv's jax pairs with,
# downloaded once per machine and never installed into the venv (.ci/libtpu.py says why);
# `.ci/libtpu.py extra` checks that `pip install torch2flax[tpu-check]` brings that libtpu, keeping jax.
LIBTPU = TORCH2FLAX_TEST_LIBTPU=$$($(PYTHON) .ci/libtpu.py path $(VENV))

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/torch2flax doctor
	$(PY) .ci/libtpu.py extra
	$(LIBTPU) $(PY) $(PYTEST) -m "not cross_stack and not tpu_search"

# The TPU compiles near the HBM limit (tests/test_tpu_check.py, ~2 minutes): apart from `make test`,
# whose pytest run stays under 8 minutes on 2 cores; .ci/run runs both. The stacks leave it out (.ci/stack).
test-tpu-search: $(STAMP)
	$(LIBTPU) $(PY) -m pytest -m tpu_search -q

# The edit-test loop: every module's unit tests, without subprocess runs, fits, full-size models or
# TPU compiles (the `slow` marker on the tests: no libtpu needed). Tests are spread one
# by one, not file by file.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n auto --maxprocesses 4 --dist load -m "not slow and not cross_stack" -q

# A platform's stack (platforms/$(STACK).txt), installed as its users meet it: the platform's
# packages first, then torch2flax offline from a wheelhouse, which must change none of them.
test-platform:
	.ci/stack $(STACK) test $(TIER)

# The lower end, Kaggle's TPU image, with the cross-stack tests (model files and portable programs
# written there load on the upper end and back). Not with XLA's default optimisation any more (TORCH2FLAX_TEST_XLA_DEFAULTS=1): on
# jax 0.7.2 + torch 2.8 the wide_resnet50_2 (layers 1,1,1,1) train-step parity is then 8.6e-4 off in
# 2 of 53 gradients, also at 685d0a3 with today's venv (2026-12-07, open: measure against float64).
# The other end is the newest releases' stack (jax 0.12) where .ci/stack made it, else .venv's.
OTHER_PYTHON = $(if $(wildcard .venv-newest/pyvenv.cfg),.ci/trixie run $(abspath .venv-newest/bin/python),$(abspath $(PY)))
test-oldest: $(STAMP)
	TORCH2FLAX_OTHER_PYTHON="$(OTHER_PYTHON)" .ci/stack kaggle-tpu test $(TIER)

# torch2flax's wheel plus the wheels of what the platform lacks, for an offline install (a Kaggle
# dataset): pip install --no-index --find-links DIR torch2flax. Built for the platform's Python, from here.
wheelhouse:
	$(PYTHON) .ci/platform_pip.py wheelhouse --platform $(PLATFORM) --out $(WHEELHOUSE) --python-version $(PYTHON_VERSION)

clean:
	rm -rf $(VENV) .venv-* runs .pytest_cache build $(WHEELHOUSE)
