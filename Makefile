# Two targets a newcomer types after `git clone`: `make demo` and `make test`.
# Both create .venv on first use and reinstall only when the package metadata changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off --upgrade pip
	# constraints.txt pins the torch/torchvision pair the suite is tested with.
	$(PY) -m pip install --progress-bar off -c constraints.txt -e ".[dev,demo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/torch2flax demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache
