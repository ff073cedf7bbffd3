# One command each: `make run` (demo), `make test` (the suite), `make bench`.
# Works on a fresh clone with only python3 (3.11+) and, for some tests, apt.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv run test test-deps bench bench-bandwidth bench-deps clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/python -m httptp.demo

# Debian tools the tests drive as real peers.  Installed when missing and we
# may (root with apt); otherwise the tests that need them skip and say why.
APT_TEST_PKGS := slowhttptest pebble prometheus
test-deps:
	@missing=""; for p in $(APT_TEST_PKGS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "warning: apt-get could not install$$missing; those tests will skip"; \
	  else echo "note:$$missing not installed and apt not usable; those tests will skip"; fi; \
	fi

test: venv test-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -p no:cacheprovider

bench: venv bench-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/http_vs_nginx.py

# Plain HTTP bytes against teleport bytes on OpenRTB-like traffic (no apt tools).
bench-bandwidth: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/rtb_bandwidth.py

clean:
	rm -rf $(VENV) build *.egg-info

bench-deps:
	@command -v wrk >/dev/null 2>&1 && { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null)
