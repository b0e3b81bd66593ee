# Sourced by the scripts: create or reuse a virtual environment and install the project into it.
# Usage: ensure_venv DIR EXTRAS   (reinstalls only when pyproject.toml changed)
set -euo pipefail

ensure_venv() {
  local dir="$1" extras="$2" root py stamp want
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  py="${PYTHON:-}"
  if [ -z "$py" ]; then
    # A pyenv shim for a version that is not selected prints "command not found": probe quietly.
    for cand in python3.13 python3.12 python3.11 python3; do
      if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        py="$cand"; break
      fi
    done
  fi
  if [ -z "$py" ]; then
    echo "farense needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  if [ ! -x "$root/$dir/bin/python" ]; then
    echo "creating $dir with $py" >&2
    "$py" -m venv "$root/$dir"
  fi
  stamp="$root/$dir/.farense-installed"
  want="$( (cat "$root/pyproject.toml"; echo "$extras") | cksum)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing farense${extras:+[$extras]} into $dir" >&2
    "$root/$dir/bin/python" -m pip install -q --upgrade pip >&2
    "$root/$dir/bin/python" -m pip install -q -e "$root${extras:+[$extras]}" >&2
    echo "$want" > "$stamp"
  fi
  export PATH="$root/$dir/bin:$PATH"
  # No traffic leaves this machine: Prefect's and Hugging Face's telemetry off, the hub offline
  # unless the user asks for it.
  export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_DISABLE_TELEMETRY=1
  export TOKENIZERS_PARALLELISM=false
}
