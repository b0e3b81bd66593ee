#!/usr/bin/env bash
# farense on MLX's CUDA backend, on a machine that cannot reach a package index (the `device` tool's
# GPU machines: Python 3.12, CUDA 13 driver, PyTorch's nvidia-* CUDA 13 libraries already installed).
#
# The wheels are downloaded beforehand on a machine with network, into .whl/ (git-ignored):
#   mlx-cuda-13 (about 90 MB) is larger than one transfer may carry (64 MiB), so it travels in two
#   parts, one per call, while the machine stays warm; each call copies its part to /tmp/whl, and
#   `install` joins them, checks the SHA-256 and installs everything with pip --target (no index).
#   .whl/MANIFEST.txt says which files go in which call: call1 the wheel's first 45,000,000 bytes
#   (split -b 45000000), call2 the rest with mlx, mlx_lm, orjson, tomli_w, tenacity and obstore
#   (farense.commands imports farense.run.objectstore, so every `farense` command needs obstore).
#
#   call 1 (carry .whl/call1):  bash bench/cuda_device_run.sh stage
#   call 2 (carry .whl/call2):  bash bench/cuda_device_run.sh stage install bench demo bench 7b --prepare-only
#   call 3 (no carry):          bash bench/cuda_device_run.sh bench 7b --steps 20 --timeout 240
# A machine stays warm about 30 s after a call: make each call right after the previous one
# (/tmp/whl, /tmp/site and the built 7B model in /tmp/farense-bench live only that long).
#
# Commands, run in order given: stage | install | check | probe | startup | ptxcache [SHAPE [args]]
#   | bench SHAPE [bench_cuda.py args...] | sweep CONFIG... (one farense process on the 7B shape per CONFIG,
#   BxS[-nogc][-bf16|-fp32][-align|-noalign][-sN], e.g. 4x2048-nogc; without a suffix farense's defaults
#   (lora.matmul_dtype and training.align_tokens `auto`: bf16 and 128 on a CUDA GPU); -bf16 / -fp32 set
#   lora.matmul_dtype, -align / -noalign training.align_tokens 128 / 0; with --sweep-repeat=N the best by MFU runs N more times at the
#   end; a line each in $OUT/sweep/summary.tsv, the runs' results and logs in $OUT/sweep/runs.tgz;
#   SWEEP_RUN_TIMEOUT: seconds one run may take, default 240)
#   | nccl [bench_nccl.py args...] | script FILE [args...] (another bench/ script on one GPU, e.g.
#   `script bench/bench_compute_crossover.py --out "$OUT/crossover"`, `script bench/bench_loop_overhead.py`)
# Results land in $OUT/<shape>/results.{json,md} and $OUT/nccl/ (with the logs).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHL=/tmp/whl
SITE=/tmp/site
OUT="${OUT:-/tmp/out}"
PY="${PYTHON:-python3}"
CUDA_WHEEL=mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
CUDA_WHEEL_SHA256=94cb48fba73e5ee39467e51c35c51c691123359ca17bafd1a24cf92ad6732bee

env_setup() {
  export PYTHONPATH="$SITE:$REPO" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1
  # mlx's libmlx.so looks for the CUDA libraries at $ORIGIN/../../nvidia/...: the nvidia-* wheels
  # PyTorch brought are linked in as $SITE/nvidia, and named on LD_LIBRARY_PATH as well.
  local nv
  nv="$("$PY" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || true)"
  if [[ -n "$nv" && -d "$nv" ]]; then
    [[ -e "$SITE/nvidia" ]] || ln -s "$nv" "$SITE/nvidia"
    export LD_LIBRARY_PATH="$(ls -d "$nv"/*/lib 2>/dev/null | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  [[ -d /usr/local/cuda ]] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  # Several-GPU hosts of this workplace: NVLink multicast stays off (KINDS.md).
  export NCCL_NVLS_ENABLE=0
}

