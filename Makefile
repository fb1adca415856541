# The two commands a new user needs:
#   make demo   - boot a kernel on the built-in tiny model and show what it does
#   make test   - install everything into .venv and run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-models docs-models demo bench docs clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0      # the CPU build on local disk (see README)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q -e tests/plugins/echo   # a third-party service plug-in the tests use
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VENV)/bin/pytest -q -m "not models"
	$(MAKE) test-models

# Every causal LM of the installed transformers, tiny and random: exact or refused at load
# (6-8 minutes on 2 cores).
test-models: install
	$(VENV)/bin/pytest -q -m models tests/test_model_zoo.py

# docs/models.md from a real sweep (exits 1, after writing, if a row is WRONG or FAILS)
docs-models: install
	$(PY) tests/model_table.py docs/models.md

demo: install
	$(PY) -m llmos.userland.demo

bench: install
	$(PY) bench/syscall_latency.py

docs: install
	$(PY) -m llmos.syscalls.docgen

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
