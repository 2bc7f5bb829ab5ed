# SocialVPN — `make demo` and `make test` work on a fresh Debian machine as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the agent and its test bed use (DESIGN.md §5). --no-upgrade: never upgrade
# what the system already has (e.g. openssl) as a side effect.
APT_PACKAGES := prosody lua-sec lua-unbound coturn nftables iproute2 iputils-ping iperf3 wireguard-go \
	wireguard-tools openssl procps ca-certificates python3-venv systemd chromium chromium-driver \
	ejabberd tinc openvpn fastd conntrack
PYTEST_ARGS ?=

.PHONY: all deps apt-deps py-deps test unit integration lint demo demo-down bench clean

all: test

deps: apt-deps py-deps

apt-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && \
		apt-get install -y -q --no-install-recommends --no-upgrade $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

py-deps: $(VENV)/.installed

lint: py-deps
	$(VENV)/bin/ruff check socialvpn tests bench

# The whole suite; integration tests must run here (never skipped silently).
test: deps lint
	SOCIALVPN_REQUIRE_INTEGRATION=1 $(PY) -m pytest $(PYTEST_ARGS)

unit: py-deps
	$(PY) -m pytest -m "unit or component" $(PYTEST_ARGS)

integration: deps
	SOCIALVPN_REQUIRE_INTEGRATION=1 $(PY) -m pytest -m integration $(PYTEST_ARGS)

demo: deps
	$(PY) -m tests.kit.demo

# Stops a demo left running (`make demo` leaves its cluster up for the browser) and removes
# every namespace, process and interface it made. Safe to run any time.
demo-down: py-deps
	$(PY) -m tests.kit.demo --down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info

# Measurements (ratios against peers where there are peers; see bench/).
bench: deps
	$(PY) -m bench.signin --runs 5 --out bench/results/signin.md
	$(PY) -m bench.throughput --rounds 3 --seconds 4 --out bench/results/throughput.md --json bench/results/throughput.json
