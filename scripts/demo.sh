#!/usr/bin/env bash
# Install (once) and train ImageControlNet on the embedded synthetic dataset.
# Extra arguments go to `python -m controlnet_ray.train`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m controlnet_ray.train --epochs 12 --save_dir runs/demo/checkpoints \
    --log_dir runs/demo/logs "$@"
