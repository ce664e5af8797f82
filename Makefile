# Two commands do everything on a fresh machine with Python >= 3.10:
#   make reproduce   set up .venv, train the default reproduction grid (3 seeds), then run every
#                    notebook on the grid's runs
#   make test        set up .venv, then run the test suite (notebooks included)
# The virtual environment is created when missing and refreshed when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hapkit-installed

.PHONY: setup reproduce test test-fast bench clean-results strip

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "hapkit needs Python >= 3.10, found " + sys.version'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[notebooks,faiss,timm,test]"
	touch $(STAMP)

# Main job: the default comparison grid on the embedded generated dataset, then notebooks/ through
# papermill, reading the grid's runs; everything lands under results/.
reproduce: $(STAMP)
	$(BIN)/hapkit reproduce --notebooks --seeds 3 --jobs 2 --out results

# Tests, including every notebook executed by nbval (defaults are CI-sized).
test: $(STAMP)
	$(BIN)/python -m pytest --nbval-lax tests notebooks

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" tests

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

strip: $(STAMP)
	$(BIN)/nbstripout notebooks/*.ipynb

clean-results:
	rm -rf results
