#!/usr/bin/env bash
# GPT pretraining with EDiT on Slurm, or locally with plain `bash` (CPU when there is no GPU).
#
#   sbatch examples/pretrain_edit.sh                       # one torchrun per node via srun; nodes = replicas
#   bash examples/pretrain_edit.sh                         # local: the embedded sample corpus, NPROC processes
#                                                          # (default: one per GPU; without GPUs 2, one replica each)
#   DP_MODE=ddp TRAIN_ITERS=500 bash examples/pretrain_edit.sh --log-interval 50   # extra flags pass through
#
# Every knob is an environment variable named after its flag: TRAIN_ITERS, DATA_PATH, TOKENIZER_MODEL, DP_MODE,
# LOCAL_SGD_SYNC_INTERVAL, LOCAL_SGD_WARMUP_ITERS, OUTER_LR, OUTER_MOMENTUM, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, LR,
# LR_WARMUP_ITERS, NUM_LAYERS, HIDDEN_SIZE, NUM_ATTENTION_HEADS, SEQ_LENGTH, MODEL_SHARD_GROUP_SIZE, SAVE,
# SAVE_INTERVAL, WANDB_PROJECT, WANDB_SAVE_DIR. TRAIN_ITERS defaults to 200; the learning-rate warm-up
# LR_WARMUP_ITERS defaults to a tenth of it (200 -> 20, 6 -> 0) and LOCAL_SGD_WARMUP_ITERS (synchronous steps before
# local SGD) to a quarter (200 -> 50, 6 -> 1, as pretrain_gpt.py), so a short run needs no other change.
# LOCAL_SGD_SYNC_INTERVAL, OUTER_LR and OUTER_MOMENTUM unset leave the --dp-mode's own defaults.
# GPUS_PER_NODE and NPROC (local) set the processes. On Slurm the GPUs of a node form the model shard group
# (the default of --model-shard-group-size) and the nodes the model sync group; locally without GPUs every
# process is a replica (MODEL_SHARD_GROUP_SIZE=1).
#SBATCH --job-name=megatron-edit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
#SBATCH --output=megatron-edit-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}

fail() { echo "error: $*" >&2; exit 2; }

TRAIN_ITERS=${TRAIN_ITERS:-200}
[[ "$TRAIN_ITERS" =~ ^[0-9]+$ ]] && [ "$TRAIN_ITERS" -ge 1 ] || fail "TRAIN_ITERS=$TRAIN_ITERS is not a positive whole number"
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-$((TRAIN_ITERS / 10))}
LOCAL_SGD_WARMUP_ITERS=${LOCAL_SGD_WARMUP_ITERS:-$((TRAIN_ITERS / 4))}

DP_MODE=${DP_MODE:-edit}
case "$DP_MODE" in ddp|edit|aedit|diloco|post-local-sgd) ;;
    *) fail "DP_MODE=$DP_MODE is unknown; use ddp, edit, aedit, diloco or post-local-sgd" ;; esac

if [ -z "${DATA_PATH:-}" ]; then
    bash examples/prepare_sample_data.sh
    DATA_PATH=data/sample/corpus_text_document
    TOKENIZER_MODEL=${TOKENIZER_MODEL:-data/sample/tokenizer.model}
fi
for suffix in bin idx; do
    [ -f "$DATA_PATH.$suffix" ] || fail "DATA_PATH=$DATA_PATH: $DATA_PATH.$suffix does not exist (make it with tools/preprocess_data.py)"
done
[ -f "${TOKENIZER_MODEL:-}" ] || fail "TOKENIZER_MODEL=${TOKENIZER_MODEL:-} does not exist"

visible_gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
if [ -n "${SLURM_JOB_ID:-}" ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$visible_gpus}}
    [ "$GPUS_PER_NODE" -ge 1 ] || GPUS_PER_NODE=1
    if [ "$visible_gpus" -gt 0 ] && [ "$GPUS_PER_NODE" -gt "$visible_gpus" ]; then
        fail "GPUS_PER_NODE=$GPUS_PER_NODE but this node has $visible_gpus GPUs"
    fi
    first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_ADDR=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    LAUNCH=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON_BIN" -m megatron_edit.launch
            --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$GPUS_PER_NODE"
            --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "$SLURM_JOB_ID")
    LAUNCH_PROCS_PER_NODE=$GPUS_PER_NODE LAUNCH_WORLD_SIZE=$((SLURM_JOB_NUM_NODES * GPUS_PER_NODE))
