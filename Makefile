# Fresh-machine set-up: `make demo` runs the monitored demo, `make test` runs the suite.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# verl 0.9 pins transformers<5.11, which the main environment's TRL needs newer: its
# tests run in a second environment with compass-monitor[verl] (tests/test_integration_verl.py).
VERL_VENV  ?= .venv-verl
VERL_PY    := $(VERL_VENV)/bin/python
VERL_STAMP := $(VERL_VENV)/.installed

.PHONY: demo test test-main test-verl install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned first: the local wheel is a CPU build; a bare `torch` pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,demo,tui]'
	touch $(STAMP)

$(VERL_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install --quiet --upgrade pip
	$(VERL_PY) -m pip install --quiet torch==2.13.0
	$(VERL_PY) -m pip install --quiet -e '.[verl]' 'pytest>=8'
	touch $(VERL_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/compass-monitor demo

test: test-main test-verl

test-main: $(STAMP)
	$(PY) -m pytest -q

# COMPASS_REQUIRE_VERL: here a missing verl is a failure, not a skip.
test-verl: $(VERL_STAMP)
	COMPASS_REQUIRE_VERL=1 $(VERL_PY) -m pytest -q -p no:cacheprovider tests/test_integration_verl.py

bench: $(STAMP)
	$(PY) bench/bench_snapshot_cpu.py
	$(PY) bench/bench_tui.py

clean:
	rm -rf $(VENV) $(VERL_VENV) runs .pytest_cache
