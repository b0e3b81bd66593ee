#!/usr/bin/env bash
# The whole test suite, slow end-to-end tests included, in its own virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv .venv-test "test"
export HF_HUB_OFFLINE=1
exec python -m pytest "$@"
