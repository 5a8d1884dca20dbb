#!/usr/bin/env bash
# Rewrite constraints.txt from .venv: the exact transitive set the tests ran with.
# Run after changing pyproject.toml (then scripts/env.sh) and passing the tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
{
    echo "# Exact versions of every package in the tested environment (scripts/env.sh, x86_64,"
    echo "# Python 3.11), written by scripts/constraints.sh from 'pip freeze'. Used as pip's -c file"
    echo "# by cluster/Dockerfile and jobs/runtime_env.pip.yaml: it pins versions, installs nothing."
    echo "# onnxruntime-gpu is not in it (the tested environment has the CPU onnxruntime)."
    "$ROOT/.venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check
} > "$ROOT/constraints.txt"
