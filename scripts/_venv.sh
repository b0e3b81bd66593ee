# Sourced by the scripts: create or reuse a virtual environment and install the project into it.
# Usage: ensure_venv DIR EXTRAS   (reinstalls only when pyproject.toml changed)
set -euo pipefail

# uv installs the same packages as pip (same resolver inputs: pyproject.toml's pins; same index settings,
# passed on below) about three times faster: a fresh test venv in ~22 s instead of ~65 s on the 2-core
# machine. --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, nothing compiles later, and
# every process would compile Prefect and mlx-lm from source (imports 1.5x slower). pip is the fallback,
# and FARENSE_INSTALLER=pip chooses it.
_install() {
  local py="$1" target="$2"
  local index=()
  [ -n "${PIP_INDEX_URL:-}" ] && index+=("UV_INDEX_URL=${UV_INDEX_URL:-$PIP_INDEX_URL}")
  [ -n "${PIP_EXTRA_INDEX_URL:-}" ] && index+=("UV_EXTRA_INDEX_URL=${UV_EXTRA_INDEX_URL:-$PIP_EXTRA_INDEX_URL}")
  [ -n "${PIP_FIND_LINKS:-}" ] && index+=("UV_FIND_LINKS=${UV_FIND_LINKS:-$PIP_FIND_LINKS}")
  if [ "${FARENSE_INSTALLER:-uv}" = uv ] && "$py" -m pip install -q uv >&2 2>/dev/null; then
    if env "${index[@]}" "$py" -m uv pip install -q --compile-bytecode --python "$py" -e "$target" >&2; then
      return 0
    fi
    echo "uv could not install $target; trying pip" >&2
  fi
  "$py" -m pip install -q --upgrade pip >&2
  "$py" -m pip install -q -e "$target" >&2
}

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
    _install "$root/$dir/bin/python" "$root${extras:+[$extras]}"
    echo "$want" > "$stamp"
  fi
  export PATH="$root/$dir/bin:$PATH"
  # No traffic leaves this machine: Prefect's and Hugging Face's telemetry off, the hub offline
  # unless the user asks for it.
  export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_DISABLE_TELEMETRY=1
  export TOKENIZERS_PARALLELISM=false
}
