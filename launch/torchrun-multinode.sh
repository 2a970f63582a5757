#!/usr/bin/env bash
# Many nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 NPROC=4 RDZV_ENDPOINT=node0.example:29400 launch/torchrun-multinode.sh [distnn flags]
#
# RDZV_ENDPOINT is host:port of any one node (the store runs there). The store has no
# authentication: keep it on a trusted private network. Extra arguments go to distnn.train.
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of one node}"
NPROC="${NPROC:-gpu}"          # ranks per node; "gpu" = one per GPU
RDZV_ID="${RDZV_ID:-distnn}"   # the same on every node of one job
MAX_RESTARTS="${MAX_RESTARTS:-0}"

# With gloo, a restarted attempt may read the previous attempt's addresses from the shared
# store (pytorch/pytorch issue 135712); a store per attempt avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" \
  --max-restarts="$MAX_RESTARTS" \
  -m distnn.train "$@"
