# The two commands a new user needs (see README):
#   make battle   - set everything up, run the default study, print where the report is
#   make test     - set everything up, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.spach-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: battle test setup data

battle: setup data
	$(BIN)/spach battle $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (no downloads at run time).
data: $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu) and retry"; exit 1; \
	fi
