# Caplance: `make demo` and `make test` each do all set-up on a fresh Debian machine (as root).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
DEBIAN_PACKAGES := iproute2 nftables iptables ethtool procps kmod gcc python3-dev python3-venv \
	libnetfilter-queue-dev clang libbpf-dev libbpf1 bpftool bird2 iperf3
BPF_DIR := caplance/dataplane/bpf
BPF_OBJECTS := $(BPF_DIR)/balancer.bpf.o $(BPF_DIR)/decap.bpf.o caplance/lab/xdp_pass.bpf.o
BPF_CFLAGS = -O2 -g -Wall -target bpf -I/usr/include/$$(gcc -dumpmachine)
# The docs site's diagrams: Mermaid from the npm registry, bundled into the site (no CDN at
# view time), and jsdom for the test that parses every diagram with it under node.
NPM_DIR := build/npm
NPM_PACKAGES := mermaid@11.17.2 jsdom@26.1.0
NPM_STAMP := $(NPM_DIR)/.installed-$(subst @,-,$(subst $() ,_,$(NPM_PACKAGES)))

.PHONY: demo ecmp test setup debian-packages npm bpf lint clean fuzz soak

demo: setup
	$(VENV)/bin/python examples/simple_vip.py

ecmp: setup
	$(VENV)/bin/python examples/ecmp.py

test: setup
	$(VENV)/bin/mypy caplance
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site
	$(VENV)/bin/python -m pytest

setup: debian-packages $(STAMP) bpf npm

# The kernel data plane's programs: clang -target bpf, shipped beside the Python as package data.
bpf: $(BPF_OBJECTS)

$(BPF_DIR)/%.bpf.o: $(BPF_DIR)/%.bpf.c $(BPF_DIR)/maps.h $(BPF_DIR)/flowhash.h
	clang $(BPF_CFLAGS) -c $< -o $@

caplance/lab/%.bpf.o: caplance/lab/%.bpf.c
	clang $(BPF_CFLAGS) -c $< -o $@

# Install the Debian packages only when a tool is missing (so it runs offline once set up).
debian-packages:
	@if ! command -v ip >/dev/null || ! command -v nft >/dev/null || ! command -v iptables >/dev/null \
	    || ! command -v ethtool >/dev/null || ! command -v gcc >/dev/null \
	    || ! test -e /usr/include/libnetfilter_queue/libnetfilter_queue.h \
	    || ! command -v clang >/dev/null || ! test -e /usr/include/bpf/bpf_helpers.h \
	    || ! command -v bird >/dev/null || ! command -v iperf3 >/dev/null || ! command -v bpftool >/dev/null \
	    || ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then \
	  echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES); \
	fi

# npm and node: Debian's nodejs and npm only when npm is missing (a machine may have another
# node, e.g. NodeSource's, which Debian's npm conflicts with). The packages are installed once
# (offline afterwards) and again only when NPM_PACKAGES changes.
npm: $(NPM_STAMP)

$(NPM_STAMP):
	@command -v npm >/dev/null || (echo "installing Debian packages: nodejs npm"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	rm -rf $(NPM_DIR)
	npm install --prefix $(NPM_DIR) --save-exact --no-audit --no-fund --loglevel=error $(NPM_PACKAGES)
	touch $@

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench,dev,docs,nfqueue,exabgp]'
	touch $(STAMP)

# Not in CI: atheris on the packet parser, the control codec and the config loader,
# FUZZ_SECONDS each; fails on a finding (saved under build/fuzz/<target>/).
FUZZ_SECONDS ?= 60
fuzz: setup
	$(VENV)/bin/pip install -q -e '.[fuzz]'
	$(VENV)/bin/python fuzz/run.py --seconds $(FUZZ_SECONDS)

# Not in CI: the lab for SOAK_MINUTES with churn, long and short flows and a SYN flood.
SOAK_MINUTES ?= 10
soak: setup
	@command -v hping3 >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hping3)
	$(VENV)/bin/python bench/soak.py --minutes $(SOAK_MINUTES)

lint: setup
	$(VENV)/bin/mypy caplance
	$(VENV)/bin/ruff check caplance tests

clean:
	rm -rf $(VENV) build *.egg-info site $(BPF_OBJECTS)
