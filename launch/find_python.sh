#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter: PATH first, then pyenv's versions.
set -euo pipefail
ok() { "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
for c in python3.12 python3.13 python3 python; do
  p=$(command -v "$c" 2>/dev/null) || continue
  if ok "$p"; then echo "$p"; exit 0; fi
done
roots=()
command -v pyenv >/dev/null 2>&1 && roots+=("$(pyenv root)")
roots+=("${PYENV_ROOT:-$HOME/.pyenv}")
for r in "${roots[@]}"; do
  for p in $(ls -d "$r"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
    if ok "$p"; then echo "$p"; exit 0; fi
  done
done
echo "error: no Python >= 3.12 found on PATH or under pyenv; install one (e.g. 'pyenv install 3.12')" >&2
exit 1
