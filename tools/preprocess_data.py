"""Tokenize jsonl documents into Megatron's .bin/.idx format (megatron-core's IndexedDataset).

Megatron-LM's interface:

    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --json-keys text --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 4

writes data/corpus_text_document.bin/.idx. Documents keep their input order whatever --workers and
--partitions are (partitions are contiguous ranges of lines, merged in order), so the output is
byte-identical across those settings. Files appear under their final names only when complete.
"""
import argparse
import collections
import dataclasses
import glob
import gzip
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path
from queue import Empty
from typing import Dict, Iterator, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_edit.errors import UsageError  # noqa: E402

import megatron_edit  # noqa: E402,F401  (first: it quiets megatron-core's import-time warnings)
import numpy as np  # noqa: E402
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # noqa: E402

from megatron_edit.data.tokenizers import (add_tokenizer_args, build_tokenizer, check_tokenizer_args,  # noqa: E402
                                          default_tokenizer_type)
from megatron_edit.megatron_lm_flags import (SWITCH, Flag, never, unless, add_megatron_lm_flags,  # noqa: E402
                                             check_megatron_lm_flags)


# Megatron-LM's preprocess_data.py flags with nothing to do here (a warning), or not supported (refused).
PREPROCESS_FLAGS = [
    Flag("--keep-sequential-samples", SWITCH, never, "documents keep their input order here always"),
    Flag("--tokenizer-hf-no-use-fast", SWITCH, never, "HuggingFaceTokenizer reads tokenizer.json with the tokenizers "
         "library, which has no slow variant"),
    Flag("--trust-remote-code", SWITCH, never, "HuggingFaceTokenizer reads a local tokenizer.json and runs no code"),
    Flag("--vocab-extra-ids", {"type": int}, unless(
        lambda args, value: value == 0,
        "T5's sentinel tokens are not supported here (GPT pretraining data needs none); drop the flag"),
         "0: no sentinel tokens"),
]


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True, help="jsonl or jsonl.gz files, or globs")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize; one output per key")
    group.add_argument("--skip-bad-lines", action="store_true", help="count malformed lines instead of stopping")
    group.add_argument("--split-sentences", action="store_true",
                       help="split documents into sentences (nltk's punkt; each a sequence of its document, the output "
                            "PREFIX_KEY_sentence)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences: keep the whitespace (newlines) between sentences, at the end of "
                            "the sentence before it")
    group.add_argument("--lang", default="english", help="the language of nltk's punkt model for --split-sentences")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True)
    group.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's eod")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes in all")
    group.add_argument("--partitions", type=int, default=1, help="input ranges processed in parallel, then merged")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    add_tokenizer_args(parser)
    add_megatron_lm_flags(parser, PREPROCESS_FLAGS)
    args = parser.parse_args(argv)
    check_megatron_lm_flags(args, flags=PREPROCESS_FLAGS)
    if args.keep_newlines and not args.split_sentences:
        raise UsageError("--keep-newlines keeps the newlines between split sentences: give --split-sentences too")
    args.level = "sentence" if args.split_sentences else "document"
    if args.split_sentences:
        sentence_splitter(args.lang)  # missing nltk or punkt data: one line here, not in every worker
    args.input_files = expand_inputs(args.input)
    default_tokenizer_type(args)
    if args.tokenizer_type is None:
        raise UsageError("--tokenizer-type is required")
    check_tokenizer_args(args)
    if args.workers < 1 or args.partitions < 1 or args.partitions > args.workers:
        raise UsageError("need 1 <= --partitions <= --workers")
    return args


def expand_inputs(patterns: List[str]) -> List[str]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise UsageError(f"--input {pattern} matches no file")
        files += matches
    return files


