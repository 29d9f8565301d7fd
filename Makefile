# The one task runner: README.md and .ci/run use these targets.
#   make run BACKEND=host:port   run the proxy on this machine (no AWS needed)
#   make test                    run every test
#   make lint                    formatting, clippy, cargo-deny
#   make install-test            the install scripts run concurrently into new directories
#   make ci                      what CI runs: lint + install-test + test + package-test
#                                + container-test + bench-smoke
#   make deb                     build the .deb (release) and print its path
#   make package-test            the unit, .deb, AMI recipe and CloudFormation templates
#   make container-test          the .deb booted in a Debian container (root, systemd-nspawn)
#   make screenshot              refresh docs/status-page.png from the status page's browser test
#   make lab [SCENARIO=flip]     the whole fleet rehearsed in network namespaces (root); writes
#                                docs/rehearsal.md and its plots (one scenario: beside its records)
#   make lab-test                the lab's own unit tests, then its short version (CI)

SHELL := bash
.SHELLFLAGS := -euo pipefail -c

BACKEND ?= example.com:443
LISTEN ?= 127.0.0.1:8443
ADMIN ?= 127.0.0.1:9001

# The package tests build their .deb from the dev profile, which `make test` has already
# compiled: the package's files, unit and sandbox are the same as in the release .deb, without
# a second (optimised, LTO) build of the whole dependency tree. `make deb` builds the release.
PACKAGE_TEST_PROFILE ?= dev
PYTEST := -m pytest -p no:cacheprovider -o console_output_style=classic

.PHONY: run test lint install-test ci build release docs deb package-test container-test screenshot

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

# INTO=DIR (a new directory): the Python tools the test builds stay there for later steps.
install-test:
	scripts/test-install-scripts.sh $(if $(INTO),--into "$(INTO)")

ci: lint install-test test package-test container-test lab-test bench-smoke

deb:
	scripts/build-deb.sh release | tail -n 1

package-test:
	scripts/install-system-packages.sh
	tools="$$(scripts/install-tools.sh | tail -n 1)"; venv="$$(scripts/python-tools.sh | tail -n 1)"; \
	deb="$$(scripts/build-deb.sh $(PACKAGE_TEST_PROFILE) | tail -n 1)"; \
	STATIC_INGRESS_TOOLS_BIN="$$tools" STATIC_INGRESS_DEB="$$deb" "$$venv/python" $(PYTEST) \
		tests/packaging --ignore=tests/packaging/test_container.py

# Refreshes docs/status-page.png, the README's picture of the status page, from the browser test
# (tests never rewrite tracked files themselves).
screenshot:
	scripts/install-system-packages.sh
	venv="$$(scripts/python-tools.sh | tail -n 1)"; \
	deb="$$(scripts/build-deb.sh $(PACKAGE_TEST_PROFILE) | tail -n 1)"; \
	STATIC_INGRESS_DEB="$$deb" STATIC_INGRESS_SCREENSHOT="$(CURDIR)/docs/status-page.png" "$$venv/python" $(PYTEST) \
		tests/packaging/test_status_page.py

container-test:
	scripts/install-system-packages.sh
	tools="$$(scripts/install-tools.sh | tail -n 1)"; venv="$$(scripts/python-tools.sh | tail -n 1)"; \
	deb="$$(scripts/build-deb.sh $(PACKAGE_TEST_PROFILE) | tail -n 1)"; \
	STATIC_INGRESS_TOOLS_BIN="$$tools" STATIC_INGRESS_DEB="$$deb" "$$venv/python" $(PYTEST) tests/packaging/test_container.py

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

# The lab (loadtest/lab/README.md). It runs the release binary, as shipped; LAB_PROFILE=dev runs
# the debug one `make test` built. LAB_ARGS passes more flags to lab.py (e.g. --scale 1).
.PHONY: lab lab-test
LAB_PROFILE ?= release
LAB_PACKAGES := nginx dnsmasq-base openssl iproute2 systemd-container debootstrap
lab_target = $$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/$(if $(filter dev,$(1)),debug,$(1))/static-ingress

lab:
	scripts/install-system-packages.sh $(LAB_PACKAGES)
	venv="$$(scripts/python-tools.sh | tail -n 1)"; \
	deb="$$(scripts/build-deb.sh $(LAB_PROFILE) | tail -n 1)"; \
	"$$venv/python" loadtest/lab/lab.py --binary "$(call lab_target,$(LAB_PROFILE))" --deb "$$deb" \
		$(if $(SCENARIO),--scenario $(SCENARIO),--doc docs/rehearsal.md) --check $(LAB_ARGS)

# CI: the unit tests of the lab's parts, then the flip, one instance death and an Auto Scaling
# replacement by handoff, at a low rate with the debug binary `make test` built; fails on any
# client-visible failure where the goal is zero.
lab-test:
	scripts/install-system-packages.sh $(LAB_PACKAGES)
	cargo test --all-targets --no-run --quiet
	venv="$$(scripts/python-tools.sh | tail -n 1)"; \
	"$$venv/python" loadtest/lab/lab.py --clean; \
	"$$venv/python" $(PYTEST) tests/lab; \
	out="$$(mktemp -d)"; \
	"$$venv/python" loadtest/lab/lab.py --binary "$(call lab_target,dev)" --short --out "$$out/records" \
		--doc "$$out/rehearsal.md" --check $(LAB_ARGS) || { echo "lab records kept in $$out" >&2; exit 1; }; \
	rm -rf -- "$$out"
