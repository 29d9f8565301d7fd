# The one task runner: README.md and .ci/run use these targets.
#   make run BACKEND=host:port   run the proxy on this machine (no AWS needed)
#   make test                    run every test
#   make lint                    formatting, clippy, cargo-deny
#   make ci                      what CI runs: lint + test

SHELL := bash
.SHELLFLAGS := -euo pipefail -c

BACKEND ?= example.com:443
LISTEN ?= 127.0.0.1:8443
ADMIN ?= 127.0.0.1:9001

.PHONY: run test lint ci build release docs

build:
	cargo build --all-targets

release:
	cargo build --release

run:
	cargo run --release -- run --backend-address $(BACKEND) --proxy-listen $(LISTEN) --admin-listen $(ADMIN) \
		--lifecycle-drain-delay 0s

test:
	cargo test --all-targets --no-fail-fast

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	tools="$$(scripts/install-tools.sh | tail -n 1)"; "$$tools/cargo-deny" check bans sources licenses

ci: lint test

docs:
	scripts/config-table.py

# Load tests (loadtest/README.md). bench: the side-by-side benchmark, under 10 minutes, writes
# docs/benchmarks.md; bench-smoke: a few seconds of each measurement and the Vegeta script checks.
.PHONY: bench bench-smoke

bench:
	loadtest/install.sh >/dev/null
	python3 loadtest/harness/bench.py --mode full

bench-smoke:
	loadtest/install.sh >/dev/null
	loadtest/vegeta/test.sh
	python3 loadtest/harness/bench.py --mode smoke
