#!/usr/bin/env bash
# Fetches, where PyPI is reachable, the wheels that scripts/gpu_bench.sh installs on a GPU machine
# with no network whose Python 3.12 already has JAX (CUDA), Flax, Optax, Orbax, NumPy, SciPy,
# Matplotlib, absl, etils, protobuf and PyYAML: vnet_jax's other dependencies, into .whl/
# (git-ignored; about 8 MB), without their own dependencies (that image has them).
#   scripts/gpu_wheels.sh      then send .whl/ with the working tree
# $PYTHON (default python3) only runs pip; the wheels are for CPython 3.12 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
rm -rf .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  grain array-record portpicker nibabel ml-collections surface-distance tensorboardX
ls .whl
