#!/usr/bin/env bash
# A small Llama-style GPT trained end to end on this machine: GPU if there is one, else CPU.
# Without DATA_PATH it trains on the embedded sample corpus (built offline by prepare_sample_data.sh).
# Extra arguments are passed to pretrain_gpt.py and override the defaults below, e.g.
#   NPROC=4 bash examples/train_small_gpt.sh --tensor-model-parallel-size 2
#   DATA_PATH=data/my_text_document TOKENIZER_MODEL=my.model bash examples/train_small_gpt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}

MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 384
    --seq-length 128 --max-position-embeddings 128
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
    --hidden-dropout 0 --attention-dropout 0
)
TRAINING_ARGS=(
    --micro-batch-size 8 --global-batch-size 16 --train-iters 200
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 --seed 1234
)
if [ -z "${DATA_PATH:-}" ]; then
    bash examples/prepare_sample_data.sh
    DATA_PATH=data/sample/corpus_text_document
    TOKENIZER_MODEL=data/sample/tokenizer.model
fi
DATA_ARGS=(--data-path $DATA_PATH --split 95,5,0 --data-cache-path data/cache
           --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
LOGGING_ARGS=(--log-interval 20 --eval-interval 100 --eval-iters 8)

export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron-core overlaps TP communication only with one queue

exec "$PYTHON_BIN" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_gpt.py \
    "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
