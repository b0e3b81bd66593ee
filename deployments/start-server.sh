#!/usr/bin/env bash
# Start a Prefect server for farense (UI and API; by default http://127.0.0.1:4200).
#
#   deployments/start-server.sh               # start it
#   deployments/start-server.sh --print-env   # only print the settings it would start with
#
# Database: SQLite under $PREFECT_HOME by default. For PostgreSQL set, before starting,
#   export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect"
# Where it listens: FARENSE_PREFECT_HOST (default 127.0.0.1), FARENSE_PREFECT_PORT (default 4200).
# Where browsers and other machines reach it: FARENSE_PREFECT_PUBLIC_URL (e.g. http://trainer.lan:4200).
#   The UI in a browser asks the API at this address (PREFECT_UI_API_URL = it + /api), so set it when
#   binding 0.0.0.0 or behind a proxy; by default it is http://HOST:PORT, and for a 0.0.0.0 (or ::)
#   bind http://$(hostname -f):PORT. A PREFECT_UI_API_URL you set yourself is kept.
# Telemetry is off: nothing is sent outside this machine.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
export PREFECT_HOME="${PREFECT_HOME:-$HOME/.prefect}"
# Runs waiting for the deployment's concurrency slot are looked at again after this many seconds.
export PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="${PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS:-15}"

host=${FARENSE_PREFECT_HOST:-127.0.0.1}
port=${FARENSE_PREFECT_PORT:-4200}
case "$host" in
  0.0.0.0 | :: | "[::]") reach=$(hostname -f 2>/dev/null || hostname) ;;
  *:*) reach="[$host]" ;;  # an IPv6 address in a URL
  *) reach=$host ;;
esac
public=${FARENSE_PREFECT_PUBLIC_URL:-http://$reach:$port}
public=${public%/}
# The server's own idea of where it is (the UI's default API address is built from these), and the
# address the UI's JavaScript calls from the browser: without it, a server on another port or host
# shows an empty UI ("Can't connect to Server API" at 127.0.0.1:4200).
export PREFECT_SERVER_API_HOST="$host" PREFECT_SERVER_API_PORT="$port"
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-$public/api}"
export PREFECT_UI_URL="${PREFECT_UI_URL:-$public}"  # links in notifications and logs

if [[ "${1:-}" == "--print-env" ]]; then
  for name in PREFECT_HOME PREFECT_SERVER_API_HOST PREFECT_SERVER_API_PORT PREFECT_UI_API_URL PREFECT_UI_URL; do
    echo "$name=${!name}"
  done
  exit 0
fi

mkdir -p "$PREFECT_HOME"
echo "farense: Prefect server listening on $host:$port, UI at $PREFECT_UI_URL, its API at $PREFECT_UI_API_URL" \
     "(PREFECT_HOME=$PREFECT_HOME, database: ${PREFECT_API_DATABASE_CONNECTION_URL:+PostgreSQL}${PREFECT_API_DATABASE_CONNECTION_URL:-SQLite})"
if [[ "$host" == 0.0.0.0 || "$host" == :: || "$host" == "[::]" ]] && [[ -z "${FARENSE_PREFECT_PUBLIC_URL:-}" ]]; then
  echo "farense: listening on every interface: browsers elsewhere reach the API at $PREFECT_UI_API_URL;" \
       "set FARENSE_PREFECT_PUBLIC_URL if they know this machine by another name" >&2
fi
exec "$py" -m prefect server start --host "$host" --port "$port"
