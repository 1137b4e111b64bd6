#!/usr/bin/env bash
# Creates .venv and installs mixq (editable, with its C++ kernels) and everything the tests and the
# default run need. Re-running is cheap: it reinstalls only when the build inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${MIXQ_PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1; then PY="$c"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: no python3 found" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi

stamp=.venv/.mixq-build-stamp
want=$({ cat pyproject.toml setup.py requirements-dev.txt
         find csrc -type f \( -name '*.cpp' -o -name '*.h' \) -print0 2>/dev/null | sort -z | xargs -0 -r cat || true
       } | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import mixq" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

pip_install() {
  # The machine's pip config lists local package folders that may be absent: hide those warnings only.
  .venv/bin/python -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}
echo "setup: installing torch and build tools (first run: a few minutes)"
pip_install "setuptools>=64" wheel ninja
pip_install -r requirements-dev.txt
echo "setup: installing mixq with its C++ kernels and extras"
pip_install --no-build-isolation -e ".[dev,models,triton]"
.venv/bin/python - <<'PY'
import mixq, torch
try:
    import mixq._C  # noqa: F401
    ext = "built"
except ImportError:
    ext = "NOT built (reference backend serves CPU)"
print(f"setup: mixq {mixq.__version__}, torch {torch.__version__}, C++ kernels {ext}")
PY
echo "$want" > "$stamp"
