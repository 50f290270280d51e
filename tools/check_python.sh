#!/bin/sh
# Fails, saying why, unless $1 is a Python >= 3.11: which interpreter, the version found, and
# how to get another one. The Makefile runs it before it creates or uses .venv.
python=${1:-python3}
what=${2:-PYTHON}
path=$(command -v "$python" 2>/dev/null) || path=""
if [ -n "$path" ] && "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    exit 0
fi
if [ -z "$path" ]; then
    found="not found on PATH"
else
    found="Python $("$python" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(unknown version)') at $path"
fi
cat >&2 <<MSG
infergate needs Python >= 3.11; $what=$python is $found.
  Install one (macOS: brew install python@3.12, or uv python install 3.12; Debian/Ubuntu:
  apt install python3.12-venv, or pyenv), then run with it: make up PYTHON=python3.12
MSG
if [ "$what" = ".venv" ]; then
    echo "  .venv was made with that Python: remove it first (make clean)." >&2
fi
exit 1
