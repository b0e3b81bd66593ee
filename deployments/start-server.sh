#!/usr/bin/env bash
# Start a local Prefect server for farense on 127.0.0.1 (UI and API: http://127.0.0.1:4200).
#
#   deployments/start-server.sh
#
# Database: SQLite under $PREFECT_HOME by default. For PostgreSQL set, before starting,
#   export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect"
# Host and port: FARENSE_PREFECT_HOST (default 127.0.0.1), FARENSE_PREFECT_PORT (default 4200).
# Telemetry is off: nothing is sent outside this machine.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
export PREFECT_HOME="${PREFECT_HOME:-$HOME/.prefect}"
# Runs waiting for the deployment's concurrency slot are looked at again after this many seconds.
export PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="${PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS:-15}"
mkdir -p "$PREFECT_HOME"

host=${FARENSE_PREFECT_HOST:-127.0.0.1}
port=${FARENSE_PREFECT_PORT:-4200}
echo "farense: Prefect server on http://$host:$port (PREFECT_HOME=$PREFECT_HOME," \
     "database: ${PREFECT_API_DATABASE_CONNECTION_URL:+PostgreSQL}${PREFECT_API_DATABASE_CONNECTION_URL:-SQLite})"
exec "$py" -m prefect server start --host "$host" --port "$port"
