#!/usr/bin/env bash
# Start a process worker for the farense work pool, after making sure the pool, its queues and the
# automations (crash resume, notifications, dead-worker detection) exist.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api deployments/start-worker.sh
#
# Run it from any directory; flow runs execute in the project root (the deployments' working
# directory), with this worker's environment.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"

pool=${FARENSE_WORK_POOL:-farense}
cd "$root"
# A worker without the automations still runs work: say so loudly, but start it.
"$py" -m deployments.setup --pool "$pool" --no-deploy ||
  echo "farense: WARNING: deployments.setup failed (see above); crash resume and notifications may be missing" >&2
exec "$py" -m prefect worker start --pool "$pool" --type process --name "${FARENSE_WORKER_NAME:-farense-$(hostname)}"
