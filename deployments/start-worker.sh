#!/usr/bin/env bash
# Start a process worker for the farense work pool, after making sure the pool, its queues and the
# automations (crash resume, notifications, dead-worker detection) exist.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api deployments/start-worker.sh
#
# Run it from any directory; flow runs execute in the project root (the deployments' working
# directory), with this worker's environment.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The Python with farense and Prefect: FARENSE_PYTHON, the active virtualenv, the project's .venv.
py=${FARENSE_PYTHON:-}
if [[ -z "$py" && -n "${VIRTUAL_ENV:-}" ]]; then py="$VIRTUAL_ENV/bin/python"; fi
if [[ -z "$py" && -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; fi
py=${py:-python3}

export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
# Flow runs send a heartbeat this often; the "zombie" automation marks a run Crashed after 90 s
# without one (30 s is Prefect's minimum).
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"
# How often the worker asks for runs (a resumed run starts within this many seconds of a crash).
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-5}"

pool=${FARENSE_WORK_POOL:-farense}
cd "$root"
# A worker without the automations still runs work: say so loudly, but start it.
"$py" -m deployments.setup --pool "$pool" --no-deploy ||
  echo "farense: WARNING: deployments.setup failed (see above); crash resume and notifications may be missing" >&2
exec "$py" -m prefect worker start --pool "$pool" --type process --name "${FARENSE_WORKER_NAME:-farense-$(hostname)}"
