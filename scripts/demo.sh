#!/usr/bin/env bash
# The main job: the whole pipeline (preflight, cleanup, resumable training, evaluation, decision,
# promotion, notification) on the offline demo model, with Prefect's embedded API (no server).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv .venv ""
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec farense run v2 --demo "$@"
