# The two commands a new user needs (see README):
#   make battle   - set everything up, run the default study, print where the report is
#   make test     - set everything up (the browser test's Chromium included), run the test suite
#   make docs     - build the documentation site into docs/_build/html (offline; a warning fails it)
# Dependencies install at the versions the suite last passed with (constraints.txt), so a new release
# of torch, timm, Pillow, ... cannot break a fresh install. Newer ones:
#   make setup LATEST=1  - upgrade this venv to the newest releases (then make test, and make constraints to record them)
#   make test-latest     - try the newest releases in a separate venv (.venv-latest), leaving .venv alone
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.spach-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium

CONSTRAINTS := constraints.txt
LATEST_VENV := .venv-latest
# LATEST=1: no constraints, every package upgraded, and the install runs even when the venv is set up
PIN := $(if $(LATEST),--upgrade --upgrade-strategy eager,-c $(CONSTRAINTS))

.PHONY: battle test docs setup data browser constraints test-latest FORCE

battle: setup data
	$(BIN)/spach battle $(ARGS)

test: setup browser
	$(BIN)/python -m pytest -q $(ARGS)

# The site: MyST pages, the CLI, study-file and Python references generated from the code (docs/conf.py).
# -n: a broken cross-reference is a warning, and -W makes every warning an error; nothing is fetched.
docs: setup
	$(BIN)/sphinx-build -W --keep-going -n -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) $(if $(LATEST),FORCE)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIN) torch torchvision
	$(BIN)/pip install -q $(PIN) -e '.[test]'
	touch $(STAMP)

# Record the versions installed now (run it after 'make setup LATEST=1' and a passing 'make test').
constraints: setup
	{ sed -n '/^#/p' $(CONSTRAINTS); $(BIN)/pip freeze --exclude-editable | grep -v '^spach'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# The newest releases in a venv of their own: does the suite still pass? (.venv and constraints.txt stay as they are)
test-latest: browser
	test -d $(LATEST_VENV) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager torch torchvision
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[test]'
	$(LATEST_VENV)/bin/pip freeze --exclude-editable | diff $(CONSTRAINTS) - | grep '^[<>] [^#]' || true
	$(LATEST_VENV)/bin/python -m pytest -q $(ARGS)

FORCE:

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
