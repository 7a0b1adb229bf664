# The two commands a newcomer needs: `make demo` and `make test`. Each creates or updates .venv
# from the pins (a stamp file makes the second run skip the install) and then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= build/demo

.PHONY: venv test test-all demo lint proto constraints bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,dev]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
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

clean:
	rm -rf $(VENV) build .pytest_cache
