# The two commands a newcomer needs: `make lab` and `make test`. Both set the machine up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup lab lab-down test lint bench soak clean

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
	$(VENV)/bin/mypy agent bpf caserver cli cni credentials identity kube lab mesh policy serving sources tunnel waypoint
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m bench

soak: setup
	$(PY) -m bench.soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
