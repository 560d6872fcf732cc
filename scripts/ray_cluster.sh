#!/usr/bin/env bash
# A loopback Ray cluster on this machine, with token authentication, and job submission to it
# (docs/platform-notes.md §2).
#   bash scripts/ray_cluster.sh start [extra ray start options]
#   bash scripts/ray_cluster.sh submit -- python jobs/train.py trainer.total_steps=10
#   bash scripts/ray_cluster.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate  # the job's `python` is then the project's interpreter
# A loopback cluster: Ray's node IP and vLLM's address are 127.0.0.1 (the job itself pushes no address to the workers
# of a cluster it connects to); token auth on both sides.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 VLLM_HOST_IP=127.0.0.1 RAY_AUTH_MODE=token
case "${1:-}" in
  start)
    [ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ] || ray get-auth-token --generate >/dev/null
    shift
    # The CPU default places generator 1 + learner 1 + sandbox 0.5 logical CPUs; give small machines 4 logical CPUs.
    cpus=$(nproc); [ "$cpus" -ge 4 ] || cpus=4
    ray start --head --dashboard-host=127.0.0.1 --disable-usage-stats --num-cpus="$cpus" "$@" ;;
  stop) ray stop ;;
  submit)
    shift
    # TORL_HOME: relative paths (models/, runs/) keep pointing at this checkout, not the uploaded copy.
    ray job submit --address http://127.0.0.1:8265 --working-dir . \
      --runtime-env-json "{\"env_vars\": {\"TORL_HOME\": \"$PWD\"}}" "$@" ;;
  *) echo "usage: $0 start | submit -- python jobs/train.py [key=value ...] | stop" >&2; exit 2 ;;
esac
