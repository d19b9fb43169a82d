# Everything starts from a fresh Debian 12 as root: `make run`, `make test`.

PYTHON := /usr/bin/python3
VENV := .venv
BUILD := build
LIBBPF := $(BUILD)/libbpf/usr

# What building, running and testing esr need from Debian: the toolchain,
# sshd for the login tests, lintian and systemd-analyze for the package, qemu
# and debootstrap for the systemd guest, bcc with the nearest kernel headers
# for the benchmark's bcc peer, asciinema, the reference player the terminal
# tests check exports with, chromium for the web UI's tests, gdb to inject
# code into a process from a session, as an attacker would, and liburing for
# a test program that opens and connects through io_uring.
APT_PACKAGES := clang llvm bpftool libelf-dev zlib1g-dev pkg-config dpkg-dev make gcc \
	python3-venv python3-dev openssh-server openssh-client procps iproute2 util-linux \
	lintian systemd qemu-system-x86 qemu-utils debootstrap e2fsprogs \
	python3-bpfcc linux-headers-amd64 asciinema chromium gdb liburing-dev

# pyproject.toml holds the one list of Python dependencies (and esr/__init__.py
# the version): read them from there.
PY_DEPS := $(shell $(PYTHON) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(" ".join(p["dependencies"] + p["optional-dependencies"]["dev"]))')
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' esr/__init__.py)

.PHONY: all deps build run check test test-kernels player binary deb upgrade-deb clean
DEB := $(BUILD)/esr_$(VERSION)_amd64.deb
UPGRADE_DEB := $(BUILD)/upgrade/esr_$(VERSION)+upgrade_amd64.deb

all: build

deps: $(BUILD)/.deps

$(BUILD)/.deps: Makefile
	@mkdir -p $(BUILD)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

# Debian's libbpf.a is not built with -fPIC, so it cannot be linked into a
# Python extension: build the same Debian source here, position-independent.
$(LIBBPF)/lib/libbpf.a: $(BUILD)/.deps
	rm -rf $(BUILD)/libbpf-src && mkdir -p $(BUILD)/libbpf-src/lists/partial
	/usr/bin/python3 packaging/aptsources.py deb-src $$(. /etc/os-release && echo $$VERSION_CODENAME) > $(BUILD)/libbpf-src/sources.list
	cd $(BUILD)/libbpf-src && APT="-q -o Dir::Etc::SourceList=$$PWD/sources.list -o Dir::Etc::SourceParts=/nonexistent -o Dir::State::Lists=$$PWD/lists -o APT::Sandbox::User=root" && \
		apt-get $$APT update >/dev/null && apt-get $$APT source libbpf >/dev/null
	mkdir -p $(BUILD)/libbpf-src/obj
	$(MAKE) -s -C $$(ls -d $(BUILD)/libbpf-src/libbpf-*/src) BUILD_STATIC_ONLY=1 \
		EXTRA_CFLAGS="-fPIC -O2" OBJDIR=$(CURDIR)/$(BUILD)/libbpf-src/obj \
		DESTDIR=$(CURDIR)/$(BUILD)/libbpf PREFIX=/usr LIBDIR=/usr/lib install >/dev/null

$(VENV)/.deps: $(BUILD)/.deps pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check $(foreach d,$(PY_DEPS),'$(d)')
	@touch $@

$(VENV)/bin/esr: $(VENV)/.deps $(LIBBPF)/lib/libbpf.a pyproject.toml setup.py
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	@touch $@

# The BPF object, the extensions and the benchmark's programs, rebuilt when
# their sources change.
build: $(VENV)/bin/esr
	$(VENV)/bin/python setup.py -q build_ext --inplace
	$(MAKE) -s -C bench OUT=$(CURDIR)/$(BUILD)/bench LIBBPF=$(CURDIR)/$(LIBBPF)

# The daemon in the foreground, default config, data kept in build/data.
run: build
	$(VENV)/bin/esr daemon --data-dir $(CURDIR)/$(BUILD)/data

# Lint, types and the unit tests: no root, no kernel, no package; under a
# minute. Caches go to /tmp so that any user can run it in a root-built tree.
CHECK_CACHE := /tmp/esr-check-$(shell id -u)
check: build
	$(VENV)/bin/ruff check --no-cache esr tests bench packaging
	$(VENV)/bin/ruff format --no-cache --check esr tests bench packaging
	$(VENV)/bin/mypy --cache-dir $(CHECK_CACHE)/mypy
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit

# The kernel matrix is left to `make test-kernels`: with it, the whole run
# took 42 minutes on a 2-core host (11 of them the matrix, images built),
# too close to CI's 45 before a fresh machine's package installs.
test: check deb upgrade-deb
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not kernels" tests

# The kernel matrix alone: Debian 11's, 12's and 13's kernels under qemu,
# each running esr check and the kernel test table.
test-kernels: binary
	$(VENV)/bin/pytest -q -p no:cacheprovider -s tests/guest/test_kernels.py

# The web UI's player, at the version package-lock.json pins, installed by
# npm into build/ and copied into the UI's static files: nothing is fetched
# when the UI runs. Only the binary and the UI's tests need it, so only they
# need npm (Debian's, when no npm is installed).
PLAYER := esr/ui/static/player
NPM_PLAYER := $(BUILD)/npm/node_modules/asciinema-player
player: $(PLAYER)/asciinema-player.min.js

$(PLAYER)/asciinema-player.min.js: package.json package-lock.json
	@command -v npm >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; }
	rm -rf $(BUILD)/npm $(PLAYER) && mkdir -p $(BUILD)/npm $(PLAYER)
	cp package.json package-lock.json $(BUILD)/npm/
	cd $(BUILD)/npm && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	cp $(NPM_PLAYER)/dist/bundle/asciinema-player.min.js $(NPM_PLAYER)/dist/bundle/asciinema-player.css $(PLAYER)/
	cp $(NPM_PLAYER)/LICENSE $(PLAYER)/LICENSE

