#!/usr/bin/env bash
# Set up a virtual environment per interpreter and run the test suite in each:
# Python 3.11 (jax 0.10.x, torch 2.13.0 as reference) and Python 3.12 (newest jax);
# then the kernel tests once more on jax $CATJAX_KERNEL_JAX (default 0.11.2, the
# GPU machine's version; empty skips it), where the Mosaic GPU kernel must lower too.
#   scripts/test.sh [pytest args]        CATJAX_PYTHONS="3.12" scripts/test.sh -k hadamard
# The environments are set up one after the other (editable installs write into the
# tree); the test stages then run at the same time, one per core, each into its log
# under .test-logs/, printed when it ends. CATJAX_SERIAL=1 runs them one after the
# other with live output.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
pythons="${CATJAX_PYTHONS:-3.11 3.12}"
kjax="${CATJAX_KERNEL_JAX-0.11.2}"
case " $pythons " in *" 3.12 "*) ;; *) kjax="" ;; esac
[ $# -gt 0 ] && kjax=""
echo "scripts/test.sh: pytest on Python $pythons${kjax:+, then tests/test_kernels.py on jax $kjax};" \
     "a full run takes ~40 min on 2 cores and ~4 GB of virtual environments (.venv-py*, .venv-jax*)."
elapsed() {  # minutes and seconds since $1 (seconds since the script began)
  echo "$(( (SECONDS - $1) / 60 )) min $(( (SECONDS - $1) % 60 )) s"
}

# 1. Environments.
names=() cmds=()
args=""
[ $# -gt 0 ] && args=$(printf '%q ' "$@")
for v in $pythons; do
  t0=$SECONDS
  if py=$(scripts/setup.sh "$v" test | tail -n 1); then
    names+=("Python $v")
    cmds+=("\"$py\" -m pytest -q $args")
    [ "$v" = 3.12 ] && py312="$py"
  else
    echo "setup for Python $v failed"
    status=1
  fi
  echo "--- setup of Python $v: $(elapsed "$t0")"
done
if [ -n "$kjax" ] && [ -n "${py312:-}" ]; then
  t0=$SECONDS
  venv=".venv-jax$kjax"
  if { [ -x "$venv/bin/python" ] || "$py312" -m venv "$venv"; } &&
     "$venv/bin/python" -m pip install -q --disable-pip-version-check \
       "jax==$kjax" "jaxlib==$kjax" numpy pytest \
       2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); then
    names+=("kernels on jax $kjax")
    cmds+=("PYTHONPATH=\"$PWD\" \"$venv/bin/python\" -m pytest -q tests/test_kernels.py")
  else
    echo "setup of jax $kjax for the kernel tests failed"
    status=1
  fi
  echo "--- setup of jax $kjax: $(elapsed "$t0")"
fi

# 2. Test stages.
if [ "${CATJAX_SERIAL:-0}" = 1 ]; then
  for i in "${!names[@]}"; do
    echo "=== ${names[$i]} ==="
    t0=$SECONDS
    bash -c "${cmds[$i]}" || status=1
    echo "--- ${names[$i]}: $(elapsed "$t0")"
  done
else
  mkdir -p .test-logs
  pids=()
  for i in "${!names[@]}"; do
    log=".test-logs/stage$i.log"
    ( t0=$SECONDS; bash -c "${cmds[$i]}"; rc=$?
      echo "--- ${names[$i]}: $(elapsed "$t0")"; exit $rc ) > "$log" 2>&1 &
    pids+=($!)
  done
  echo "running ${#names[@]} test stages at once; logs in .test-logs/"
  for i in "${!names[@]}"; do
    wait "${pids[$i]}" || status=1
    echo "=== ${names[$i]} ==="
    cat ".test-logs/stage$i.log"
  done
fi
echo "--- total: $(( SECONDS / 60 )) min $(( SECONDS % 60 )) s"
exit $status
