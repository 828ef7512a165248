# Two commands for a new machine: `make demo` runs the main job, `make test` runs the tests; each installs
# what is missing first (scripts/setup.sh, skipped in a second when everything is there).
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test lint mutation

setup:
	@$(PYTHON) scripts/check_env.py 2>/dev/null || PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) -m moalign.cli demo

test: setup
	ruff check .
	$(PYTHON) -m pytest -q

lint: setup
	ruff check .

# mutation testing of the numerical and selection modules (a developer tool, not part of CI; slow)
mutation: setup
	$(PYTHON) -m pip install -q -e ".[mutation]"
	$(PYTHON) -m mutmut run
