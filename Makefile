# The two commands a newcomer needs: `make demo` and `make test`. Each creates or updates .venv
# from the pins (a stamp file makes the second run skip the install) and then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= build/demo

.PHONY: venv browser test test-all demo lint proto constraints bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,dev]'
	@touch $(STAMP)

venv: $(STAMP)

# The report.html test renders the page in headless Chromium (Debian package `chromium`). CI machines
# start bare, so on CI (CI set, as CI services do) `make test` installs it first when missing; the
# install needs root and apt, and fails loudly rather than letting the browser test skip.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium (apt) for the report.html browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
	  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }

test: $(STAMP) $(if $(CI),browser)
	$(BIN)/python -m pytest -q

test-all: $(STAMP) $(if $(CI),browser)
	$(BIN)/python -m pytest -q -m ''

demo: $(STAMP)
	@mkdir -p $(DEMO_OUT)
	$(BIN)/purifier demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(BIN)/ruff check purifier server tests benchmarks

# Re-freeze the working set after changing dependencies (then review the diff).
constraints: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -vE '^(pip|setuptools|wheel)==' \
	  | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' > constraints.txt

# Regenerate the committed OIP v2 stubs (tests/unit/server/test_proto.py fails when they drift).
proto: $(STAMP)
	$(BIN)/python proto/generate.py server/_proto

# Every benchmark, each writing JSON with machine info under benchmarks/results/, then the README's
# Results section is re-rendered from them. Long (~30-60 min on 2 cores); run on a quiet machine.
BENCH_WORK := build/bench-privacy/digits
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.bench_defense
	$(BIN)/python benchmarks/bench_privacy_utility.py --dataset digits
	$(BIN)/python benchmarks/bench_sidecar.py --target $(BENCH_WORK)/target \
	  --defense-dir $(BENCH_WORK)/defenses/memguard --defense-dir $(BENCH_WORK)/defenses/purifier \
	  --secret-file $(BENCH_WORK)/secret.txt
	$(BIN)/python benchmarks/bench_load.py --seconds 60 --concurrency 32 --model $(BENCH_WORK)/target
	$(BIN)/python benchmarks/audit_targets.py --datasets digits mnist5k
	$(BIN)/python benchmarks/bench_demo.py --dataset digits
	$(BIN)/python benchmarks/bench_demo.py --dataset mnist5k
	$(BIN)/python benchmarks/render_results.py

clean:
	rm -rf $(VENV) build .pytest_cache
