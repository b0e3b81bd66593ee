#!/usr/bin/env bash
# The whole test suite, slow end-to-end tests included, in its own virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv .venv-test "test"
export HF_HUB_OFFLINE=1
# Three workers on a 2-core machine, each test file on one worker (its module fixtures built once): the
# end-to-end files spend most of their time waiting on servers, heartbeats and leases, and the other files
# fill those waits. --no-loadscope-reorder: files are handed out in the order tests/conftest.py gives them
# (longest first), not pytest-xdist's default (most tests first), which started the longest end-to-end
# files last and left a worker idle for minutes. FARENSE_TEST_WORKERS=0 runs everything in this process.
exec python -m pytest -n "${FARENSE_TEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "$@"
