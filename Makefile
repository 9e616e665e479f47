# The two commands a newcomer needs: `make lab` and `make test`. Both set the machine up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup lab lab-down test lint bench clean

setup:
	bash scripts/setup.sh

lab: setup
	bash scripts/lab-demo.sh

lab-down: setup
	$(VENV)/bin/ztagent lab down

test: setup lint
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy agent bpf caserver cli credentials identity lab mesh policy serving sources tunnel waypoint
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
