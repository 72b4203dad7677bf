# The two commands a new user needs (see README):
#   make battle   - set everything up, run the default study, print where the report is
#   make test     - set everything up (the browser test's Chromium included), run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.spach-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium

.PHONY: battle test setup data browser

battle: setup data
	$(BIN)/spach battle $(ARGS)

test: setup browser
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

# The browser test drives Debian's chromium through Playwright (pip, from the test extra); Playwright's
# own browser download is not reachable from every machine, so it is not used. Not root: the test
# skips with its reason (and fails under CI, where it must run).
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		(apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)); \
	else \
		echo "note: $(CHROMIUM) is missing and installing it needs root ('sudo apt-get install chromium'); the browser test will skip"; \
	fi
