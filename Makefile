# scim-edge — one entry point for humans and CI.
#   make test   installs what it needs, builds, runs every test
#   make demo   runs the multi-IdP sandbox (scim-edge sandbox)
#   make bench  runs the benchmarks and writes docs/benchmarks.md
SHELL := /bin/bash
SWIFT ?= swift
# prometheus brings promtool, which checks the shipped alert rules (MonitoringTests, test-deb).
DEB_PKGS := libuv1-dev liblmdb-dev libssl-dev libhttp-parser-dev libyaml-dev libldap-dev slapd ldap-utils lmdb-utils openssl nginx-light wrk python3-venv curl \
            binutils lintian systemd procps prometheus chromium
SWIFT_BUILD_FLAGS ?=
# SwiftPM itself occasionally crashes while resolving; such a crash is retried once.
RETRY := bash $(CURDIR)/scripts/retry-on-crash.sh

.PHONY: deps venv build test test-deb deb demo bench bench-build fuzz compliance format docs clean

# Idempotent: installs only what is missing, so a warm run does no apt work.
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "Debian packages present"; fi

# Python tools from PyPI in .venv: scim2-server (a real downstream app in the
# fan-out tests, a benchmark reference) and the scim2-tester compliance suite.
venv: deps
	bash scripts/venv.sh

build: deps
	$(RETRY) $(SWIFT) build $(SWIFT_BUILD_FLAGS)

test: deps venv
	$(RETRY) $(SWIFT) build --build-tests $(SWIFT_BUILD_FLAGS)
	bash scripts/test.sh $(SWIFT_BUILD_FLAGS)
	$(MAKE) compliance
	$(MAKE) test-deb
	$(MAKE) bench-build
	FUZZ_SECONDS=15 $(MAKE) fuzz

# The multi-IdP sandbox: a broker, three agents, two targets, a scripted scenario, a live view, a verification.
demo: deps venv
	$(RETRY) $(SWIFT) build -c release --product scim-broker $(SWIFT_BUILD_FLAGS)
	$(RETRY) $(SWIFT) build -c release --product scim-edge $(SWIFT_BUILD_FLAGS)
	.build/release/scim-edge sandbox

# dist/scim-edge_<version>_<arch>.deb and dist/scim-broker_<version>_<arch>.deb (packaging/).
deb: deps
	bash scripts/deb.sh

# Builds, lints, installs, upgrades, removes and purges both packages on this machine (root).
test-deb: deps
	bash scripts/test-deb.sh

# Regenerates docs/benchmarks.md (micro-benchmarks, EdgeHTTP vs nginx).
bench: deps venv
	bash scripts/bench.sh

# The benchmark package is built by `make test` so that it cannot rot.
bench-build:
	cd Benchmarks && $(RETRY) $(SWIFT) build --product FoundationBenchmarks

# The SCIM compliance suite (scim2-tester from PyPI, in .venv) against a running agent.
compliance:
	bash scripts/compliance.sh

# Coverage-guided fuzzing of the JSON, filter and PATCH parsers (libFuzzer + ASan).
fuzz:
	bash scripts/fuzz.sh

# docs/configuration.md from the option tables (a test fails when it is stale).
docs: deps
	swift build --product scim-edge
	$$(swift build --show-bin-path)/scim-edge reference --markdown > docs/configuration.md

# Formats the Swift sources with the toolchain's swift-format (configuration: .swift-format).
format:
	$(SWIFT) format -i -r Sources Tests Benchmarks/Sources Fuzz/Sources Plugins

clean:
	rm -rf .build Benchmarks/.build Fuzz/.build dist
