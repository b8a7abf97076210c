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
kjax="${CATJAX_KERNEL_JAX-0.11.2}"
kernels=", then tests/test_kernels.py on jax $kjax"
case " ${CATJAX_PYTHONS:-3.11 3.12} " in *" 3.12 "*) ;; *) kernels="" ;; esac
{ [ -z "$kjax" ] || [ $# -gt 0 ]; } && kernels=""
echo "scripts/test.sh: pytest on Python ${CATJAX_PYTHONS:-3.11 3.12}$kernels;" \
     "a full run takes ~35 min on 2 cores and ~4 GB of virtual environments (.venv-py*, .venv-jax*)."
stage() {  # elapsed time of the stage that started at $1 (seconds since the script began)
  echo "--- $2: $(( (SECONDS - $1) / 60 )) min $(( (SECONDS - $1) % 60 )) s"
}
for v in ${CATJAX_PYTHONS:-3.11 3.12}; do
  echo "=== Python $v ==="
  t0=$SECONDS
  if ! py=$(scripts/setup.sh "$v" test | tail -n 1); then
    echo "setup for Python $v failed"
    stage "$t0" "Python $v (setup failed)"
    status=1
    continue
  fi
  [ "$v" = 3.12 ] && py312="$py"
  "$py" -m pytest -q "$@" || status=1
  stage "$t0" "Python $v"
done
if [ -n "$kjax" ] && [ -n "$py312" ] && [ $# -eq 0 ]; then
  echo "=== Kernels on jax $kjax ==="
  t0=$SECONDS
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
  stage "$t0" "kernels on jax $kjax"
fi
echo "--- total: $(( SECONDS / 60 )) min $(( SECONDS % 60 )) s"
exit $status
