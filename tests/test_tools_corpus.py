"""tools/build_corpus.py at the smallest size: a few documentation files in, text that round-trips through the
tokenizer and the .bin/.idx out."""
import json

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_edit.data.tokenizers import SentencePieceTokenizer
from tools import build_corpus

RST = """Title of the page
*****************

Intro text with ``code`` and a list:

* one
* two

First section
=============

Some words about :func:`len` and {braces}, tabs\there, unicode \u00e9\u00e8 and trailing spaces   

Second section
--------------

.. code-block:: python

   def f(x):
       return x + 1
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pydocs")
    sources = root / "sources"
    (sources / "library").mkdir(parents=True)
    for i in range(4):
        (sources / "library" / f"m{i}.rst.txt").write_text(RST.replace("words", f"words {i}") * 3)
    build_corpus.main(["--output-dir", str(root / "out"), "--sources", str(sources), "--limit", "3",
                       "--min-chars", "100", "--vocab-size", "400", "--workers", "1"])
    return root / "out"


def test_sections_cut_at_titles_and_join_back_to_the_file():
    pieces = list(build_corpus.sections(RST, min_chars=0))
    assert len(pieces) == 3 and pieces[1].startswith("First section\n=====")
    assert "".join(pieces) == RST
    assert list(build_corpus.sections(RST, min_chars=10_000)) == [RST]


@pytest.mark.slow
def test_built_corpus_round_trips_through_its_tokenizer(built):
    documents = [json.loads(line) for line in open(built / "corpus.jsonl")]
    assert {d["source"].split("#")[0] for d in documents} == {"library/m0.rst.txt", "library/m1.rst.txt",
                                                              "library/m2.rst.txt"}  # --limit 3
    tokenizer = SentencePieceTokenizer(str(built / "tokenizer.model"))
    dataset = IndexedDataset(str(built / "corpus_text_document"))
    assert len(dataset) == len(documents)
    for document, ids in zip(documents, dataset):
        assert tokenizer.detokenize(tokenizer.tokenize(document["text"])) == document["text"]
        assert ids[-1] == tokenizer.eod and tokenizer.detokenize(ids[:-1]) == document["text"]


@pytest.mark.slow
def test_missing_sources_stop_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="not a directory"):
        build_corpus.main(["--output-dir", str(tmp_path), "--sources", str(tmp_path / "nowhere")])
