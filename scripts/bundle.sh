#!/usr/bin/env bash
# Offline install bundle (scripts/bundle.py) with the project's venv: installs it first if needed.
#   bash scripts/bundle.sh --out bundle [--python-version 3.12 --platform manylinux_2_28_x86_64 ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/bundle.py" "$@"
