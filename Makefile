# RSafe stream guard — the two commands: `make demo` and `make test`.
# Both build the environment (.venv) first when it is missing.
SHELL := /bin/bash
PY := .venv/bin/python
FIND_LINKS ?= $(shell pip config get global.find-links 2>/dev/null || echo /opt/wheels)
UV := $(shell command -v uv 2>/dev/null || echo .venv-tools/bin/uv)
DEMO_MODEL ?= demo/model
PYTEST_ARGS ?=

.PHONY: setup lock test test-fast test-reliability demo demo-model demo-model-rebuild loop-demo bench clean

.venv/.ok: infra/requirements.lock pyproject.toml
	@test -x "$(UV)" || { python3 -m venv .venv-tools && .venv-tools/bin/pip install -q uv; }
	test -x $(PY) || python3 -m venv .venv
	$(UV) pip sync --python $(PY) --find-links "$(FIND_LINKS)" infra/requirements.lock
	$(UV) pip install --python $(PY) --no-deps -e .
	$(PY) -c "import rsafe, vllm, faust, torch; print('rsafe env ok: torch', torch.__version__)"
	touch $@

setup: .venv/.ok  ## build .venv from the pinned lock file

lock:  ## re-resolve infra/requirements.in into infra/requirements.lock
	$(UV) pip compile infra/requirements.in --find-links "$(FIND_LINKS)" \
	  --override infra/overrides.txt --excludes infra/excludes.txt \
	  --python-version 3.11 --python-platform x86_64-unknown-linux-gnu -o infra/requirements.lock

# The demo model is committed (demo/model/, 16 MB): nothing trains on the way to a verdict.
demo-model: .venv/.ok  ## check demo/model against the code's recipe (the tests check it too)
	$(PY) -m rsafe.cli demo-model check $(DEMO_MODEL)

demo-model-rebuild: .venv/.ok  ## rebuild demo/model in place from its recipe (30-50 min on 2 cores); commit it
	$(PY) -m rsafe.cli demo-model build $(DEMO_MODEL) --force

test: .venv/.ok  ## the whole suite (slow tests included; the long reliability runs are not)
	RSAFE_DEMO_MODEL=$(DEMO_MODEL) $(PY) -m pytest -q -m "not reliability" $(PYTEST_ARGS)

test-fast: .venv/.ok  ## unit tests only
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-reliability: .venv/.ok  ## fault scenarios and soak (~20 min); figures for docs/RELIABILITY.md
	RSAFE_DEMO_MODEL=$(DEMO_MODEL) $(PY) -m pytest -q -s -m reliability $(PYTEST_ARGS)
	$(PY) bench/reliability_table.py

demo: .venv/.ok  ## the main job: stream sample chat events through the guard
	$(PY) -m rsafe.cli demo --model $(DEMO_MODEL)

loop-demo: .venv/.ok  ## the whole loop live: feedback → GRPO → gate → hot swap (≤ 20 min)
	$(PY) -m rsafe.cli loop demo --model $(DEMO_MODEL)

# Each benchmark's output is kept as a raw result, $(BENCH_OUT)/NAME.json (bench/common.py: the
# command, date, git commit, machine, versions and every line printed); docs/BENCHMARKS.md names them.
BENCH_OUT ?= .cache/bench-results
RECORD = $(PY) bench/common.py --out $(BENCH_OUT)/$(1).json --

bench: .venv/.ok demo-model  ## every benchmark of docs/BENCHMARKS.md (ratios measured within each run), raw results in $(BENCH_OUT)
	$(call RECORD,pipeline) $(PY) bench/pipeline.py
	$(call RECORD,cpu_stages) $(PY) bench/cpu_stages.py
	$(call RECORD,idle_fetch) $(PY) bench/idle_fetch.py --seconds 3
	$(call RECORD,run) $(PY) bench/run.py --model $(DEMO_MODEL) --n 48 --repeats 3
	$(call RECORD,batching-kafka) $(PY) bench/batching.py --model $(DEMO_MODEL) --kafka
	$(call RECORD,windows) $(PY) bench/windows.py --model $(DEMO_MODEL)
	$(call RECORD,pipeline_vs_engine) $(PY) bench/pipeline_vs_engine.py --model $(DEMO_MODEL)
	$(call RECORD,latency_load) $(PY) bench/latency_load.py --model $(DEMO_MODEL) --plot docs/img/latency_load.png --json $(BENCH_OUT)/latency_load-result.json
	$(PY) bench/gpu.py --shape demo --n 64 --sequential 8 --duration 10 --new-tokens 32 --max-model-len 1024 --compare-prefix --out $(BENCH_OUT)/gpu-demo-cpu.json
	$(call RECORD,frontend_cost) $(PY) bench/frontend_cost.py --model $(DEMO_MODEL)
	$(call RECORD,sft_chunks) $(PY) bench/sft_chunks.py --model $(DEMO_MODEL)
	$(call RECORD,grpo_prefix) $(PY) bench/grpo_prefix.py --model $(DEMO_MODEL) --steps 6 --rounds 2
	$(call RECORD,team_grpo_steps) $(PY) bench/team_grpo_steps.py --model $(DEMO_MODEL) --steps 12
	$(call RECORD,byo_feedback) $(PY) bench/byo_feedback.py --model $(DEMO_MODEL)
	$(call RECORD,gate) $(PY) bench/gate.py --model $(DEMO_MODEL) --general 200 --slice 60 --ops reference grouped --variants "sequential, 64" "both at once, 64" "both at once, all"
	$(call RECORD,cold_start) $(PY) bench/cold_start.py --model $(DEMO_MODEL) --rounds 3 --variants before default --caches cold --out $(BENCH_OUT)/cold-start-result.json
	$(call RECORD,context_cost) $(PY) bench/context_cost.py --model $(DEMO_MODEL)
	$(call RECORD,context_eval) $(PY) bench/context_eval.py --model $(DEMO_MODEL)

clean:
	rm -rf .venv .venv-tools .cache

# --- GPU lock (issue 16) -------------------------------------------------------------------------
# Resolves the GPU serving stack (CUDA vllm + its PyPI torch) for the GPU image
# (infra/docker/gpu.Dockerfile). Linux x86_64, glibc 2.36 (the image's Debian 12 base); PyPI only:
# no --find-links, whose local +cpu torch would satisfy vllm's torch pin.
.PHONY: lock-gpu
lock-gpu:  ## re-resolve infra/requirements-gpu.in into infra/requirements-gpu.lock
	@test -x "$(UV)" || { python3 -m venv .venv-tools && .venv-tools/bin/pip install -q uv; }
	$(UV) pip compile infra/requirements-gpu.in --override infra/overrides.txt \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_36 -o infra/requirements-gpu.lock
