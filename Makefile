# Shortcuts; every target is a plain command documented in README.md.
.PHONY: setup test test-all lint quickstart

setup:
	python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]" && sclabel-data compile-kernels

test:
	. .venv/bin/activate && pytest

test-all:
	. .venv/bin/activate && pytest -m "slow or not slow"

lint:
	. .venv/bin/activate && ruff check . && ruff format --check .

quickstart:
	. .venv/bin/activate && sclabel quickstart
