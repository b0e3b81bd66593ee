# Sourced by the start-*.sh scripts: the project root, the Python that has farense and Prefect
# (FARENSE_PYTHON, the active virtualenv, the project's .venv, python3), and telemetry off so
# that nothing is sent outside this machine.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${FARENSE_PYTHON:-}
if [[ -z "$py" && -n "${VIRTUAL_ENV:-}" ]]; then py="$VIRTUAL_ENV/bin/python"; fi
if [[ -z "$py" && -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; fi
py=${py:-python3}

export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1
# Flow runs send a heartbeat this often; the "zombie" automation marks a run Crashed after 90 s
# without one (30 s is Prefect's minimum). How often a worker asks for runs (a resumed run
# starts within this many seconds of a crash).
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-5}"
