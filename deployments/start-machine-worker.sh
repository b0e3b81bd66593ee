#!/usr/bin/env bash
# Start this machine's worker for the shared farense work pool (several machines, one server):
# it polls only this machine's queues, `training-<machine>` (concurrency limit 1: one training at a
# time here) and `maintenance-<machine>`. See deployments/multi-machine.md.
#
#   PREFECT_API_URL=http://server:4200/api FARENSE_MACHINE=mac1 deployments/start-machine-worker.sh
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
machine=${FARENSE_MACHINE:-$(hostname -s)}
pool=${FARENSE_WORK_POOL:-farense}

export PREFECT_API_URL="${PREFECT_API_URL:?set PREFECT_API_URL to the shared server, e.g. http://server:4200/api}"

cd "$root"
# The pool and the automations (crash resume, zombies, notifications); idempotent.
"$py" -m deployments.setup --pool "$pool" --no-deploy
# This machine's queues. `prefect deploy` creates a queue it does not find without a limit: set it.
"$py" -m prefect work-queue create "training-$machine" --pool "$pool" --limit 1 >/dev/null 2>&1 \
  || "$py" -m prefect work-queue set-concurrency-limit "training-$machine" 1 --pool "$pool"
"$py" -m prefect work-queue create "maintenance-$machine" --pool "$pool" >/dev/null 2>&1 || true
exec "$py" -m prefect worker start --pool "$pool" --type process --name "farense-$machine" \
  --work-queue "training-$machine" --work-queue "maintenance-$machine"
