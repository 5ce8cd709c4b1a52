"""Build the benchmark corpus from Python's documentation sources: jsonl, tokenizer, .bin/.idx.

The sample corpus (tools/build_sample_corpus.py, 1.4 MB) is memorized within a few hundred iterations, so it cannot
judge convergence. Python's own documentation (Debian's python3.11-doc ships its reST sources, ~11 MB, ~3M BPE-8192
tokens) does not repeat within a 1000-iteration benchmark at global batch 16 x 128.

    python tools/build_corpus.py --output-dir data/pydocs          # corpus.jsonl, tokenizer.model, corpus_text_document.*
    ... pretrain_gpt.py --data-path data/pydocs/corpus_text_document --split 95,5,0 \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/pydocs/tokenizer.model

One document per section (a file is cut at its reST section titles; sections shorter than --min-chars are merged with
the next one of the same file). Sources are read in sorted order and the documents then shuffled with --seed, so the
output is deterministic and megatron's --split (contiguous ranges of documents) holds out a representative sample of
every part of the documentation rather than its last files. The tokenizer and the .bin/.idx come from
tools/train_tokenizer.py and tools/preprocess_data.py; each step is skipped when its output exists (--force redoes all).
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_edit.errors import UsageError  # noqa: E402

DOC_PACKAGE = "python3.11-doc"
DOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"
# A reST section title: a text line underlined (and maybe overlined) by one repeated punctuation character.
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+_.:])\1{2,}\s*$")


def ensure_sources(sources: Path, package: str) -> Path:
    """The documentation sources, installing `package` with apt-get when they are missing and we are root."""
    if sources.is_dir():
        return sources
    if sources != Path(DOC_SOURCES):
        raise UsageError(f"--sources {sources} is not a directory")
    if os.geteuid() != 0:
        raise UsageError(f"{sources} is missing: install it as root with `apt-get install {package}`, "
                         "or pass --sources DIR")
    print(f"installing {package} with apt-get ...", file=sys.stderr, flush=True)
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise UsageError(f"`{' '.join(command)}` failed: {result.stderr.strip()[-300:]}")
    if not sources.is_dir():
        raise UsageError(f"{package} is installed but {sources} does not exist; pass --sources DIR")
    return sources


def source_files(root: Path, limit: int = 0) -> List[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith((".rst.txt", ".txt", ".rst")))
    return files[:limit] if limit else files


def sections(text: str, min_chars: int) -> Iterator[str]:
    """The text cut before each section title, short pieces merged forward; the pieces join back to the text."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for i in range(1, len(lines)):
        title = lines[i - 1].strip()
        if title and not _UNDERLINE.match(lines[i - 1]) and _UNDERLINE.match(lines[i]) \
                and len(lines[i].rstrip()) >= len(title):
            start = i - 2 if i >= 2 and _UNDERLINE.match(lines[i - 2]) else i - 1  # an overline belongs to the title
            if start > starts[-1]:
                starts.append(start)
    pending = ""
    for begin, end in zip(starts, starts[1:] + [len(lines)]):
        pending += "".join(lines[begin:end])
        if len(pending) >= min_chars:
            yield pending
            pending = ""
    if pending.strip():
        yield pending


def build_jsonl(root: Path, output: Path, limit: int, min_chars: int, seed: int) -> int:
    documents = []
    for path in source_files(root, limit):
        source = str(path.relative_to(root))
        for index, text in enumerate(sections(path.read_text(encoding="utf-8", errors="replace"), min_chars)):
            if text.strip():
                documents.append({"text": text, "source": f"{source}#{index}"})
    if not documents:
        raise UsageError(f"no documentation text under {root}; pass --sources DIR")
    random.Random(seed).shuffle(documents)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps(document, ensure_ascii=False) + "\n")
    os.replace(temporary, output)
    size = sum(len(d["text"].encode("utf-8")) for d in documents)
    print(f"wrote {len(documents)} documents ({size / 2**20:.1f} MB) from {root} to {output}", file=sys.stderr)
    return len(documents)


def main(argv=None):
    from tools import preprocess_data, train_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="data/pydocs")
    parser.add_argument("--sources", default=DOC_SOURCES, help=f"reST sources (default: {DOC_PACKAGE}'s)")
    parser.add_argument("--doc-package", default=DOC_PACKAGE, help="Debian package apt-get installs when missing")
    parser.add_argument("--limit", type=int, default=0, help="only the first N source files (0 = all)")
    parser.add_argument("--min-chars", type=int, default=2000, help="shorter sections merge with the next one")
    parser.add_argument("--seed", type=int, default=1234, help="document order (and the tokenizer's sampling)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--force", action="store_true", help="rebuild every output even when it exists")
    args = parser.parse_args(argv)

    out = Path(args.output_dir)
    jsonl, tokenizer, prefix = out / "corpus.jsonl", out / "tokenizer", out / "corpus"
    if args.force or not jsonl.exists():
        build_jsonl(ensure_sources(Path(args.sources), args.doc_package), jsonl, args.limit, args.min_chars,
                    args.seed)
    if args.force or not tokenizer.with_suffix(".model").exists():
        train_tokenizer.main(["--input", str(jsonl), "--model-prefix", str(tokenizer), "--vocab-size",
                              str(args.vocab_size), "--model-type", args.model_type, "--seed", str(args.seed)])
    if args.force or not Path(f"{prefix}_text_document.idx").exists():
        preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(prefix), "--append-eod",
                              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                              str(tokenizer.with_suffix(".model")), "--workers", str(args.workers),
                              "--log-interval", "100000"])
    print(f"--data-path {prefix}_text_document --tokenizer-type SentencePieceTokenizer "
          f"--tokenizer-model {tokenizer}.model", file=sys.stderr)


if __name__ == "__main__":
    main()