def _open(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


class UnreadableInput(ValueError):
    """An input file that cannot be read as (gzipped) UTF-8 text. An Exception, not a UsageError: lines may be read
    in a worker pool's feeder thread, which hands Exceptions to the consumer but drops a SystemExit (and hangs)."""


def _unreadable(path: str, exc: BaseException, lines_read: int) -> UnreadableInput:
    # Input is decompressed and decoded in blocks, so an error shows up some lines after `lines_read`.
    where = f" after line {lines_read}" if lines_read else ""
    if isinstance(exc, gzip.BadGzipFile) and str(exc).startswith("Not a gzipped file ("):
        what = f"not gzip data (it starts with {str(exc)[len('Not a gzipped file ('):-1]}); " \
               "name it .jsonl if it is plain text"
    elif isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        what = f"corrupt gzip data{where} ({exc}); recompress or download it again"
    elif isinstance(exc, EOFError):
        what = f"the gzip stream ends early{where} (a truncated file?); recompress or download it again"
    elif isinstance(exc, UnicodeDecodeError):
        what = f"not UTF-8 text{where} (byte 0x{exc.object[exc.start]:02x}: {exc.reason}); convert it to UTF-8"
    else:
        what = f"cannot be read ({exc.strerror or exc})"
    return UnreadableInput(f"{path}: {what}")


def read_lines(files: List[str]) -> Iterator[Tuple[str, int, str]]:
    """(file, line number, line) of every non-blank input line, in order; UnreadableInput for a damaged file."""
    for path in files:
        number = 0
        try:
            with _open(path) as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        yield path, number, line
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
            raise _unreadable(path, exc, number) from None


def sentence_splitter(lang: str):
    """nltk's punkt sentence splitter for `lang` (Megatron-LM's --split-sentences), or one line saying what is
    missing."""
    try:
        from nltk.tokenize.punkt import PunktTokenizer
    except ImportError:
        raise UsageError("--split-sentences needs nltk: pip install nltk") from None
    try:
        return PunktTokenizer(lang)
    except (LookupError, ValueError, OSError) as error:
        reason = "is not installed" if isinstance(error, LookupError) else f"cannot be read ({error})"
        raise UsageError(f"--split-sentences: nltk's punkt model for --lang {lang} {reason}; run python -m "
                         "nltk.downloader punkt_tab (or point NLTK_DATA at a copy of it)") from None


@dataclasses.dataclass
class Encoded:
    location: str
    nbytes: int
    documents: Optional[Dict[str, List[List[int]]]] = None  # key -> its sequences (sentences, or the document)
    bad_line: Optional[str] = None
    missing_key: Optional[str] = None


class Encoder:
    """Parses and tokenizes one line; runs in worker processes, each with its own tokenizer."""

    tokenizer = None

    def __init__(self, args):
        self.args = args

    def initializer(self):
        Encoder.tokenizer = build_tokenizer(self.args)
        Encoder.splitter = sentence_splitter(self.args.lang) if self.args.split_sentences else None

    def sentences(self, text: str) -> List[str]:
        """The document's sentences (itself without --split-sentences); with --keep-newlines each keeps the
        whitespace that follows it, so that they join back into the document."""
        if Encoder.splitter is None:
            return [text]
        spans = list(Encoder.splitter.span_tokenize(text))
        if not self.args.keep_newlines:
            return [text[start:end] for start, end in spans]
        starts = [start for start, _ in spans] + [len(text)]
        return [text[start:following] for start, following in zip(starts, starts[1:])]

    def encode(self, item: Tuple[str, int, str]) -> Encoded:
        path, number, line = item
        location, nbytes = f"{path}:{number}", len(line.encode("utf-8"))
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return Encoded(location, nbytes, bad_line=f"not valid JSON ({exc.msg} at column {exc.colno})")
        if not isinstance(record, dict):
            return Encoded(location, nbytes, bad_line="not a JSON object")
        documents = {}
        for key in self.args.json_keys:
            if key not in record:
                return Encoded(location, nbytes, missing_key=f"no key {key!r} (its keys: {', '.join(record)})")
            if not isinstance(record[key], str):
                return Encoded(location, nbytes, bad_line=f"value of {key!r} is not a string")
            sequences = [ids for ids in map(Encoder.tokenizer.tokenize, self.sentences(record[key])) if ids] \
                if record[key] else []
            if sequences and self.args.append_eod:
                sequences[-1].append(Encoder.tokenizer.eod)
            documents[key] = sequences
        return Encoded(location, nbytes, documents=documents)


@dataclasses.dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    bad_lines: int = 0
    empty: int = 0

    def add(self, other: "Stats") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def output_prefix(prefix: str, key: str, level: str) -> str:
    """Megatron-LM's names: PREFIX_KEY_document, or PREFIX_KEY_sentence with --split-sentences."""
    return f"{prefix}_{key}_{level}"


def _map_chunk(function, chunk: list) -> list:
    return [function(item) for item in chunk]


def in_workers(function, items, workers: int, initializer, chunk_size: int = 32) -> Iterator:
    """`function` of every item, in order, computed by `workers` processes, reading `items` only a few chunks ahead.
    A worker that dies (killed, out of memory) raises BrokenProcessPool, where multiprocessing.Pool's imap would wait
    forever for the chunk it held."""
    executor = ProcessPoolExecutor(workers, initializer=initializer)
    items, pending = iter(items), collections.deque()
    try:
        for chunk in iter(lambda: list(islice(items, chunk_size)), []):
            pending.append(executor.submit(_map_chunk, function, chunk))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except BaseException:  # a dead worker, or the reader stopped: leave the rest behind
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    # Done: the workers exit before this returns. Left to the interpreter's exit (a partition process ends right
    # after), the pool's shutdown raced multiprocessing's join of its workers and could wait forever.
    executor.shutdown(wait=True)


def encode_lines(args, lines, prefix: str, workers: int, total_bytes: Optional[int], label: str) -> Stats:
    """Tokenize `lines` with `workers` processes into `{prefix}_{key}_document.bin/.idx` (given temporary names)."""
    encoder = Encoder(args)
    encoder.initializer()
    dtype = DType.optimal_dtype(Encoder.tokenizer.vocab_size)
    builders = {key: IndexedDatasetBuilder(output_prefix(prefix, key, args.level) + ".bin", dtype=dtype)
                for key in args.json_keys}
    results = in_workers(encoder.encode, lines, workers, encoder.initializer) if workers > 1 else map(encoder.encode,
                                                                                                     lines)
    stats, start = Stats(), time.perf_counter()
    try:
        for result in results:
            stats.bytes += result.nbytes
            if result.missing_key:
                raise UsageError(f"{result.location}: {result.missing_key}; pass the right --json-keys")
            if result.bad_line:
                if not args.skip_bad_lines:
                    raise UsageError(f"{result.location}: {result.bad_line}; fix the line or pass "
                                     "--skip-bad-lines")
                stats.bad_lines += 1
                continue
            if not any(result.documents.values()):
                stats.empty += 1
                continue
            for key, sequences in result.documents.items():
                builders[key].add_document(np.asarray([i for ids in sequences for i in ids], dtype=dtype),
                                           [len(ids) for ids in sequences])
            stats.documents += 1
            stats.tokens += sum(len(ids) for sequences in result.documents.values() for ids in sequences)
            if stats.documents % args.log_interval == 0:
                log_progress(stats, time.perf_counter() - start, total_bytes, label)
    except UnreadableInput as exc:
        raise UsageError(str(exc)) from None
    except BrokenProcessPool:
        raise UsageError(f"{label}a tokenizing worker process died (killed; out of memory?) before it finished; "
                         "nothing was written") from None
    for key, builder in builders.items():
        builder.finalize(output_prefix(prefix, key, args.level) + ".idx")
    return stats


def log_progress(stats: Stats, seconds: float, total_bytes: Optional[int], label: str) -> None:
    rate = stats.bytes / max(seconds, 1e-9)
    eta = f", ETA {(total_bytes - stats.bytes) / max(rate, 1e-9):.0f} s" if total_bytes else ""
    print(f"{label}Processed {stats.documents} documents ({stats.documents / seconds:.1f} docs/s, "
          f"{rate / 2**20:.2f} MB/s, {stats.tokens / seconds:.0f} tokens/s{eta}).", file=sys.stderr, flush=True)


def _known_size(files: List[str]) -> Optional[int]:
    """Bytes to read, when known: gzip hides the uncompressed size."""
    return None if any(f.endswith(".gz") for f in files) else sum(os.path.getsize(f) for f in files)


def _partition_main(args, start: int, stop: int, prefix: str, workers: int, label: str, queue) -> None:
    try:
        lines = islice(read_lines(args.input_files), start, stop)
        queue.put(("ok", encode_lines(args, lines, prefix, workers, None, label)))
    except SystemExit as exc:
        queue.put(("error", str(exc.code)))
    except Exception as exc:  # anything else still ends the run in one line, not a wait for a result never sent
        queue.put(("error", f"error: {label.strip()} failed: {type(exc).__name__}: {exc}"))


def _outcomes(processes, queue) -> list:
    """One (status, result) per partition; a partition process that dies without reporting ends the run."""
    outcomes = []
    while len(outcomes) < len(processes):
        try:
            outcomes.append(queue.get(timeout=1.0))
        except Empty:
            dead = [(p, process.exitcode) for p, process in enumerate(processes) if process.exitcode not in (None, 0)]
            if dead:
                for process in processes:
                    process.terminate()
                p, code = dead[0]
                raise UsageError(f"partition {p + 1}/{len(processes)} died (exit code {code}) before it finished; "
                                 "nothing was written")
    return outcomes


def encode_partitions(args, prefix: str, scratch: str) -> Stats:
    """Contiguous line ranges in parallel processes, then their outputs concatenated in order."""
    try:
        total = sum(1 for _ in read_lines(args.input_files))
    except UnreadableInput as exc:
        raise UsageError(str(exc)) from None
    bounds = [total * p // args.partitions for p in range(args.partitions + 1)]
    queue = multiprocessing.Queue()
    processes = []
    for p in range(args.partitions):
        part_prefix = os.path.join(scratch, f"part{p}")
        label = f"[partition {p + 1}/{args.partitions}] "
        process = multiprocessing.Process(target=_partition_main, args=(
            args, bounds[p], bounds[p + 1], part_prefix, args.workers // args.partitions, label, queue))
        process.start()
        processes.append(process)
    outcomes = _outcomes(processes, queue)
    for process in processes:
        process.join()
    errors = [message for status, message in outcomes if status == "error"]
    if errors:
        raise SystemExit(errors[0])
    stats = Stats()
    for _, part_stats in outcomes:
        stats.add(part_stats)
    dtype = DType.optimal_dtype(build_tokenizer(args).vocab_size)
    for key in args.json_keys:
        builder = IndexedDatasetBuilder(output_prefix(prefix, key, args.level) + ".bin", dtype=dtype)
        for p in range(args.partitions):
            builder.add_index(output_prefix(os.path.join(scratch, f"part{p}"), key, args.level))
        builder.finalize(output_prefix(prefix, key, args.level) + ".idx")
    return stats


def preprocess(args) -> Stats:
    """Write the outputs under temporary names in the output directory and rename them once complete."""
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".preprocess-", dir=out_dir)
    temporary = os.path.join(scratch, "output")
    try:
        if args.partitions == 1:
            stats = encode_lines(args, read_lines(args.input_files), temporary, args.workers,
                                 _known_size(args.input_files), "")
        else:
            stats = encode_partitions(args, temporary, scratch)
        if stats.documents == 0:
            raise UsageError(f"no documents in {', '.join(args.input_files)} (empty input"
                             f"{', or every line was skipped' if stats.bad_lines else ''})")
        for key in args.json_keys:
            for suffix in (".bin", ".idx"):  # .idx last: a .bin without its .idx never looks complete
                os.replace(output_prefix(temporary, key, args.level) + suffix,
                           output_prefix(args.output_prefix, key, args.level) + suffix)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return stats


def main(argv=None) -> Stats:
    args = get_args(argv)
    start = time.perf_counter()
    stats = preprocess(args)
    seconds = time.perf_counter() - start
    outputs = ", ".join(output_prefix(args.output_prefix, key, args.level) for key in args.json_keys)
    print(f"Done: {stats.documents} documents, {stats.tokens} tokens, {stats.bytes / 2**20:.2f} MB in {seconds:.1f} s "
          f"({stats.tokens / seconds:.0f} tokens/s) -> {outputs}"
          + (f"; skipped {stats.bad_lines} bad lines" if stats.bad_lines else "")
          + (f"; left out {stats.empty} empty documents" if stats.empty else ""), file=sys.stderr)
    return stats


if __name__ == "__main__":
    main()
