"""Preprocessing throughput with 1 and N workers on the same input, side by side in one run.

    python tools/bench_preprocess.py --input data/sample/corpus.jsonl --repeat 4 --workers 1 2 \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/sample/tokenizer.model

--repeat concatenates the input that many times, so short corpora still give stable timings.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_edit.data.tokenizers import add_tokenizer_args  # noqa: E402
from tools import preprocess_data  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1)
    add_tokenizer_args(parser)
    args = parser.parse_args(argv)
    tokenizer_flags = [f"--tokenizer-type={args.tokenizer_type}"] + [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in ("tokenizer_model", "vocab_file", "merge_file", "vocab_size") if getattr(args, name) is not None]

    with tempfile.TemporaryDirectory() as scratch:
        text = "".join(Path(f).read_text() for f in preprocess_data.expand_inputs(args.input))
        corpus = Path(scratch) / "input.jsonl"
        corpus.write_text(text * args.repeat)
        rows = []
        for workers in args.workers:
            start = time.perf_counter()
            stats = preprocess_data.main(["--input", str(corpus), "--output-prefix", f"{scratch}/w{workers}",
                                          "--append-eod", "--workers", str(workers), "--log-interval", "1000000000",
                                          *tokenizer_flags])
            rows.append((workers, time.perf_counter() - start, stats))
    base = rows[0][1]
    print(f"\n{'workers':>8} | {'seconds':>8} | {'documents':>9} | {'tokens':>10} | {'tokens/s':>10} | "
          f"{'MB/s':>6} | {'speed-up':>8}")
    for workers, seconds, stats in rows:
        print(f"{workers:>8} | {seconds:>8.2f} | {stats.documents:>9} | {stats.tokens:>10} | "
              f"{stats.tokens / seconds:>10.0f} | {stats.bytes / 2**20 / seconds:>6.2f} | {base / seconds:>7.2f}x")


if __name__ == "__main__":
    main()
