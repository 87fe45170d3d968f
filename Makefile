# Two commands do everything on a fresh machine:
#   make parity [MODEL=path TRUST_REMOTE_CODE=1]   set up, build fixtures, convert, compare, write reports
#   make test                                      set up, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
FIXTURES := .cache/fixtures
DEFAULT_MODEL := $(FIXTURES)/xcomposer2-tiny
MODEL  ?= $(DEFAULT_MODEL)
# empty: parity's own default, reports/<model folder name>-<hash of its path> (parity.places), so two models
# whose folders share a name never write into one report folder
OUT    ?=
ARGS   ?=
# The built-in fixtures are our own code; a user's model runs its own code only when they say so.
ifeq ($(MODEL),$(DEFAULT_MODEL))
TRUST_REMOTE_CODE ?= 1
endif
TRUST_FLAG := $(if $(filter 1 yes true,$(TRUST_REMOTE_CODE)),--trust-remote-code,)

.PHONY: setup setup-gpu test parity fixtures faults bench device-pack clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/install-chromium.sh scripts/fetch-plotly-partial.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this takes the CPU build from local disk; unpinned it pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,lmdeploy-cpu]'
	# lmdeploy's wheel would drag in a CUDA torch: install it alone, its pure-Python needs come from above
	$(BIN)/pip install -q --no-deps lmdeploy==0.7.1
	scripts/install-chromium.sh
	scripts/fetch-plotly-partial.sh $(BIN)/python
	touch $(STAMP)

# GPU users: the live engine (--engine turbomind) in its own venv, with lmdeploy 0.7.1's own requirements
# (torch<=2.5.1 built for CUDA 12, the nvidia-*-cu12 runtime wheels); ends by saying whether TurboMind can run.
VENV_GPU := .venv-gpu
setup-gpu: pyproject.toml
	test -x $(VENV_GPU)/bin/python || $(PYTHON) -m venv $(VENV_GPU)
	$(VENV_GPU)/bin/pip install -q --upgrade pip
	$(VENV_GPU)/bin/pip install -q -e '.[test,lmdeploy-cpu,turbomind]'
	$(VENV_GPU)/bin/pip install -q --no-deps lmdeploy==0.7.1
	$(VENV_GPU)/bin/python -c "from parity.deploy.live import available; ok, why = available(); print(why); raise SystemExit(0 if ok else 1)"

# The packages a GPU machine without a registry needs for scripts/device_check.py (<= 64 MiB, .device-pack/)
device-pack: setup
	$(BIN)/python scripts/device_check.py pack

fixtures: setup
	$(BIN)/parity fixtures --out $(FIXTURES)

test: setup
	$(BIN)/python -m pytest -q

parity: setup
	@if [ "$(MODEL)" = "$(DEFAULT_MODEL)" ]; then $(BIN)/parity fixtures --out $(FIXTURES) >/dev/null; fi
	$(BIN)/parity run $(MODEL) $(TRUST_FLAG) $(if $(OUT),--out $(OUT)) $(ARGS)

faults: setup
	$(BIN)/parity faults --json reports/faults.json
	$(BIN)/parity faults --numeric emulate --json reports/faults-emulate.json

# 7B-shaped models with few layers (cached in .cache/bench): ratios table + reports/bench.json (benchmarks/README.md)
bench: setup
	$(BIN)/python benchmarks/bench.py --out reports/bench.json $(ARGS)
	$(BIN)/python benchmarks/decode_bench.py --out reports/bench-decode.json
	$(BIN)/python benchmarks/int4_replay.py --out reports/bench-int4.json

# build outputs and the fixture cache only: reports are the user's (delete reports/ yourself)
clean:
	rm -rf .cache build *.egg-info
