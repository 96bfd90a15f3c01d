# Two commands for a fresh machine:  make demo   (install + run the whole job on built-in data)
#                                    make test   (install + run the test suite)
PYTHON ?= python3
VENV   ?= .venv
# The PyTorch pair the project is tested with; override e.g. TORCH_SPEC="torch torchvision" for the newest.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/cxrlab demo --out demo_run

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not browser"

clean:
	rm -rf $(VENV) demo_run .pytest_cache
