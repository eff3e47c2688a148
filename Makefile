# rankd — run `make install` once, then `make test` or `make run`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PROTO := protos/rankd/v1/agent.proto

.PHONY: install test lint proto run bench soak clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check agent client tests bench examples
	$(BIN)/ruff format --check agent client tests bench examples
	$(BIN)/mypy agent client

proto: install
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)

soak: install
	$(BIN)/python -m pytest -q -m soak

bench: install
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

run: install
	BIN=$(BIN) examples/run_demo.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
