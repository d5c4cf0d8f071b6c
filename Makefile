# Two commands do all the set-up on a fresh machine (Python >= 3.10 and a package registry are all they need):
#   make run    create .venv, install gateify, run the main job on the offline default
#   make test   create .venv, install gateify with its test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) examples/finetune_cifar.py --dataset digits --dense-epochs 15 --epochs 15 --workers 0 --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
