# Two commands do all the set-up on a fresh machine (Python >= 3.10 and a package registry are all they need):
#   make run    create .venv, install gateify, run the main job on the offline default (animals-c, ResNet-20 pruned
#               statically to 40% of its FLOPs and fine-tuned with what 5 epochs of routing would cost: 9 epochs)
#   make test   create .venv, install gateify with its test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	# the offline benchmark's images ship in this wheel; --no-deps: its declared TensorFlow dependency is not needed
	$(PY) -m pip install --quiet --no-deps 'animal-mnist==0.4'
	touch $@

run: $(VENV)/.installed
	$(PY) examples/finetune_cifar.py --dataset animals-c --dense-epochs 10 --epochs 9 --workers 0 --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
