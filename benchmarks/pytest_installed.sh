#!/usr/bin/env bash
# pytest on this checkout's tests against the *installed* engm_fast (a wheel, say): run from a
# scratch folder with `python -P`, so that neither the checkout nor the current folder is on
# sys.path; the tests' own folder is (pytest's default import mode puts it there), which is how
# they share tests/conftest.py's helpers. Arguments go to pytest: options and absolute test paths.
#
#     PYTHON=python3 bash benchmarks/pytest_installed.sh -q "$PWD/tests"
#
# benchmarks/gpu_validate.sh runs the tests on the GPU machine this way; .ci/run runs it with
# --collect-only against the CUDA wheel, so the suite keeps collecting from outside the repo.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="$(mktemp -d /tmp/engm_pytest_installed.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
"${PYTHON:-python3}" -P -m pytest -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" "$@"
