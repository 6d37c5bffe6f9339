# Sourced by scripts/dev and scripts/check: make .venv with Python 3.11+ and install the project.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      python=$candidate
      break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "streamsaga needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
# a venv whose pip is missing was cut short (say, ensurepip absent): make it again
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  rm -rf .venv
  if ! "$python" -m venv .venv; then
    rm -rf .venv
    echo "cannot create .venv with $python: on Debian or Ubuntu install python3-venv (it brings ensurepip)" >&2
    exit 1
  fi
  # a new venv's pip may predate editable installs from pyproject.toml (PEP 660)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
fi
target="."
[ -n "${STREAMSAGA_EXTRAS:-}" ] && target=".[${STREAMSAGA_EXTRAS}]"
# quiet means quiet: setuptools prints a ten-line banner on every editable install
PYTHONWARNINGS="ignore::UserWarning" .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$target"
