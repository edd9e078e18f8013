# vmsi-server: one entry point per job. Every target installs what it needs.
PYTHON ?= python3
LAB_PY := PYTHONPATH=$(CURDIR)/guest-tests:$(CURDIR) $(PYTHON)
STAMP := .setup.stamp
FASTLANE := vmsi_server/fastlane
FASTLANE_STAMP := $(FASTLANE)/.built

.PHONY: setup host-packages lab test test-unit test-guest lint typecheck run run-quick \
        bench bench-rtt bench-net seed-table clean

## setup: Python dependencies (editable install), host packages, the compiled fast lane
setup: $(STAMP) $(FASTLANE_STAMP)
$(STAMP): pyproject.toml
	$(MAKE) host-packages
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test,report]'
	touch $(STAMP)

$(FASTLANE_STAMP): $(STAMP) $(FASTLANE)/lane.c $(FASTLANE)/rxcsum.c $(FASTLANE)/rx.c $(FASTLANE)/tx.c $(FASTLANE)/vf.c $(FASTLANE)/lane.h $(FASTLANE)/build.py
	$(PYTHON) -m vmsi_server.fastlane.build
	touch $(FASTLANE_STAMP)

host-packages:
	@missing=""; for p in gcc make iproute2 debootstrap; do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing host packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends $$missing; fi
	@# The fast lane compiles against Python.h: Debian's python3 needs python3-dev.
	@inc=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	if [ ! -f "$$inc/Python.h" ] && [ "$$(command -v $(PYTHON))" = /usr/bin/python3 ]; then \
	  echo "installing host packages: python3-dev"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends python3-dev; fi

## lab: QEMU >= 10.1 (trixie-backports, in a chroot on Debian 12) and the guest image
lab: setup
	$(LAB_PY) -m vmsilab build

## test: lint, types, unit/integration tests and the real-QEMU guest tests
test: setup lab lint typecheck
	$(LAB_PY) -m pytest tests guest-tests

test-unit: setup
	$(PYTHON) -m pytest tests

test-guest: setup lab
	$(LAB_PY) -m pytest guest-tests

lint: setup
	$(PYTHON) -m ruff check vmsi_server bindings tests guest-tests scripts

typecheck: setup
	$(PYTHON) -m mypy

## run: the main job (guest + server + iperf3 under each MSI-X policy, ending in the
## exit-counter comparison; reports in results/). RUN_ARGS passes options, e.g.
## make run RUN_ARGS="--quick"   (see: python -m vmsilab.mainjob --help)
run: setup lab
	$(LAB_PY) -m vmsilab.mainjob $(RUN_ARGS)

run-quick: setup lab
	$(LAB_PY) -m vmsilab.mainjob --quick $(RUN_ARGS)

bench: bench-rtt bench-net seed-table

## bench-rtt: REGION_READ round trips, server vs a C echo server (same syscalls)
bench-rtt: setup
	$(PYTHON) -m scripts.bench_rtt $(BENCH_ARGS)

## bench-net: iperf3 both ways through the VF and through QEMU's e1000e, same run
bench-net: setup lab
	$(LAB_PY) -m scripts.bench_net $(BENCH_ARGS)

## seed-table: 24 replayed guests under legacy and shadow, with the 2010 figures
seed-table: setup
	$(PYTHON) -m scripts.seed_table $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache bench/bin $(STAMP) \
	  $(FASTLANE_STAMP) $(FASTLANE)/_lane.*.so
