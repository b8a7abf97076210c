#!/usr/bin/env bash
# Set up a virtual environment per interpreter and run the test suite in each:
# Python 3.11 (jax 0.10.x, torch 2.13.0 as reference) and Python 3.12 (newest jax).
#   scripts/test.sh [pytest args]        CATJAX_PYTHONS="3.12" scripts/test.sh -k hadamard
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
for v in ${CATJAX_PYTHONS:-3.11 3.12}; do
  echo "=== Python $v ==="
  if ! py=$(scripts/setup.sh "$v" test | tail -n 1); then
    echo "setup for Python $v failed"
    status=1
    continue
  fi
  "$py" -m pytest -q "$@" || status=1
done
exit $status
