# make demo: the main job on synthetic faces;  make test: the test suite.
# Both first build .venv with the pinned requirements, once.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

demo: $(VENV)/.installed
	$(BIN)/kfkd demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/load.py
	$(BIN)/python bench/epochs.py

# torch goes in first and by exact version: an unpinned torch would pull a
# multi-GB CUDA build where a CPU one is wanted.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $$(grep '^torch==' requirements.txt)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
