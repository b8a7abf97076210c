#!/usr/bin/env bash
# Set up a virtual environment per interpreter and run the test suite in each:
# Python 3.11 (jax 0.10.x, torch 2.13.0 as reference) and Python 3.12 (newest jax);
# then the kernel tests once more on jax $CATJAX_KERNEL_JAX (default 0.11.2, the
# GPU machine's version; empty skips it), where the Mosaic GPU kernel must lower too.
#   scripts/test.sh [pytest args]        CATJAX_PYTHONS="3.12" scripts/test.sh -k hadamard
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
pythons="${CATJAX_PYTHONS:-3.11 3.12}"
kjax="${CATJAX_KERNEL_JAX-0.11.2}"
tunix="${CATJAX_TUNIX-0.1.7}"
case " $pythons " in *" 3.12 "*) ;; *) kjax="" ;; esac
case " $pythons " in *" 3.11 "*) ;; *) tunix="" ;; esac
[ $# -gt 0 ] && kjax="" && tunix=""
echo "scripts/test.sh: pytest on Python $pythons${kjax:+, then tests/kernels/test_kernels.py on jax $kjax}" \
     "${tunix:+and the tunix model tests on google-tunix $tunix};" \
     "a full run takes ~30 min on 2 cores with XLA's compilation cache warm, ~40 cold, and ~7 GB of virtual environments (.venv-*)."
elapsed() {  # minutes and seconds since $1 (seconds since the script began)
  echo "$(( (SECONDS - $1) / 60 )) min $(( (SECONDS - $1) % 60 )) s"
}

# Each stage starts as soon as its environment is ready (the setups run one after
# the other: editable installs write into the tree), into .test-logs/stageN.log;
# CATJAX_SERIAL=1 sets everything up first, then runs the stages one by one.
names=() cmds=() pids=()
serial="${CATJAX_SERIAL:-0}"
[ "$serial" = 1 ] || mkdir -p .test-logs
stage() {  # stage NAME COMMAND
  names+=("$1")
  cmds+=("$2")
  [ "$serial" = 1 ] && return
  local log=".test-logs/stage$(( ${#names[@]} - 1 )).log"
  ( t0=$SECONDS; bash -c "$2"; rc=$?; echo "--- $1: $(elapsed "$t0")"; exit $rc ) > "$log" 2>&1 &
  pids+=($!)
  echo "started: $1 (log $log)"
}

# XLA's compiled programs persist between runs (tests/conftest.py turns JAX's
# compilation cache on, CATJAX_XLA_CACHE=0 off): a rerun skips most compile time.
# Entries not rewritten for two weeks are pruned here (the cache has no size limit).
xla="${CATJAX_XLA_CACHE:-${CATJAX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/catjax}/xla}"
[ "$xla" != 0 ] && [ -d "$xla" ] && find "$xla" -type f -mtime +14 -delete

# 1. Environments and stages. Python 3.11's suite (PyTorch's reference tests run
# only there) is the longest: without pytest arguments it runs as two
# processes, these files and the others.
split="tests/models/test_real_models.py tests/models/test_sharding.py tests/app/test_lmeval.py"
split+=" tests/app/test_smollm2.py tests/app/test_report_cli.py tests/core/test_formats.py"
# SpinQuant's whole-model programs run in part 1: in part 2's process, after its other
# tests, jaxlib 0.10's reading of one of them from the compilation cache aborted
# (twice, at the same test; alone, and on 3.12, they pass).
split+=" tests/ptq/test_spinquant.py"
# The app floor (CLI, reports, data and asset files, the docs' code blocks) is
# Python over the library, the same on every interpreter: it runs on 3.11 only,
# which keeps the full run within CI's budget; every library floor runs on both,
# except its tests marked `cli` (they drive the command line end to end).
once="tests/app"
# The slowest tests of every stage, for the next budget decision.
durations="--durations=15"
args=""
[ $# -gt 0 ] && args=$(printf '%q ' "$@")
for v in $pythons; do
  t0=$SECONDS
  if py=$(scripts/setup.sh "$v" test | tail -n 1); then
    echo "--- setup of Python $v: $(elapsed "$t0")"
    if [ -z "${fetched:-}" ]; then  # the models and texts the tests read, once, before any test
      t0=$SECONDS
      "$py" -c "from catjax.app import assets; [assets.fetch(n) for n in assets.ASSETS]" ||
        echo "fetching the assets failed; the tests that need them will say which"
      echo "--- assets (~1.4 GB on a first run, cached in \${CATJAX_CACHE:-~/.cache/catjax}): $(elapsed "$t0")"
      fetched=1
    fi
    if [ "$v" = 3.11 ] && [ -z "$args" ]; then
      stage "Python $v, part 1" "\"$py\" -m pytest -q $durations $split"
      stage "Python $v, part 2" "\"$py\" -m pytest -q $durations $(printf -- '--ignore=%s ' $split)"
    elif [ -z "$args" ]; then
      stage "Python $v" "\"$py\" -m pytest -q $durations --ignore=$once -m 'not cli'"
    else
      stage "Python $v" "\"$py\" -m pytest -q $args"
    fi
    [ "$v" = 3.12 ] && py312="$py"
    [ "$v" = 3.11 ] && py311="$py"
  else
    echo "setup for Python $v failed"
    status=1
  fi
done
if [ -n "$kjax" ] && [ -n "${py312:-}" ]; then
  t0=$SECONDS
  venv=".venv-jax$kjax"
  if { [ -x "$venv/bin/python" ] || "$py312" -m venv "$venv"; } &&
     "$venv/bin/python" -m pip install -q --disable-pip-version-check \
       "jax==$kjax" "jaxlib==$kjax" numpy pytest \
       2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); then
    echo "--- setup of jax $kjax: $(elapsed "$t0")"
    stage "kernels on jax $kjax" \
      "PYTHONPATH=\"$PWD\" \"$venv/bin/python\" -m pytest -q $durations tests/kernels/test_kernels.py"
  else
    echo "setup of jax $kjax for the kernel tests failed"
    status=1
  fi
fi

# tunix's Llama3 and Qwen2 as foreign models: their own environment (google-tunix
# brings ~100 packages; torch for the transformers reference), their own stage.
tunix_tests="tests/models/test_tunix.py tests/ptq/test_foreign_tunix.py tests/ptq/test_qwix.py"
if [ -n "$tunix" ] && [ -n "${py311:-}" ]; then
  t0=$SECONDS
  venv=".venv-tunix"
  if { [ -x "$venv/bin/python" ] || "$py311" -m venv "$venv"; } &&
     "$venv/bin/python" -m pip install -q --disable-pip-version-check -e . \
       "google-tunix==$tunix" "torch==2.13.0" pytest \
       2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); then
    echo "--- setup of google-tunix $tunix: $(elapsed "$t0")"
    stage "tunix $tunix models" "\"$venv/bin/python\" -m pytest -q $durations -W ignore::DeprecationWarning $tunix_tests"
  else
    echo "setup of google-tunix $tunix failed"
    status=1
  fi
fi

# 2. Results.
for i in "${!names[@]}"; do
  echo "=== ${names[$i]} ==="
  if [ "$serial" = 1 ]; then
    t0=$SECONDS
    bash -c "${cmds[$i]}" || status=1
    echo "--- ${names[$i]}: $(elapsed "$t0")"
  else
    wait "${pids[$i]}" || status=1
    cat ".test-logs/stage$i.log"
  fi
done
echo "--- total: $(( SECONDS / 60 )) min $(( SECONDS % 60 )) s"
exit $status
