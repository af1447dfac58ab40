#!/usr/bin/env bash
# ./run.sh            set up .venv, then train and validate the demo experiment (CPU is fine)
# ./run.sh test       set up .venv, then run the whole test suite (two pytest workers)
# ./run.sh test-quick set up .venv, then run the tests not marked slow
# ./run.sh lint       set up .venv, then check lint and formatting with ruff
# ./run.sh train ARGS set up .venv, then python -m vnet_jax.main ARGS
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -n "$python" ] || { echo "run.sh: no python3 found; install Python 3.11" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "run.sh: creating .venv with $python"
  "$python" -m venv .venv
fi

extras=test
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extras=test,cuda; fi
# Reinstall only when the package's declared dependencies or the extras change.
stamp=".venv/.vnet_jax-install-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)-${extras/,/_}"
if [ ! -f "$stamp" ]; then
  echo "run.sh: installing vnet_jax[$extras] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  rm -f .venv/.vnet_jax-install-*
  touch "$stamp"
fi

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) exec .venv/bin/python -m vnet_jax.main --experiment=demo "$@" ;;
  test) exec .venv/bin/python -m pytest -q -n 2 "$@" ;;
  test-quick) exec .venv/bin/python -m pytest -q -n 2 -m "not slow" "$@" ;;
  lint) .venv/bin/ruff check "$@" . && exec .venv/bin/ruff format --check . ;;
  train) exec .venv/bin/python -m vnet_jax.main "$@" ;;
  *) echo "usage: ./run.sh [test|test-quick|lint|train ARGS...]" >&2; exit 2 ;;
esac