# The single binary: PyInstaller onedir in build/dist/esr.
binary: build player
	$(VENV)/bin/pyinstaller --noconfirm --clean --log-level WARN \
		--distpath $(BUILD)/dist --workpath $(BUILD)/pyinstaller packaging/esr.spec
	@$(BUILD)/dist/esr/esr --version

deb: binary
	$(VENV)/bin/python -c "from esr.pam import profile; print(profile('/usr/bin/esr pam'), end='')" \
		> $(BUILD)/pam-profile
	deb/build.sh $(VERSION) $(BUILD)/dist/esr $(BUILD)/bench $(BUILD)/pam-profile $(BUILD)
	lintian --fail-on error $(DEB)

# A newer package whose BPF programs differ, for the upgrade test in the
# systemd guest: the same package, with the programs compiled for the BPF
# ISA v3 (32-bit jumps and ALU) and a higher version.
upgrade-deb: deb
	$(VENV)/bin/python setup.py -q build_bpf --build-dir=$(BUILD)/upgrade/bpf \
		--package-dir=$(BUILD)/upgrade/bpf --cflags=-mcpu=v3
	rm -rf $(BUILD)/upgrade/pkg && dpkg-deb -R $(DEB) $(BUILD)/upgrade/pkg
	cp $(BUILD)/upgrade/bpf/esr.bpf.o $(BUILD)/upgrade/pkg/usr/lib/esr/_internal/esr/bpf/
	sed -i 's/^Version: .*/Version: $(VERSION)+upgrade/' $(BUILD)/upgrade/pkg/DEBIAN/control
	dpkg-deb --root-owner-group -Zxz --build $(BUILD)/upgrade/pkg $(UPGRADE_DEB) >/dev/null
	@echo $(UPGRADE_DEB)

clean:
	rm -rf $(BUILD) $(VENV) $(PLAYER) esr/_fast/*.c esr/_fast/*.so esr/bpf/*.o *.egg-info
