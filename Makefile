# The two commands a newcomer needs: `make demo` and `make test`. Each creates or updates .venv
# from the pins (a stamp file makes the second run skip the install) and then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= build/demo
PERF_ANALYZER := build/perf-analyzer/perf_analyzer

.PHONY: venv slim-venv slim-size browser test test-all demo docs lint typecheck proto constraints bench clean venv-triton \
	venv-kserve venv-torchserve perf-analyzer bench-perf-analyzer

# everything: serving, training, fitting, auditing, the demo, the tests
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,full,dev,ray,otel]'
	@touch $(STAMP)

venv: $(STAMP)

# The slim serving install, built as the Dockerfile builds the image (non-editable '.[cpu]': no
# torch, scikit-learn or matplotlib), so its size and start-up are measurable without Docker
# (benchmarks/bench_startup.py). Rebuilt when the sources change.
SLIM       := .venv-slim
SLIM_STAMP := $(SLIM)/.installed-stamp
$(SLIM_STAMP): pyproject.toml constraints.txt $(shell git ls-files purifier server 2>/dev/null)
	@test -x $(SLIM)/bin/python || $(PYTHON) -m venv $(SLIM)
	$(SLIM)/bin/pip install -q -c constraints.txt '.[cpu]'
	@touch $(SLIM_STAMP)

slim-venv: $(SLIM_STAMP)

slim-size: $(SLIM_STAMP)
	@du -sh $(SLIM)/lib/python3*/site-packages

# Real model servers for the integration tests (and the docs/serving.md recipes), each in its own venv
# because their dependencies conflict with the project's: made when missing, reinstalled when
# their pins (examples/upstreams/requirements-*.txt) change.
UPSTREAMS := examples/upstreams
TEST_UPSTREAMS := .venv-triton/.installed-stamp .venv-kserve/.installed-stamp
.venv-%/.installed-stamp: $(UPSTREAMS)/requirements-%.txt
	@test -x .venv-$*/bin/python || $(PYTHON) -m venv .venv-$*
	.venv-$*/bin/pip install -q -r $<
	@touch $@

venv-triton: .venv-triton/.installed-stamp
venv-kserve: .venv-kserve/.installed-stamp
venv-torchserve: .venv-torchserve/.installed-stamp

# The report.html test renders the page in headless Chromium (Debian package `chromium`). CI machines
# start bare, so on CI (CI set, as CI services do) `make test` installs it first when missing; the
# install needs root and apt, and fails loudly rather than letting the browser test skip.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium (apt) for the report.html browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
	  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }

test: $(STAMP) $(TEST_UPSTREAMS) $(if $(CI),browser)
	$(BIN)/python -m pytest -q

test-all: $(STAMP) $(TEST_UPSTREAMS) .venv-torchserve/.installed-stamp $(if $(CI),browser)
	$(BIN)/python -m pytest -q -m ''

demo: $(STAMP)
	@mkdir -p $(DEMO_OUT)
	$(BIN)/purifier demo --out $(DEMO_OUT)

# The generated pages: docs/configuration.md (Settings), docs/metrics.md (SidecarMetrics) and
# docs/results.md (benchmarks/results/*.json); tests fail when one is stale. docs/fault-modes.md
# comes from tests/integration/test_malicious_upstream.py (run it with python).
docs: $(STAMP)
	$(BIN)/python docs/generate.py
	$(BIN)/python benchmarks/render_results.py --readme README.md

# mypy, configured in pyproject.toml; it sees server/ under its installed name through a link in
# build/. tests/unit/test_types.py runs the same check, so `make test` (and CI) fails on a type error.
typecheck: $(STAMP)
	@mkdir -p build/typecheck && ln -sfn ../../server build/typecheck/purifier_server
	$(BIN)/mypy

lint: typecheck
	$(BIN)/ruff check purifier server tests benchmarks docs

