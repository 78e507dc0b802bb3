# What a newcomer types after `git clone`: `make demo` and `make test`.
# `make test` runs the suite on the upper end of the supported range (constraints.txt),
# `make test-oldest` on the lower end, Kaggle's TPU image (constraints-oldest.txt); CI runs both.
# Each venv is created on first use and reinstalled only when the package metadata changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OLD_VENV  := .venv-oldest
OLD_PY    := $(OLD_VENV)/bin/python
OLD_STAMP := $(OLD_VENV)/.installed
# `make wheelhouse PLATFORM=my-freeze.txt` builds for another platform's pins (`pip freeze` there).
PLATFORM   ?= constraints-oldest.txt
WHEELHOUSE ?= wheelhouse
PYTEST = -m pytest -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder --durations=15

.PHONY: demo test test-fast test-oldest install install-oldest wheelhouse clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off --upgrade pip
	# constraints.txt pins the torch/torchvision pair the suite is tested with.
	$(PY) -m pip install --progress-bar off -c constraints.txt -e ".[dev,demo]"
	touch $(STAMP)

# The lower end, installed the way a user meets it: the platform's packages first (as Kaggle's
# image has them), then torch2flax on top, offline from a wheelhouse, which must change none of them.
$(OLD_STAMP): setup.cfg pyproject.toml constraints-oldest.txt .ci/platform_pip.py
	rm -rf $(OLD_VENV) build/wheelhouse-oldest
	$(PYTHON) -m venv $(OLD_VENV)
	$(OLD_PY) -m pip install --quiet --progress-bar off --upgrade pip
	$(OLD_PY) -m pip install --progress-bar off -r constraints-oldest.txt
	# `pip install --dry-run` of torch2flax: fails if jax, jaxlib, libtpu, flax, optax, torch,
	# torchvision or numpy would change.
	$(OLD_PY) .ci/platform_pip.py check ".[dev,demo]"
	$(OLD_PY) .ci/platform_pip.py wheelhouse --platform constraints-oldest.txt --out build/wheelhouse-oldest
	# No index at all (PIP_CONFIG_FILE=/dev/null drops any configured mirror or find-links).
	PIP_CONFIG_FILE=/dev/null $(OLD_PY) -m pip install --no-index --find-links build/wheelhouse-oldest torch2flax
	$(OLD_PY) -m pip install --progress-bar off -e ".[dev,demo]"
	$(OLD_PY) .ci/platform_pip.py same constraints-oldest.txt
	touch $(OLD_STAMP)

install: $(STAMP)

install-oldest: $(OLD_STAMP)

demo: $(STAMP)
	$(VENV)/bin/torch2flax demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) $(PYTEST) -m "not cross_stack"

# The edit-test loop: every module's unit tests, without subprocess runs, fits or full-size models
# (the `slow` tier, listed in tests/conftest.py). Tests are spread one by one, not file by file.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n auto --maxprocesses 4 --dist load -m "not slow and not cross_stack" -q

# Also the cross-stack tests: model files written here load on the upper stack and back.
# XLA's default optimisation everywhere here (tests/conftest.py compiles most of `make test` without it).
test-oldest: $(OLD_STAMP) $(STAMP)
	TORCH2FLAX_TEST_XLA_DEFAULTS=1 TORCH2FLAX_OTHER_PYTHON=$(abspath $(PY)) $(OLD_PY) $(PYTEST)

# torch2flax's wheel plus the wheels of what the platform lacks, for an offline install (a Kaggle
# dataset): pip install --no-index --find-links DIR torch2flax. Build it with the platform's Python.
wheelhouse:
	$(PYTHON) .ci/platform_pip.py wheelhouse --platform $(PLATFORM) --out $(WHEELHOUSE)

clean:
	rm -rf $(VENV) $(OLD_VENV) runs .pytest_cache build $(WHEELHOUSE)
