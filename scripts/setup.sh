#!/usr/bin/env bash
# Create (or update) .venv-py<VERSION> with catjax installed in editable mode.
#   scripts/setup.sh 3.11 [extras]     e.g. scripts/setup.sh 3.12 test
# Prints the path of the environment's python on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
version="$1"
extras="${2:-}"

find_python() {
  local v="$1" cand
  for cand in "python$v" "$(pyenv root 2>/dev/null)/versions/$v"*/bin/"python$v" \
              /usr/bin/"python$v" /usr/local/bin/"python$v"; do
    if [ -n "$cand" ] && "$cand" -c "import sys" >/dev/null 2>&1; then
      echo "$cand"
      return 0
    fi
  done
  echo "error: no working python$v found (tried python$v, pyenv versions, /usr/bin)" >&2
  return 1
}

py=$(find_python "$version")
venv=".venv-py$version"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv" >&2
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# pip's warnings about this machine's local index folders are noise; real errors fail the script.
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$spec" >&2 \
     2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); then
  echo "error: pip install -e '$spec' failed in $venv" >&2
  exit 1
fi
"$venv/bin/python" -c "import catjax, jax; print('catjax ready:', jax.__version__)" >&2
echo "$venv/bin/python"
