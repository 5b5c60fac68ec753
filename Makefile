# Every target does its own set-up: a virtual environment in .venv and the install into it.
# constraints-cpu.txt pins torch to the CPU build this machine kind keeps on local disk.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
PIP      := $(BIN)/python -m pip install -q -c constraints-cpu.txt
STAMP    := $(VENV)/.installed
RUNS     ?= runs/demo

.PHONY: install test demo bench docs clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Train the default model on the bundled digits with AdaHessian, attack it with FGSM, probe its
# Jacobian spectra, and say where the TensorBoard logs are.
demo: $(STAMP)
	$(BIN)/gradlab train --opt adahessian --epochs 8 --runs-dir $(RUNS) --name demo
	$(BIN)/gradlab attack fgsm --eps 0,0.03,0.1 --run last --runs-dir $(RUNS)
	$(BIN)/gradlab probe jacobian --run last --runs-dir $(RUNS)
	$(BIN)/gradlab runs --runs-dir $(RUNS)
	@echo "TensorBoard logs: $(RUNS)   (view: $(BIN)/gradlab tensorboard --runs-dir $(RUNS))"

# Benchmarks against the peer libraries (the `bench` extra); each prints its ratios.
bench: $(STAMP)
	$(PIP) -e '.[bench]' || echo "some peer libraries could not be installed; benchmarks report gradlab alone where a peer is missing"
	@set -e; for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done

# The options reference, made from the declarations (a test checks that it is current).
docs: $(STAMP)
	$(BIN)/python -m gradlab_cli.docs > docs/OPTIONS.md

clean:
	rm -rf $(VENV) build *.egg-info runs
