#!/usr/bin/env bash
# The GPU measurements for docs/performance.md as one script (expected to take about 5 minutes on
# one H100, not yet run on one; each benchmark has its own time limit, 9.5 minutes in all):
#   scripts/gpu_bench.sh [OUT_DIR]
# OUT_DIR (default $OUT, else ./gpu_bench_out) receives gpu_bench.log (everything printed),
# results.jsonl (each benchmark's JSON line plus its name) and profile/ (an XLA trace of 3 train
# steps: open it with TensorBoard's profile plugin or xprof, or load profile/**/*.trace.json.gz in
# Perfetto). Every benchmark runs even if an earlier one failed; the exit code is 1 if any failed.
#
# Python: $PYTHON, else the first of .venv/bin/python and python3 whose JAX sees a GPU; if none
# does, `pip install -e .[cuda]` is tried once (it needs PyPI) and the benchmarks then run on
# whatever JAX finds, which each JSON line names ("device"). Where that Python lacks vnet_jax's
# other dependencies (a GPU image with JAX but no network), the wheels in .whl/ are installed for
# this run: fetch them beforehand with scripts/gpu_wheels.sh.
# GPU_BENCH_SMOKE=1 runs the same steps at tiny sizes (checks the script on a CPU in a minute).
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:-${OUT:-gpu_bench_out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
results="$out/results.jsonl"
: > "$results"
exec > >(tee -a "$out/gpu_bench.log") 2>&1
smoke=${GPU_BENCH_SMOKE:-0}

has_gpu() { "$1" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' >/dev/null 2>&1; }

echo "== $(date -u +%FT%TZ) scripts/gpu_bench.sh on $(hostname), smoke=$smoke"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "(no nvidia-smi)"
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && has_gpu "$candidate"; then python=$candidate; break; fi
  done
fi
if [ -z "$python" ]; then
  python=python3
  [ -x .venv/bin/python ] && python=.venv/bin/python
  if [ "$smoke" != 1 ]; then
    echo "== no JAX with a GPU backend: trying $python -m pip install -e .[cuda]"
    # Short network timeouts: an offline machine fails in seconds instead of minutes of retries.
    timeout 600 "$python" -m pip install -q --retries 1 --timeout 20 -e ".[cuda]" \
      || echo "!! pip install -e .[cuda] failed (offline?); running on the backend JAX finds"
  fi
fi
"$python" -c 'import jax; print("python", __import__("sys").executable, "jax", jax.__version__, jax.devices())' \
  || { echo "!! $python: jax does not import"; exit 1; }
# What the benchmarks import (bench.py imports them only when one runs).
imports='import vnet_jax.bench, vnet_jax.benchmarks.train_step, vnet_jax.benchmarks.predict_path'
if ! "$python" -c "$imports" >/dev/null 2>&1 && compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  echo "== installing .whl/*.whl into $site for this run"
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c "$imports" || {
  echo "!! vnet_jax does not import with $python: run scripts/gpu_wheels.sh where PyPI is reachable and bring .whl/"
  exit 1
}
# JAX preallocates 75% of GPU memory by default; without it, memory_stats' peak is the step's own.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

failed=0
run() {  # run NAME SECONDS ARGS...: one benchmark; its last line (JSON) goes to results.jsonl
  local name=$1 limit=$2 start=$SECONDS tmp
  shift 2
  tmp=$(mktemp)
  echo
  echo "== $(date -u +%T) $name: python -m vnet_jax.bench $*"
  timeout "$limit" "$python" -m vnet_jax.bench "$@" 2>&1 | tee "$tmp"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ] && tail -n 1 "$tmp" | NAME=$name "$python" -c \
      'import json, os, sys; r = json.loads(sys.stdin.read()); print(json.dumps({"name": os.environ["NAME"], **r}))' \
      >> "$results"; then
    echo "== $name: $((SECONDS - start)) s"
  else
    echo "!! $name failed (exit $rc, $((SECONDS - start)) s)"
    failed=1
  fi
  rm -f "$tmp"
}

if [ "$smoke" = 1 ]; then
  train=(--patch=16,32,32 --per_device_batch=1 --filters=2,4,4,8,8 --steps=2)
  infer=(--shape=48,48,12 --spacing=0.8,0.8,2.5 --target_spacing=2.5,1.0,1.0 --patch=16,32,32 --filters=2,4,4,8,8)
else
  # The experiments' model (filters 16..128) at its training patch and per-device batch.
  train=(--patch=128,128,128 --per_device_batch=2 --filters=16,32,64,128,128 --steps=20)
  # A FLARE22-sized CT (512 x 512 x 110 at 0.8 x 0.8 x 2.5 mm), predicted at FLARE22's median
  # spacing with the training patch: the whole predict path, one volume.
  infer=(--shape=512,512,110 --spacing=0.8,0.8,2.5 --target_spacing=2.5,0.8,0.8 --patch=128,128,128
         --filters=16,32,64,128,128)
fi

run train_float32 180 train "${train[@]}" --dtype=float32 --profile_dir="$out/profile"
run train_bfloat16 150 train "${train[@]}" --dtype=bfloat16
run infer 120 infer "${infer[@]}"
run infer_tta 120 infer "${infer[@]}" --tta

echo
echo "== results ($results):"
cat "$results"
echo "== $(date -u +%FT%TZ) done, failed=$failed"
exit $failed
