#!/usr/bin/env bash
# The GPU kit (`make gpu-check`): on a machine with one CUDA device, in about five minutes, what the CPU suite cannot
# show. Each check runs under its own time limit and gives one row (its log in GPU_CHECK_DIR, default
# runs/gpu_check/); a check that fails says so in its row and the next one runs.
#
#   step         a bf16 GPT step under NCCL (pretrain_gpt.py, one rank)
#   llama-1b     tools/bench_throughput.py on a Llama-style model of ~1.1B parameters (16 layers, hidden 2048, GQA,
#                SwiGLU, RMSNorm, rope, seq 2048): tokens/s, TFLOP/s, MFU, peak memory; megatron-core's local layers,
#                and Transformer Engine's when it is importable
#   swap         the same model with --swap-layers (2 layers resident, the rest streamed from host memory): the
#                ratio of its tokens/s to llama-1b's is how much of the layer traffic the overlap hides
#   edit         EDiT with 2 ranks on the one device (2 replicas of 1 rank, NCCL): a sync's bytes and time
#
# On a machine without a CUDA device it refuses in one line. PYTHON (default .venv/bin/python) runs everything.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${GPU_CHECK_DIR:-runs/gpu_check}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: gpu-check needs a CUDA device and this machine has none visible (torch.cuda.is_available() is False); run it where one is" >&2
    exit 2
fi
mkdir -p "$OUT"
TABLE="$OUT/table.md"
echo "| check | result |" > "$TABLE"
echo "|---|---|" >> "$TABLE"

LLAMA_1B=(--bf16 --num-layers 16 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16
          --group-query-attention --num-query-groups 4 --seq-length 2048 --max-position-embeddings 2048 --swiglu
          --normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights
          --disable-bias-linear --mock-data --vocab-size 32000 --micro-batch-size 2 --global-batch-size 8 --lr 1e-4
          --train-iters 8 --bench-warmup-iters 3 --device cuda)
TINY=(--bf16 --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 256 --max-position-embeddings 256
      --mock-data --vocab-size 8000 --micro-batch-size 4 --lr 1e-4 --log-interval 1 --eval-iters 1 --device cuda)

# run NAME SECONDS COMMAND...: one row, the command's table rows (lines starting "| ") or its last line when it fails.
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name" >&2
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        local rows
        rows=$(grep -E '^\| ' "$OUT/$name.log" | sed -e 's/^| *//' -e 's/ *| */: /' | paste -sd ';' -)
        echo "| $name | ok${rows:+: $rows} |" >> "$TABLE"
    else
        local rc=$?
        echo "| $name | failed (exit $rc): $(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-300) |" >> "$TABLE"
    fi
}

run step 120 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 pretrain_gpt.py "${TINY[@]}" \
    --train-iters 3 --global-batch-size 4 --dp-mode ddp
run llama-1b 150 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 tools/bench_throughput.py \
    "${LLAMA_1B[@]}" --transformer-impl local
if "$PYTHON" -c "import transformer_engine" 2>/dev/null; then
    run llama-1b-te 150 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 tools/bench_throughput.py \
        "${LLAMA_1B[@]}" --transformer-impl transformer_engine
else
    echo "| llama-1b-te | skipped: Transformer Engine is not importable |" >> "$TABLE"
fi
run swap 150 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 tools/bench_throughput.py \
    "${LLAMA_1B[@]}" --transformer-impl local --swap-layers --swap-resident-layers 2
run edit 120 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 pretrain_gpt.py "${TINY[@]}" \
    --train-iters 8 --global-batch-size 8 --dp-mode edit --model-shard-group-size 1 --local-sgd-warmup-iters 2

"$PYTHON" - "$OUT" <<'EOF'
import re, sys
from pathlib import Path

out = Path(sys.argv[1])
def tokens_per_second(name):
    log = out / f"{name}.log"
    found = re.search(r"^\| tokens/s\s*\| ([\d,]+)", log.read_text(), re.M) if log.exists() else None
    return float(found.group(1).replace(",", "")) if found else None

resident, swapped = tokens_per_second("llama-1b"), tokens_per_second("swap")
with open(out / "table.md", "a") as table:
    if resident and swapped:
        table.write(f"| swap / resident tokens/s | {swapped / resident:.2f} |\n")
EOF
cat "$TABLE"
