"""Build a jsonl corpus of real English text offline: the docstrings of the Python standard library.

Every Python installation carries this text (PSF license), so the default training job needs no download.
One document per module: its docstring, then those of its classes and functions, in source order.
Files are parsed with `ast`, never imported, and visited in sorted order, so the corpus is deterministic
for a given Python version.

    python tools/build_sample_corpus.py --output data/sample/corpus.jsonl
"""
import argparse
import ast
import json
import os
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_edit.errors import UsageError  # noqa: E402

SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
                "ensurepip", "turtledemo", "tkinter", "pydoc_data"}


def module_text(path: Path) -> str:
    """Docstrings of a module and of its classes and functions, separated by blank lines."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def stdlib_modules(root: Path):
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(directory) / name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="jsonl file to write ({'text': ..., 'source': ...} per line)")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="standard library directory")
    args = parser.parse_args(argv)

    root = Path(args.stdlib)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    temporary = args.output + ".tmp"
    documents = size = 0
    with open(temporary, "w", encoding="utf-8") as out:
        for path in stdlib_modules(root):
            text = module_text(path)
            if text:
                source = str(path.relative_to(root))
                out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
                documents += 1
                size += len(text.encode("utf-8"))
    if documents == 0:
        os.remove(temporary)
        raise UsageError(f"found no documented modules under {root}; pass --stdlib")
    os.replace(temporary, args.output)
    print(f"wrote {documents} documents ({size / 2**20:.1f} MB of text) from {root} to {args.output}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
