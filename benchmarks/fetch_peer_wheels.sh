#!/usr/bin/env bash
# Downloads the benchmark's peers (pure-Python wheels) into .whl/ for the GPU machine, which has
# no network; the device call names .whl in `carry`, and gpu_validate.sh installs them to a side
# directory. The image already has einops, opt-einsum, scipy and pytest-benchmark.
#
#     bash benchmarks/fetch_peer_wheels.sh && grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  backpack-for-pytorch==1.7.1 opacus==1.6.0 unfoldNd==0.2.3
ls -l .whl
