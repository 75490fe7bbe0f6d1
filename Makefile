# Two commands: `make serve` (service on the default model) and `make test` (the test suite).
# Both create .venv on first use, from the tested versions in LOCK (pip constraints; `make lock`
# refreshes it, `make LOCK= ...` installs the newest versions pyproject.toml allows instead).
# On a CPU machine torch comes from TORCH_SPEC (the CPU build); with a CUDA torch already in .venv,
# run `make TORCH_SPEC= serve` to keep it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
LOCK ?= .ci/constraints.txt
MODEL ?= qwen2.5-coder-1.5b-instruct
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve test test-fast lint bench fuzz soak newest lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install --quiet $(if $(LOCK),-c $(LOCK)) "$(TORCH_SPEC)")
	$(BIN)/pip install --quiet $(if $(LOCK),-c $(LOCK)) -e ".[dev]"
	touch $@

serve: install
	$(BIN)/nlg serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: install  # skips the real-model tests and the rank-process and compile tests (all run by `make test`)
	$(BIN)/pytest -m "not slow and not heavy" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/nlg bench --model $(MODEL)

fuzz: install  # the schemathesis test with more examples (the test suite runs 15 per operation)
	NLG_FUZZ_EXAMPLES=200 $(BIN)/pytest tests/service/test_fuzz.py $(PYTEST_ARGS)

SOAK_ARGS ?= --clients 24 --minutes 3
soak: install  # N clients for M minutes above the queue bound: statuses, lost, incoherent, deaths, RSS
	$(BIN)/python -m service.bench.soak $(SOAK_ARGS)

newest:  # the newest versions pyproject.toml allows, in .venv-newest: what moved since the lock, and the tests
	bash .ci/newest report $(PYTEST_ARGS)

lock:  # as `make newest`, then, when every test passes there, those versions written to LOCK
	bash .ci/newest --write $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-newest .pytest_cache .ruff_cache *.egg-info
