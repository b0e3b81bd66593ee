#!/usr/bin/env bash
# Start this machine's worker on the shared training queue (deployments/shared-queue.yaml): every
# machine's worker polls `shared-training`, whose concurrency limit is the number of machines, and
# takes one flow run at a time (--limit 1). Runs and releases live on the object store, so a run
# may start, crash and resume on any machine. See deployments/multi-machine.md.
#
#   PREFECT_API_URL=http://server:4200/api FARENSE_MACHINE=mac1 FARENSE_MACHINES=2 \
#     FARENSE_WORKSPACE=/srv/farense deployments/start-shared-worker.sh
#
# The worker's environment is the flow runs' environment: put the AWS_* variables of the store here
# (an EnvironmentFile of mode 600 in a systemd unit), never in a config or a deployment.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
machine=${FARENSE_MACHINE:-$(hostname -s)}
machines=${FARENSE_MACHINES:-2}
pool=${FARENSE_WORK_POOL:-farense}
queue=${FARENSE_SHARED_QUEUE:-shared-training}

export PREFECT_API_URL="${PREFECT_API_URL:?set PREFECT_API_URL to the shared server, e.g. http://server:4200/api}"

cd "$root"
# The pool, the shared queue with its limit, and the automations (crash resume, zombies, notifications).
"$py" -m deployments.setup --pool "$pool" --no-deploy --shared-queue "$queue" --machines "$machines"
exec "$py" -m prefect worker start --pool "$pool" --type process --name "farense-$machine" \
  --work-queue "$queue" --limit 1
