# p2pnode developer tasks. Every target that needs the virtualenv depends on it,
# so each works on a fresh machine by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_HOME ?= .run/node
RUN_LISTEN ?= 127.0.0.1:0
RUN_DHT_HOST ?= 127.0.0.1
RUN_DHT_PORT ?= 0

.PHONY: install test lint run clean bench soak

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check p2pnode tests bench
	$(BIN)/ruff format --check p2pnode tests bench
	$(BIN)/mypy

# Creates the node on first use, then runs its daemon in the foreground (Ctrl-C stops it).
# Loopback addresses by default; override e.g. RUN_LISTEN=0.0.0.0:4001 RUN_DHT_HOST=0.0.0.0.
run: install
	@$(BIN)/p2pnode init --home $(RUN_HOME)
	$(BIN)/p2pnode daemon --home $(RUN_HOME) --listen $(RUN_LISTEN) \
		--dht-host $(RUN_DHT_HOST) --dht-port $(RUN_DHT_PORT)

# Benchmarks: not tests; they take minutes and report figures (bench/README.md). Each runs in
# turn through bench/report.py --run, which records its exit status and time: one that fails
# is reported as failed and the others still run. bench/report.py then writes
# bench/results.json, BENCHMARKS.md and bench/plots/. QUICK=1 passes --quick to each (about a
# minute in all).
bench: BENCH_FLAGS = $(if $(filter 1,$(QUICK)),--quick)
bench: BENCH_RUN = $(BIN)/python bench/report.py --run
bench: install
	rm -rf .run/bench
	$(BENCH_RUN) messaging -- $(BIN)/python bench/messaging.py $(BENCH_FLAGS)
	$(BENCH_RUN) scaling -- $(BIN)/python bench/scaling.py $(BENCH_FLAGS)
	$(BENCH_RUN) surfaces -- $(BIN)/python bench/surfaces.py $(BENCH_FLAGS)
	$(BENCH_RUN) resources -- $(BIN)/python bench/resources.py $(BENCH_FLAGS)
	$(BENCH_RUN) dht -- $(BIN)/python bench/dht_bench.py $(BENCH_FLAGS)
	$(BENCH_RUN) opendht -- $(BIN)/python bench/peers/opendht_bench.py $(BENCH_FLAGS)
	$(BENCH_RUN) libp2p -- $(BIN)/python bench/peers/libp2p_bench.py $(BENCH_FLAGS)
	$(BIN)/python bench/report.py

# Long-running tests kept out of `make test`.
soak: install
	P2PNODE_SOAK=1 $(BIN)/pytest -q -s -m soak -o addopts="-ra --strict-markers" tests/test_soak.py

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