else
    NPROC=${NPROC:-$([ "$visible_gpus" -gt 0 ] && echo "$visible_gpus" || echo 2)}
    if [ "$visible_gpus" -gt 0 ] && [ "$NPROC" -gt "$visible_gpus" ]; then
        fail "NPROC=$NPROC but this machine has $visible_gpus GPUs"
    fi
    # Without GPUs every local process is a replica of its own, so local SGD has replicas to synchronize.
    [ "$visible_gpus" -gt 0 ] || MODEL_SHARD_GROUP_SIZE=${MODEL_SHARD_GROUP_SIZE:-1}
    LAUNCH=("$PYTHON_BIN" -m megatron_edit.launch --standalone --nproc-per-node "$NPROC")
    LAUNCH_PROCS_PER_NODE=$NPROC LAUNCH_WORLD_SIZE=$NPROC
fi

ARGS=(
    --num-layers "${NUM_LAYERS:-4}" --hidden-size "${HIDDEN_SIZE:-128}" --num-attention-heads "${NUM_ATTENTION_HEADS:-4}"
    --seq-length "${SEQ_LENGTH:-128}" --position-embedding-type rope --normalization RMSNorm --swiglu
    --disable-bias-linear --hidden-dropout 0 --attention-dropout 0
    --micro-batch-size "${MICRO_BATCH_SIZE:-8}" --global-batch-size "${GLOBAL_BATCH_SIZE:-16}"
    --train-iters "$TRAIN_ITERS" --lr "${LR:-2e-3}" --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters "$LR_WARMUP_ITERS"
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 --seed 1234
    --data-path "$DATA_PATH" --split "${SPLIT:-95,5,0}" --data-cache-path data/cache
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
    --log-interval 20 --eval-interval 100 --eval-iters 8
    --dp-mode "$DP_MODE" --local-sgd-warmup-iters "$LOCAL_SGD_WARMUP_ITERS"
)
# Unset: the mode's own defaults (docs/low_communication.md, "The shipped defaults").
[ -n "${LOCAL_SGD_SYNC_INTERVAL:-}" ] && ARGS+=(--local-sgd-sync-interval "$LOCAL_SGD_SYNC_INTERVAL")
[ -n "${OUTER_LR:-}" ] && ARGS+=(--outer-lr "$OUTER_LR")
[ -n "${OUTER_MOMENTUM:-}" ] && ARGS+=(--outer-momentum "$OUTER_MOMENTUM")
[ -n "${MODEL_SHARD_GROUP_SIZE:-}" ] && ARGS+=(--model-shard-group-size "$MODEL_SHARD_GROUP_SIZE")
[ -n "${SAVE:-}" ] && ARGS+=(--save "$SAVE" --load "$SAVE" --save-interval "${SAVE_INTERVAL:-100}")
# Preemption or scancel (SIGTERM, then SIGKILL after Slurm's KillWait): save the iteration under way and exit 0.
[ -n "${SAVE:-}" ] && [ "$DP_MODE" != aedit ] && ARGS+=(--exit-signal-handler)
[ -n "${WANDB_PROJECT:-}" ] && ARGS+=(--wandb-project "$WANDB_PROJECT" --wandb-save-dir "${WANDB_SAVE_DIR:-.}")

# The flags are checked once, in this process, for the world the launch will have: a configuration error is one
# line here instead of one per rank followed by torchrun's failure report.
"$PYTHON_BIN" -m megatron_edit.arguments --world-size "$LAUNCH_WORLD_SIZE" --local-world-size "$LAUNCH_PROCS_PER_NODE" \
    -- "${ARGS[@]}" "$@" || exit 2

export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron-core overlaps TP communication only with one queue
exec "${LAUNCH[@]}" pretrain_gpt.py "${ARGS[@]}" "$@"
