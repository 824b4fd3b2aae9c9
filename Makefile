# make demo: the main job on synthetic faces;  make test: the test suite.
# Both first build .venv with the pinned requirements, once.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow notebook notebook-check wheel-check bench clean

demo: $(VENV)/.installed
	$(BIN)/kfkd demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# The slow tier (pytest -m slow): the demo's whole job, specialists in two jobs and on Dask.
test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

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

# The package as a user gets it: the wheel, installed (not editable) with its
# extras into a fresh environment and used from outside the checkout; every
# kfkd*.py and kfkd_engine module of the checkout must import from there, and
# the pretrained model and face detector it ships must load.
WHEEL := build/wheel
wheel-check: $(VENV)/.installed
	rm -rf $(WHEEL) && mkdir -p $(WHEEL)
	$(BIN)/python -m pip wheel -q --no-deps --wheel-dir $(WHEEL) .
	$(PYTHON) -m venv $(WHEEL)/venv
	$(WHEEL)/venv/bin/python -m pip install -q $$(grep '^torch==' requirements.txt)
	$(WHEEL)/venv/bin/python -m pip install -q -c requirements.txt \
		"$$(ls $(WHEEL)/kfkd-*.whl)[photo,dask,onnx,kaggle,tune]"
	cd $(WHEEL) && venv/bin/kfkd --help > /dev/null
	cd $(WHEEL) && venv/bin/python -c 'import kfkd_beyond, kfkd_detect; \
		kfkd_beyond.pretrained(), kfkd_detect.YuNet()'  # the files kfkd ships, from the wheel
	cd $(WHEEL) && venv/bin/python -c 'import importlib, sys; \
		outside = [m for m in sys.argv[1:] if "site-packages" not in importlib.import_module(m).__file__]; \
		sys.exit(f"not from the wheel: {outside}" if outside else print("the wheel: kfkd --help and", \
		len(sys.argv) - 1, "modules"))' $(basename $(wildcard kfkd*.py)) kfkd_engine \
		$(addprefix kfkd_engine.,$(filter-out __init__,$(basename $(notdir $(wildcard kfkd_engine/*.py)))))

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
