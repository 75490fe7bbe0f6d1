# Two commands: `make serve` (service on the default model) and `make test` (the test suite).
# Both create .venv on first use. On a CPU machine torch comes from TORCH_SPEC (the CPU build);
# with a CUDA torch already in .venv, run `make TORCH_SPEC= serve` to keep it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
MODEL ?= smollm2-135m-instruct
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve test test-fast lint bench fuzz soak clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/pip install --quiet -e ".[dev]"
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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
