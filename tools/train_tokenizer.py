"""Train a SentencePiece tokenizer (BPE or unigram) on the text of jsonl files.

    python tools/train_tokenizer.py --input data/sample/corpus.jsonl --model-prefix data/sample/tokenizer \\
        --vocab-size 4096 --model-type bpe

writes {model-prefix}.model (for --tokenizer-type SentencePieceTokenizer --tokenizer-model) and .vocab.
The model is lossless: no normalization, whitespace kept, unknown characters fall back to bytes, so
detokenize(tokenize(text)) == text. </s> (id 2) ends documents.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_edit.errors import UsageError  # noqa: E402

from tools.preprocess_data import expand_inputs, read_lines  # noqa: E402


def texts(files, keys):
    """Lines of every document's text: SentencePiece trains on sentences, and a newline is never in a piece."""
    for location_file, number, line in read_lines(files):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{location_file}:{number}: not valid JSON ({exc.msg}); fix the line")
        for key in keys:
            if isinstance(record.get(key), str):
                yield from (part for part in record[key].split("\n") if part.strip())


def main(argv=None):
    import sentencepiece

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="jsonl or jsonl.gz files, or globs")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--model-prefix", required=True)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000,
                        help="sentences sampled for training (0 = all)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    files = expand_inputs(args.input)
    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    temporary = args.model_prefix + ".tmp"
    sentencepiece.set_random_generator_seed(args.seed)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=texts(files, args.json_keys),
        model_prefix=temporary,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.9995,
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    for suffix in (".vocab", ".model"):  # .model last: it is what users point at
        os.replace(temporary + suffix, args.model_prefix + suffix)
    print(f"wrote {args.model_prefix}.model ({args.model_type}, {args.vocab_size} pieces)", file=sys.stderr)


if __name__ == "__main__":
    main()
