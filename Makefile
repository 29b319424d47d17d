# The README's two commands: `make run` (set up, then run the platform's main job on the
# embedded default) and `make test` (set up, then pass the tests). CI calls `make test`.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev

.PHONY: setup tools run test lint format bench clean manifests

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch alone first: the pinned CPU wheel (resolved with the rest, pip could fetch a CUDA build).
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

tools:
	./scripts/install-tools.sh

run: setup
	$(BIN)/zimage-platform serve

lint: setup
	$(BIN)/ruff check src tests bench helm
	$(BIN)/ruff format --check src tests bench helm

test: lint tools
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(BIN)/pytest

format: setup
	$(BIN)/ruff check --fix src tests bench helm
	$(BIN)/ruff format src tests bench helm

# The chart's values.schema.json (from the platform config's schema) and deploy/manifests/ (helm
# template of each profile); tests/deploy fails when either is stale.
manifests: setup tools
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(BIN)/python helm/render.py

bench: setup
	$(BIN)/python -m bench engine

clean:
	rm -rf $(VENV) var engines/build .pytest_cache .ruff_cache
