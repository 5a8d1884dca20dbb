#!/usr/bin/env bash
# Install (once) and run the checks: ruff lint, ruff format check, the pytest suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
"$ROOT/.venv/bin/ruff" check .
"$ROOT/.venv/bin/ruff" format --check .
exec "$ROOT/.venv/bin/python" -m pytest "$@"
