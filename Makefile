# make demo: the main job on synthetic faces;  make test: the test suite.
# Both first build .venv with the pinned requirements, once.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test notebook notebook-check bench clean

demo: $(VENV)/.installed
	$(BIN)/kfkd demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# tutorial.ipynb, executed top to bottom as a reader runs it (demo data, the epoch
# scale it picks for this machine), its outputs kept: what the repository shows.
notebook: $(VENV)/.installed
	rm -rf build/notebook && mkdir -p build/notebook && cp tutorial.ipynb build/notebook/
	cd build/notebook && env -u KFKD_DATA -u KFKD_EPOCH_SCALE $(CURDIR)/$(BIN)/jupyter execute \
		--inplace --timeout=7200 tutorial.ipynb
	cp build/notebook/tutorial.ipynb tutorial.ipynb

# The same on small demo data at a tiny epoch scale, for CI: any cell's error fails it.
notebook-check: $(VENV)/.installed
	rm -rf build/notebook-check && mkdir -p build/notebook-check && cp tutorial.ipynb build/notebook-check/
	$(BIN)/python -c "import kfkd_demo; kfkd_demo.write_demo_data('build/notebook-check/data', 1500, 100)"
	cd build/notebook-check && KFKD_DATA=data KFKD_EPOCH_SCALE=0.0001 KFKD_CACHE=cache \
		$(CURDIR)/$(BIN)/jupyter execute --inplace --timeout=1800 tutorial.ipynb

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