# Re-freeze the working set after changing dependencies (then review the diff).
constraints: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -vE '^(pip|setuptools|wheel)==' \
	  | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' > constraints.txt

# Regenerate the committed OIP v2 stubs (tests/unit/server/test_proto.py fails when they drift).
proto: $(STAMP)
	$(BIN)/python proto/generate.py server/_proto

# Every benchmark, each writing JSON with machine info under benchmarks/results/, then
# docs/results.md is re-rendered from them. Long (~30-60 min on 2 cores, plus bench_shadows: 84 local and
# 20 Ray shadow models of purchase_like); run on a quiet machine.
BENCH_WORK := build/bench-privacy/digits
bench: $(STAMP) .venv-triton/.installed-stamp $(PERF_ANALYZER)
	$(BIN)/python -m benchmarks.bench_defense
	$(BIN)/python benchmarks/bench_privacy_utility.py --dataset digits
	$(BIN)/python benchmarks/bench_privacy_utility.py --dataset purchase_like
	$(BIN)/python benchmarks/bench_tune.py
	$(BIN)/python benchmarks/bench_sidecar.py --target $(BENCH_WORK)/target \
	  --defense-dir $(BENCH_WORK)/defenses/memguard --defense-dir $(BENCH_WORK)/defenses/purifier \
	  --secret-file $(BENCH_WORK)/secret.txt
	$(BIN)/python benchmarks/bench_abuse.py --target $(BENCH_WORK)/target \
	  --defense-dir $(BENCH_WORK)/defenses/memguard --secret-file $(BENCH_WORK)/secret.txt
	$(BIN)/python benchmarks/bench_perf_analyzer.py $(PA_DEFENSES)
	$(BIN)/python benchmarks/bench_load.py --seconds 60 --concurrency 32 --model $(BENCH_WORK)/target
	$(MAKE) slim-venv
	$(BIN)/python benchmarks/bench_startup.py --target $(BENCH_WORK)/target \
	  --defense-dir $(BENCH_WORK)/defenses/memguard --defense-dir $(BENCH_WORK)/defenses/purifier \
	  --secret-file $(BENCH_WORK)/secret.txt
	$(BIN)/python benchmarks/bench_timing.py --dataset synthetic100
	$(BIN)/python benchmarks/bench_timing.py --dataset purchase_like --records 5000 --label purchase_like
	$(BIN)/python benchmarks/audit_targets.py --datasets digits mnist5k
	$(BIN)/python benchmarks/bench_demo.py --dataset digits
	$(BIN)/python benchmarks/bench_demo.py --dataset mnist5k
	$(BIN)/python benchmarks/bench_shadows.py
	$(BIN)/python benchmarks/render_results.py --readme README.md

# perf_analyzer needs glibc 2.38; this runs it through Debian 13's loader and runtime in a private
# directory (benchmarks/perf_analyzer/install.sh says how), nothing installed system-wide.
$(PERF_ANALYZER): benchmarks/perf_analyzer/install.sh
	bash $< $(dir $@)

perf-analyzer: $(PERF_ANALYZER)

# perf_analyzer against real Triton directly and through the sidecar (identity, MemGuard, PURIFIER).
# with the privacy benchmark's fitted defenses when they exist, else the identity sidecar alone
PA_DEFENSES = $(if $(wildcard $(BENCH_WORK)/defenses/purifier),--target $(BENCH_WORK)/target \
  --defense-dir $(BENCH_WORK)/defenses/memguard --defense-dir $(BENCH_WORK)/defenses/purifier \
  --secret-file $(BENCH_WORK)/secret.txt)
bench-perf-analyzer: $(STAMP) .venv-triton/.installed-stamp $(PERF_ANALYZER)
	$(BIN)/python benchmarks/bench_perf_analyzer.py $(PA_DEFENSES)

clean:
	rm -rf $(VENV) $(SLIM) .venv-triton .venv-kserve .venv-torchserve build .pytest_cache
