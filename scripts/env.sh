#!/usr/bin/env bash
# Create .venv and install the project into it; a no-op when nothing changed since last time.
# Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.controlnet_ray_installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/scripts/env.sh" | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    return 0 2>/dev/null || exit 0
fi
echo "installing into $VENV (first run takes a few minutes: torch is 5.5 GB)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first: these exact versions come from local wheels on the project's machines.
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
# constraints.txt: the exact versions the tests passed with (scripts/constraints.sh writes it)
"$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[cpu,dev,faces]"
# insightface's declared needs (opencv-python GUI build, onnxruntime) would clash with
# opencv-python-headless and onnxruntime-gpu: install it alone; its real needs are above.
"$VENV/bin/python" -m pip install -q --no-deps insightface==2.1
echo "$want" > "$STAMP"
