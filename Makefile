# Two commands for a new machine: `make demo` runs the main job, `make test` runs the tests; each installs
# what it is missing first (scripts/setup.sh demo|test, skipped in a second when everything is there): the demo
# only what the main job needs, the tests also the test tools and the local llama.cpp server.
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1
# test processes (pytest-xdist; each runs torch with one intra-op thread, tests/conftest.py): two on the 2-core
# machine this project is tested on; `make test WORKERS=1` runs the suite in one process
WORKERS ?= 2

.PHONY: setup setup-demo demo test lint mutation

setup-demo:
	@$(PYTHON) scripts/check_env.py demo 2>/dev/null || PYTHON=$(PYTHON) bash scripts/setup.sh demo

setup:
	@$(PYTHON) scripts/check_env.py test 2>/dev/null || PYTHON=$(PYTHON) bash scripts/setup.sh test

demo: setup-demo
	$(PYTHON) -m moalign.cli demo

test: setup
	ruff check .
	$(PYTHON) -m pytest -q -p no:benchmark $(if $(filter-out 1,$(WORKERS)),-n $(WORKERS) --dist worksteal)

lint: setup
	ruff check .

# mutation testing of the training half's numerical core (a developer tool, not part of CI; ~30 mutants/min)
mutation: setup
	$(PYTHON) -m pip install -q -e ".[mutation]"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false $(PYTHON) -m mutmut run