stage() {  # copy this call's carried files out of the working tree, which the next call replaces
  mkdir -p "$WHL"
  for d in "$REPO"/.whl/call*; do [[ -d "$d" ]] && cp -v "$d"/* "$WHL"/; done
  ls -la "$WHL"
}

install() {
  cd "$WHL"
  if [[ ! -f "$CUDA_WHEEL" ]]; then
    cat "$CUDA_WHEEL".part0 "$CUDA_WHEEL".part1 > "$CUDA_WHEEL".tmp && mv "$CUDA_WHEEL".tmp "$CUDA_WHEEL"
  fi
  echo "$CUDA_WHEEL_SHA256  $CUDA_WHEEL" | sha256sum -c -
  rm -rf "$SITE" && mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHL"/mlx-0.32.4-*.whl "$WHL/$CUDA_WHEEL" "$WHL"/mlx_lm-*.whl "$WHL"/orjson-*.whl "$WHL"/tomli_w-*.whl \
    "$WHL"/tenacity-*.whl "$WHL"/obstore-*.whl
  cd "$REPO"
  check
}

check() {
  env_setup
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" - <<'EOF'
import mlx.core as mx, mlx_lm, transformers, numpy
print("mlx", mx.__version__, "mlx_lm", mlx_lm.__version__, "transformers", transformers.__version__,
      "numpy", numpy.__version__)
print("cuda available:", mx.cuda.is_available(), "default device:", mx.default_device())
a = mx.random.normal((4096, 4096))
w, s, b = mx.quantize(a, group_size=64, bits=4)
y = mx.quantized_matmul(a, w, s, b, transpose=True, group_size=64, bits=4)
mx.eval(y)
print("4-bit quantized matmul on", mx.default_device(), "ok:", y.shape)
print("device_info:", mx.device_info())
EOF
}

bench() {
  local shape="$1"; shift
  env_setup
  # One GPU for both tools. With two visible, mlx_lm lora on the demo model dies at its second batch
  # ("cudaMemcpy(...) failed: invalid argument" in mx.array, MLX 0.32.4, 2 x H100); with one it runs.
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
  mkdir -p "$OUT/$shape"
  set -o pipefail
  "$PY" "$REPO/bench/bench_cuda.py" --shape "$shape" --work "/tmp/farense-bench" --out "$OUT/$shape" "$@" \
    2>&1 | tee "$OUT/$shape/bench.log"
}

sweep() {  # farense alone on the 7B shape, one process per configuration: where MFU goes with the step's size
  env_setup
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
  mkdir -p "$OUT/sweep" /tmp/sweep
  local repeat=0 c best
  local summary="$OUT/sweep/summary.tsv"
  [[ -f "$summary" ]] || printf 'config\trun\ttokens/s\tGFLOP/token\tTFLOP/s\tMFU%%\tMFU w/o recompute%%\tpeak GB\tfinal loss\tval loss\tLoRA matmuls\talignment\n' > "$summary"
  local configs=()
  for c in "$@"; do
    case "$c" in --sweep-repeat=*) repeat="${c#*=}" ;; *) configs+=("$c") ;; esac
  done
  one() {  # one configuration, run number $2
    local c="$1" n="$2" b s steps args
    b="${c%%x*}"; s="${c#*x}"; s="${s%%-*}"
    steps=20; (( b * s >= 8192 )) && steps=12
    [[ "$c" =~ -s([0-9]+) ]] && steps="${BASH_REMATCH[1]}"
    args=(--shape 7b --skip-mlx-lm --rounds 1 --computes auto --no-generate --batch-size "$b" --seq-len "$s"
          --steps "$steps" --checkpoint-every "$steps" --timeout 200)
    [[ "$c" == *-nogc* ]] && args+=(--no-grad-checkpoint)
    [[ "$c" == *-bf16* ]] && args+=(--lora-dtype bfloat16)
    [[ "$c" == *-fp32* ]] && args+=(--lora-dtype float32)
    [[ "$c" =~ -align($|-) ]] && args+=(--align-tokens 128)
    [[ "$c" == *-noalign* ]] && args+=(--align-tokens 0)
    local out="/tmp/sweep/$c-run$n"
    echo "== sweep $c run $n: bench_cuda.py ${args[*]}"
    # Each run under its own limit, so that a stuck or slow run still leaves its log in runs.tgz.
    if timeout "${SWEEP_RUN_TIMEOUT:-240}" "$PY" "$REPO/bench/bench_cuda.py" "${args[@]}" --work /tmp/farense-bench \
        --out "$out" > "$out.log" 2>&1; then
      "$PY" - "$out/results.json" "$c" "$n" >> "$summary" <<'EOF'
import json, re, sys
r = json.load(open(sys.argv[1])); f = r["rounds"][-1]["farense"]; fl = r["flops_per_step"]
print("\t".join([sys.argv[2], sys.argv[3], f"{f['tokens_per_s_wall_interval']:.0f}", f"{fl['per_token'] / 1e9:.2f}",
                 f"{f['tflops_per_s']:.1f}", f"{f['mfu_percent']:.1f}", f"{f['mfu_percent_without_recompute']:.1f}",
                 f"{f['peak_memory_gb']:.2f}", f"{f['final_train_loss']:.4f}", f"{f['val_loss'] or float('nan'):.4f}",
                 (f.get("lora_matmuls") or "?").split(" ")[0],
                 "off" if (f.get("alignment") or "").startswith("off") else
                 (re.findall(r"multiple of (\d+)", f.get("alignment") or "") or ["?"])[0]]))
EOF
    else
      printf '%s\t%s\tFAILED\n' "$c" "$n" >> "$summary"; tail -5 "$out.log"
    fi
    tail -1 "$summary"
    tar czf "$OUT/sweep/runs.tgz" -C /tmp --exclude='*.safetensors' sweep 2>/dev/null || true
  }
  local -A seen=()  # a configuration named again is its next run
  for c in "${configs[@]}"; do seen[$c]=$(( ${seen[$c]:-0} + 1 )); one "$c" "${seen[$c]}"; done
  if (( repeat > 0 )); then
    best="$(awk -F'\t' 'NR > 1 && $3 != "FAILED" && $6 + 0 > m {m = $6 + 0; c = $1} END {print c}' "$summary")"
    local first=$(( ${seen[$best]:-1} + 1 ))
    for ((n = first; n < first + repeat; n++)); do [[ -n "$best" ]] && one "$best" "$n"; done
  fi
  return 0
}

nccl() {  # bench_nccl.py: 1 GPU vs 2, a SIGKILLed rank, the resume (needs 2 GPUs)
  env_setup
  mkdir -p "$OUT/nccl"
  set -o pipefail
  "$PY" "$REPO/bench/bench_nccl.py" --work "/tmp/farense-bench" --out "$OUT/nccl" "$@" 2>&1 | tee "$OUT/nccl/bench.log"
}

script() {  # any bench script, with the same environment and one GPU as `bench`
  env_setup
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
  "$PY" "$REPO/$@"
}

probe() {  # nccl_probe.py: all_sum time and bandwidth between two GPUs, beside the LoRA gradients' size
  env_setup
  mkdir -p "$OUT/nccl"
  # (mlx._distributed_utils.launch has no __main__ guard: call its main, as farense's launcher does)
  "$PY" -c "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; sys.exit(main())" \
    --hosts 127.0.0.1 -n 2 --backend nccl -- "$PY" "$REPO/bench/nccl_probe.py" \
    2>&1 | tee "$OUT/nccl/probe.log"
}

startup() {  # where a start-up's seconds go: python -X importtime of the import path training needs
  env_setup
  mkdir -p "$OUT/startup"
  local hide="import sys; sys.modules['torch'] = None; "  # what farense.cli.keep_torch_out does
  local imp="import mlx.core as mx; from mlx_lm.tuner.trainer import default_loss; from mlx_lm.utils import load"
  for i in 1 2; do  # the second pass has a warm page cache and bytecode
    for v in with-torch without-torch; do
      local pre=""; [[ "$v" == without-torch ]] && pre="$hide"
      local t0; t0=$(date +%s%N)
      "$PY" -X importtime -c "$pre$imp" 2> "$OUT/startup/importtime-$v.txt"
      echo "pass $i, mlx + mlx_lm training imports, $v: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    done
  done
  local t0; t0=$(date +%s%N); "$PY" -c "import torch"; echo "import torch alone: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  for v in with-torch without-torch; do
    echo "== $v: top 12 by cumulative import time (us)"
    sort -t'|' -k2 -n -r "$OUT/startup/importtime-$v.txt" | head -12  || true
  done
}

ptxcache() {  # MLX's CUDA kernel cache (MLX_PTX_CACHE_DIR): one farense process on an empty cache dir,
  # then on the same dir, then on a copy of it elsewhere (as if carried to a fresh machine); all else warm
  env_setup
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
  mkdir -p "$OUT/ptxcache"
  rm -rf /tmp/ptx-empty /tmp/ptx-copy
  local n=0 log
  for d in /tmp/ptx-empty /tmp/ptx-empty /tmp/ptx-copy; do
    [[ "$d" == /tmp/ptx-copy ]] && cp -a /tmp/ptx-empty /tmp/ptx-copy
    n=$((n + 1)); log="$OUT/ptxcache/run$n.log"
    MLX_PTX_CACHE_DIR="$d" "$PY" "$REPO/bench/bench_cuda.py" --shape "${1:-demo}" --work /tmp/farense-bench \
      --rounds 1 --skip-mlx-lm "${@:2}" > "$log" 2>&1 || { tail -20 "$log"; return 1; }
    # the summary is written as it goes: a call stopped at its time limit still brings it back
    echo "run $n, MLX_PTX_CACHE_DIR=$d: $(grep -E '^\| (process wall time, warm|first step)' "$log" | tr -s ' ' | paste -sd' ')" \
      | tee -a "$OUT/ptxcache/summary.txt"
    echo "  cache: $(du -sh "$d" | cut -f1), $(ls "$d" | wc -l) files" | tee -a "$OUT/ptxcache/summary.txt"
  done
  { du -sh "$HOME/.nv/ComputeCache" 2>/dev/null || echo "no driver JIT cache at ~/.nv/ComputeCache"; } \
    | tee -a "$OUT/ptxcache/summary.txt"
}

COMMANDS=" stage install check probe startup ptxcache bench sweep nccl script "

# The command's name, then its fixed arguments ($1: how many), then its own arguments up to the next
# command: one command with all its arguments, as an array named `cmd`; `taken`: how many words.
take_command() {
  local fixed="$1"; shift
  cmd=("$1" "${@:2:$fixed}")
  local rest=("${@:$((fixed + 2))}")
  for word in ${rest[@]+"${rest[@]}"}; do
    [[ "$COMMANDS" == *" $word "* ]] && break
    cmd+=("$word")
  done
  taken=${#cmd[@]}
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    stage|install|check|probe|startup) take_command 0 "$1" ;;
    ptxcache) take_command 0 "$@" ;;
    nccl|sweep) take_command 0 "$@" ;;
    bench|script) take_command 1 "$@" ;;
    *) echo "unknown command: $1 (stage | install | check | probe | bench SHAPE [args] | sweep CONFIG... | nccl [args] | script FILE [args])" >&2; exit 2 ;;
  esac
  shift "$taken"
  "${cmd[@]}"
done
