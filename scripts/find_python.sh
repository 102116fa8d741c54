#!/usr/bin/env bash
# Print the path of a Python interpreter of the wanted minor version (default 3.12).
# Looks at pythonX.Y on PATH, then pyenv's and uv's installs; exits 1 if none runs.
set -u
want="${1:-3.12}"
candidates=("python$want")
if command -v pyenv >/dev/null 2>&1; then
  for d in "$(pyenv root)"/versions/"$want"*; do candidates+=("$d/bin/python$want"); done
fi
for d in "$HOME"/.local/share/uv/python/cpython-"$want"*; do candidates+=("$d/bin/python$want"); done
for c in "${candidates[@]}"; do
  if out=$("$c" -c 'import sys; print(sys.executable, "%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    exe=${out% *}; ver=${out##* }
    if [ "$ver" = "$want" ]; then echo "$exe"; exit 0; fi
  fi
done
echo "no Python $want found (tried: ${candidates[*]}); install it, e.g. with pyenv or uv" >&2
exit 1
