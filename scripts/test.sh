#!/usr/bin/env bash
# Set up a virtual environment per interpreter and run the test suite in each:
# Python 3.11 (jax 0.10.x, torch 2.13.0 as reference) and Python 3.12 (newest jax);
# then the kernel tests once more on jax $CATJAX_KERNEL_JAX (default 0.11.2, the
# GPU machine's version; empty skips it), where the Mosaic GPU kernel must lower too.
#   scripts/test.sh [pytest args]        CATJAX_PYTHONS="3.12" scripts/test.sh -k hadamard
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
py312=""
for v in ${CATJAX_PYTHONS:-3.11 3.12}; do
  echo "=== Python $v ==="
  if ! py=$(scripts/setup.sh "$v" test | tail -n 1); then
    echo "setup for Python $v failed"
    status=1
    continue
  fi
  [ "$v" = 3.12 ] && py312="$py"
  "$py" -m pytest -q "$@" || status=1
done
kjax="${CATJAX_KERNEL_JAX-0.11.2}"
if [ -n "$kjax" ] && [ -n "$py312" ] && [ $# -eq 0 ]; then
  echo "=== Kernels on jax $kjax ==="
  venv=".venv-jax$kjax"
  if { [ -x "$venv/bin/python" ] || "$py312" -m venv "$venv"; } &&
     "$venv/bin/python" -m pip install -q --disable-pip-version-check \
       "jax==$kjax" "jaxlib==$kjax" numpy pytest \
       2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); then
    PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q tests/test_kernels.py || status=1
  else
    echo "setup of jax $kjax for the kernel tests failed"
    status=1
  fi
fi
exit $status
