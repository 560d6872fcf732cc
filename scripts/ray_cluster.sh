#!/usr/bin/env bash
# A Ray cluster on loopback, with token authentication, and job submission to it (docs/platform-notes.md §2).
#   bash scripts/ray_cluster.sh start [extra ray start options]                  # the head node
#   bash scripts/ray_cluster.sh join HEAD_IP:PORT [extra ray start options]      # another node (see TORL_NODE_IP)
#   bash scripts/ray_cluster.sh submit -- python jobs/train.py trainer.total_steps=10
#   bash scripts/ray_cluster.sh stop                                             # stops every Ray node of this user
# TORL_NODE_IP: this node's address, 127.0.0.1 by default. Ray replaces 127.0.0.1 by the eth0 address unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which in turn refuses to let other nodes join: a one-node cluster. For several
# nodes on one machine give each another loopback address (TORL_NODE_IP=127.0.0.3 for the head, 127.0.0.2 for a
# node joining it), which Ray uses as is; on several machines, each machine's own address.
# RAY_API_SERVER_ADDRESS: the head's dashboard for `submit` (http://127.0.0.1:8265 unless --dashboard-port is moved).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate  # the job's `python` is then the project's interpreter
node_ip=${TORL_NODE_IP:-127.0.0.1}
# vLLM's address is the node's own (each node sets it: the job pushes no address to the workers of a cluster it
# connects to); token auth on both sides.
export VLLM_HOST_IP=${VLLM_HOST_IP:-$node_ip} RAY_AUTH_MODE=token
[ "$node_ip" != 127.0.0.1 ] || export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# The CPU default places generator 1 + learner 1 + sandbox 0.5 logical CPUs; give small machines 4 logical CPUs.
cpus=$(nproc); [ "$cpus" -ge 4 ] || cpus=4
case "${1:-}" in
  start)
    [ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ] || ray get-auth-token --generate >/dev/null
    shift
    ray start --head --node-ip-address="$node_ip" --dashboard-host=127.0.0.1 --disable-usage-stats \
      --num-cpus="$cpus" "$@" ;;
  join)
    [ $# -ge 2 ] || { echo "usage: $0 join HEAD_IP:PORT [ray start options]" >&2; exit 2; }
    address=$2; shift 2
    ray start --address="$address" --node-ip-address="$node_ip" --disable-usage-stats --num-cpus="$cpus" "$@" ;;
  stop) ray stop ;;
  submit)
    shift
    # TORL_HOME: relative paths (models/, runs/) keep pointing at this checkout, not the uploaded copy.
    ray job submit --address "${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}" --working-dir . \
      --runtime-env-json "{\"env_vars\": {\"TORL_HOME\": \"$PWD\"}}" "$@" ;;
  *) echo "usage: $0 start | join HEAD_IP:PORT | submit -- python jobs/train.py [key=value ...] | stop" >&2; exit 2 ;;
esac
