# The two commands a newcomer needs: `make lab` and `make test`. Both set the machine up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup lab lab-down test lint bench soak fuzz clean

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

# Coverage-guided fuzzing (atheris) of every parser, >= 1 000 000 inputs each, one target after
# another; prints inputs run and crashes per target (crashing inputs in fuzz/crashes/<target>/).
FUZZ_RUNS ?= 1000000
fuzz: setup
	$(PY) -m fuzz all --runs $(FUZZ_RUNS) -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The kernel lab (vagrant/README.md): the kernel tests inside a VM with another kernel. Not part of
# `make test` (a run takes ~30 min under emulation); tests/vagrant checks the files in CI.
KERNEL ?= debian12
.PHONY: vagrant-setup vagrant-box vagrant-test vagrant-clean

vagrant-setup:
	bash vagrant/setup-host.sh

vagrant-box: setup vagrant-setup
	nice -n 10 bash vagrant/build-box.sh $(KERNEL)

vagrant-test: setup vagrant-setup
	bash vagrant/lab.sh test $(KERNEL)

vagrant-clean:
	bash vagrant/lab.sh clean
