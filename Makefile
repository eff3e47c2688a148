# rankd: `make run` shows a demo job, `make test` runs the test suite.
# Both set up .venv themselves with the newest Python >= 3.11 found here (override: PY=...).
PY ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
PROTO := protos/rankd/v1/agent.proto
TYPECHECK := build/typecheck/rankd

.PHONY: install install-runtime test test-min lint proto run bench soak wheel clean

$(BIN)/python:
	@test -n "$(PY)" || { echo "rankd needs Python >= 3.11: none of python3.13, python3.12, python3.11, python3 is one (set PY=/path/to/python)" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The runtime alone (what `make run` needs) and the test tools on top of it; torch is for
# the torch interop tests, which skip without it (.ci/run's newest-Python venv: EXTRAS=test).
EXTRAS ?= test,torch
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@ $(VENV)/.runtime

install-runtime: $(VENV)/.runtime
install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

# The suite's fast part at exactly the oldest dependency versions pyproject.toml admits.
test-min:
	VENV=.venv-min bash .ci/min-versions

# mypy reads the installed layout (rankd.agent, rankd.client, ...) from a tree of links.
$(TYPECHECK):
	mkdir -p $@
	ln -sfn ../../../protos/rankd/__init__.py $@/__init__.py
	ln -sfn ../../../protos/rankd/py.typed $@/py.typed
	ln -sfn ../../../protos/rankd/v1 $@/v1
	ln -sfn ../../../agent $@/agent
	ln -sfn ../../../client $@/client
	ln -sfn ../../../testing $@/testing

lint: install $(TYPECHECK)
	$(BIN)/ruff check agent client testing tests bench examples
	$(BIN)/ruff format --check agent client testing tests bench examples
	$(BIN)/mypy -p rankd.agent -p rankd.client -p rankd.testing

proto: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(PROTO)

soak: install
	$(BIN)/python -m pytest -q -m soak

# deploy/slurm/rankd.sbatch through sbatch on a real Slurm that the tests start on this host
# (tests/helpers/slurm.py: munged, slurmctld, two slurmd): root and Debian's slurm-wlm and munge; the
# tests skip, saying why, without them. `make test` leaves them out.
.PHONY: test-slurm
test-slurm: install
	$(BIN)/python -m pytest -q -m slurm

bench: install
	$(BIN)/pip install -q -e '.[test,torch]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

run: install-runtime
	BIN=$(BIN) examples/run_demo.sh

wheel: install
	rm -rf build/wheel && $(BIN)/pip wheel -q --no-deps -w build/wheel .

clean:
	rm -rf $(VENV) .venv-min .venv-newest build *.egg-info .pytest_cache .mypy_cache .ruff_cache
