#!/usr/bin/env bash
# Replicas as independent jobs (EDiT through torchft): one replica per Slurm job or per cluster, meeting at every
# sync through a lighthouse; a replica may die, restart or join late while the others train on.
#
#   LIGHTHOUSE_ADDR=10.8.0.1 bash examples/pretrain_edit_multicluster.sh lighthouse
#                                                                     # 1. torchft's lighthouse on an address every
#                                                                     #    replica reaches (e.g. its WireGuard one)
#   export TORCHFT_LIGHTHOUSE=http://10.8.0.1:29510 NUM_REPLICAS=2
#   export SYNC_INTERFACE=wg0 MEGATRON_EDIT_SYNC_SECRET_FILE=~/.megatron-edit-secret   # the same file everywhere
#   REPLICA_ID=0 sbatch examples/pretrain_edit_multicluster.sh        # 2. one job per replica, on any cluster
#   REPLICA_ID=1 sbatch examples/pretrain_edit_multicluster.sh
#
#   bash examples/pretrain_edit_multicluster.sh local                 # all of it on this machine (CPU: NUM_REPLICAS
#                                                                     # single-process replicas), logs in RUN_DIR
#
# A replica job is examples/pretrain_edit.sh (same knobs: DATA_PATH, TRAIN_ITERS, DP_MODE=edit|aedit|diloco|
# post-local-sgd, ...) with --replica-coordinator torchft and no warm-up; inside it the job's GPUs are one replica
# (TP/PP and the shard group as usual), and every replica must use the same layout (one that does not is refused). GLOBAL_BATCH_SIZE spans all NUM_REPLICAS replicas, as in one launch.
# MIN_REPLICAS (default 1) is the lighthouse's quorum size: with 2, training waits until two replicas are up.
# Every socket listens on SYNC_INTERFACE (--sync-interface; default: loopback on one machine, the cluster network under
# Slurm) and the lighthouse on LIGHTHOUSE_ADDR (default 127.0.0.1): see docs/running_across_clusters.md.
#SBATCH --job-name=megatron-edit-replica
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
#SBATCH --output=megatron-edit-replica-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}
LIGHTHOUSE_ADDR=${LIGHTHOUSE_ADDR:-127.0.0.1}
LIGHTHOUSE_PORT=${LIGHTHOUSE_PORT:-29510}
NUM_REPLICAS=${NUM_REPLICAS:-2}

fail() { echo "error: $*" >&2; exit 2; }

start_lighthouse() {  # torchft's lighthouse on loopback, behind a gate on LIGHTHOUSE_ADDR that admits the secret's holders
    # join timeout: how long a quorum waits for replicas that heartbeat but have not reached the sync yet
    exec "$PYTHON_BIN" -m megatron_edit.lighthouse --bind "$LIGHTHOUSE_ADDR:$LIGHTHOUSE_PORT" \
        --min_replicas "${MIN_REPLICAS:-1}" --quorum_tick_ms 100 --join_timeout_ms 10000 "$@"
}

replica() {  # one replica: this launch (Slurm job or local processes) with --replica-id $1
    [ -n "${TORCHFT_LIGHTHOUSE:-}" ] || fail "set TORCHFT_LIGHTHOUSE=http://HOST:$LIGHTHOUSE_PORT (start the lighthouse first)"
    local replica_id=$1; shift
    DP_MODE=${DP_MODE:-edit} LOCAL_SGD_WARMUP_ITERS=0 exec bash examples/pretrain_edit.sh \
        --replica-coordinator torchft --replica-id "$replica_id" --num-replicas "$NUM_REPLICAS" \
        ${SYNC_INTERFACE:+--sync-interface "$SYNC_INTERFACE"} "$@"
}

case "${1:-}" in
    lighthouse)
        shift
        start_lighthouse "$@" ;;
    local)
        shift
        RUN_DIR=${RUN_DIR:-runs/multicluster}
        mkdir -p "$RUN_DIR"
        # A lighthouse left on the port (an earlier run's) would take these replicas into its quorums.
        "$PYTHON_BIN" -c "import socket; socket.create_server(('$LIGHTHOUSE_ADDR', $LIGHTHOUSE_PORT))" \
            2>/dev/null || fail "port $LIGHTHOUSE_PORT is in use (a lighthouse left from an earlier run?): stop it or set LIGHTHOUSE_PORT"
        start_lighthouse > "$RUN_DIR/lighthouse.log" 2>&1 &  # exec: $! is the lighthouse itself, which the trap stops
        lighthouse_pid=$!
        trap 'kill $lighthouse_pid 2>/dev/null; wait $lighthouse_pid 2>/dev/null || true' EXIT
        export TORCHFT_LIGHTHOUSE=http://$LIGHTHOUSE_ADDR:$LIGHTHOUSE_PORT NPROC=${NPROC:-1}
        export GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-$((${MICRO_BATCH_SIZE:-8} * NPROC * NUM_REPLICAS))}
        pids=()
        for replica_id in $(seq 0 $((NUM_REPLICAS - 1))); do
            (replica "$replica_id" "$@") > "$RUN_DIR/replica$replica_id.log" 2> "$RUN_DIR/replica$replica_id.err" &
            pids+=($!)
            echo "replica $replica_id: pid $!, log $RUN_DIR/replica$replica_id.log"
        done
        status=0
        for pid in "${pids[@]}"; do wait "$pid" || status=1; done
        grep -h "training summary" -A3 "$RUN_DIR"/replica*.log || true
        exit $status ;;
    *)
        [ -n "${REPLICA_ID:-}" ] || fail "set REPLICA_ID (0..$((NUM_REPLICAS - 1))), or run with 'lighthouse' or 'local'"
        replica "$REPLICA_ID" "$@" ;;
esac
