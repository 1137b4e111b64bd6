#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MIXQ_NO_PROGRESS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
