#!/usr/bin/env bash
# Submit a training run or a Tune sweep to a running Ray cluster as a Ray job.
#
#   jobs/submit.sh train [flags of python -m controlnet_ray.train]
#   jobs/submit.sh tune  [flags of python -m controlnet_ray.tune]
#
# Environment (see jobs/README.md):
#   RAY_API_SERVER_ADDRESS  job API, e.g. http://127.0.0.1:8265 (wins over RAY_ADDRESS)
#   RAY_AUTH_MODE           token (default here) or disabled; the token comes from
#                           RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
#   SHARED                  storage every node sees (default /mnt/shared): checkpoints, logs,
#                           Ray results and the shard cache go there
#   RUNTIME_ENV             runtime_env YAML (default jobs/runtime_env.yaml)
#   SUBMISSION_ID           optional job id (must be new for every submission)
#   NO_WAIT=1               return after submitting instead of following the logs
#
# Re-running the same command resumes: the run name (and the sweep name) come from the flags,
# not from the submission, so a new submission finds the previous run's checkpoints.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

usage() { sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; }

kind="${1:-}"
case "$kind" in
    train | tune) shift ;;
    *) usage; exit 2 ;;
esac

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == "token" && -z "${RAY_AUTH_TOKEN:-}" ]]; then
    token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ ! -s "$token_file" ]]; then
        echo "error: RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH" \
            "to the cluster's token file, or put it in ~/.ray/auth_token" \
            "(RAY_AUTH_MODE=disabled for a cluster without token auth)" >&2
        exit 2
    fi
fi

SHARED="${SHARED:-/mnt/shared}"
RUNTIME_ENV="${RUNTIME_ENV:-jobs/runtime_env.yaml}"
# Absolute paths on shared storage: the job runs in a temporary copy of the working dir, and
# multi-node checkpoints cannot live on one node's disk. Flags given later win (argparse).
defaults=(
    --save_dir "$SHARED/runs/$kind"
    --log_dir "$SHARED/logs/$kind"
    --storage_path "$SHARED/ray_results"
    --cache_dir "$SHARED/cache"
)

submit=(ray job submit --runtime-env "$RUNTIME_ENV")
[[ -n "${SUBMISSION_ID:-}" ]] && submit+=(--submission-id "$SUBMISSION_ID")
[[ -n "${NO_WAIT:-}" ]] && submit+=(--no-wait)
exec "${submit[@]}" -- python -m "controlnet_ray.$kind" "${defaults[@]}" "$@"
