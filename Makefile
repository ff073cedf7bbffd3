# One command each: `make run` (demo), `make test` (the suite), `make bench`.
# Works on a fresh clone with only python3 (3.11+) and, for some tests, apt.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv run test test-deps fuzz bench bench-bandwidth bench-deps clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/python -m httptp.demo

# Debian tools the tests drive as real peers, or check files with
# (systemd-analyze: deploy/httptp.service).  Installed when missing and we
# may (root with apt); otherwise the tests that need them skip and say why.
# Each is a package, or package:command when the command has another name.
APT_TEST_PKGS := slowhttptest pebble prometheus chromium systemd:systemd-analyze
test-deps:
	@missing=""; for p in $(APT_TEST_PKGS); do command -v $${p#*:} >/dev/null 2>&1 || missing="$$missing $${p%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "warning: apt-get could not install$$missing; those tests will skip"; \
	  else echo "note:$$missing not installed and apt not usable; those tests will skip"; fi; \
	fi

test: venv test-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -p no:cacheprovider

# Fuzzing (docs/fuzzing.md), not part of `make test`: the property tests with
# FUZZ_EXAMPLES examples each and a fresh seed (about 1.5 min at 300), then every
# fuzz target under atheris (the `fuzz` extra: coverage-guided) for FUZZ_SECONDS
# in all.  Failing inputs land in .hypothesis/ and fuzz-artifacts/.
FUZZ_SECONDS  ?= 180
FUZZ_EXAMPLES ?= 300
fuzz: venv
	@$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/pip install -q -e '.[fuzz]' \
	  || echo "fuzz: atheris did not install; its targets get random inputs instead"
	@status=0; \
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/fuzz -k "not finding" || status=1; \
	$(BIN)/python -m tests.fuzz.fuzz_main --seconds $(FUZZ_SECONDS) || status=1; \
	exit $$status

# httptp against nginx on the measurements of issues 6 and 11 (bench/suite.py,
# ~12 min); writes its section of docs/benchmarks.md and docs/bench.png.
# BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--quick" or "--only http,post";
# "--only memory" needs neither wrk nor nginx.
BENCH_ARGS ?=
bench: venv bench-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/suite.py $(BENCH_ARGS)

# Plain HTTP bytes against teleport bytes on OpenRTB-like traffic (no apt tools).
bench-bandwidth: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/rtb_bandwidth.py

clean:
	rm -rf $(VENV) build *.egg-info .hypothesis fuzz-corpus fuzz-artifacts

# What the bench drives: wrk and nginx from apt when missing (root with apt),
# matplotlib (the plot) from the `bench` extra into the venv.  Without them, the
# bench runs the parts that need neither (memory) and says so for the others.
bench-deps: venv
	@command -v wrk >/dev/null 2>&1 && { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing wrk nginx-light"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx-light >/dev/null; \
	  else echo "bench: wrk and nginx are needed for all parts but memory: apt-get install wrk nginx-light (as root)"; fi
	@$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q -e '.[bench]'
