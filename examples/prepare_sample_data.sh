#!/usr/bin/env bash
# The embedded default data set, built offline: corpus -> tokenizer -> preprocessed .bin/.idx.
# Each step is skipped when its output is already there. Output in $SAMPLE_DIR (default data/sample):
#   corpus.jsonl, tokenizer.model, corpus_text_document.bin/.idx
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}
SAMPLE_DIR=${SAMPLE_DIR:-data/sample}
VOCAB_SIZE=${VOCAB_SIZE:-4096}

[ -f "$SAMPLE_DIR/corpus.jsonl" ] || \
    "$PYTHON_BIN" tools/build_sample_corpus.py --output "$SAMPLE_DIR/corpus.jsonl"
[ -f "$SAMPLE_DIR/tokenizer.model" ] || \
    "$PYTHON_BIN" tools/train_tokenizer.py --input "$SAMPLE_DIR/corpus.jsonl" --model-prefix "$SAMPLE_DIR/tokenizer" \
        --vocab-size "$VOCAB_SIZE" --model-type bpe
[ -f "$SAMPLE_DIR/corpus_text_document.idx" ] || \
    "$PYTHON_BIN" tools/preprocess_data.py --input "$SAMPLE_DIR/corpus.jsonl" --output-prefix "$SAMPLE_DIR/corpus" \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$SAMPLE_DIR/tokenizer.model" --append-eod \
        --workers "$(nproc)" --log-interval 200
