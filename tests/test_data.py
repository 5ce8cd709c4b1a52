"""Data tools: lossless round trips, worker-independent output, blending, and one clear line for bad input."""
import gzip
import json
import os
import signal
import types

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from launcher import run_training
from test_arguments import write_tiktoken_ranks
from megatron_edit import arguments
from megatron_edit.data import datasets as data_sets
from megatron_edit.data.tokenizers import (SENTENCEPIECE_TOKENIZERS, GPT2BPETokenizer, HuggingFaceTokenizer,
                                           SentencePieceTokenizer, TikTokenizer)
from tools import build_sample_corpus, preprocess_data, train_tokenizer

pytestmark = pytest.mark.slow  # the shared corpus trains two tokenizers; most tests here also start processes


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The embedded sample corpus, its SentencePiece model, and a byte-level BPE in HF and GPT-2 formats."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("corpus")
    build_sample_corpus.main(["--output", str(root / "corpus.jsonl")])
    train_tokenizer.main(["--input", str(root / "corpus.jsonl"), "--model-prefix", str(root / "sp"),
                          "--vocab-size", "1024"])
    texts = [json.loads(line)["text"] for line in open(root / "corpus.jsonl")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(root / "tokenizer.json"))
    bpe.model.save(str(root))  # vocab.json + merges.txt, GPT-2's files
    tiktoken_ranks = tiktoken_ranks_from_merges(root / "merges.txt", root / "tiktoken.json")
    return types.SimpleNamespace(root=root, jsonl=str(root / "corpus.jsonl"), texts=texts, sp=str(root / "sp.model"),
                                 tiktoken_ranks=tiktoken_ranks)


def tiktoken_ranks_from_merges(merges_file, path) -> int:
    """The same byte-level BPE as TikTokenizer's ranks file (each merge's token after the 256 bytes, in merge order;
    GPT-2's files spell bytes as printable stand-in characters). Returns the number of ranks."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    merged = []
    for line in open(merges_file).read().splitlines()[1:]:  # the first line is a version header
        token = bytes(byte_of[c] for c in line.replace(" ", ""))
        if token not in merged and len(token) > 1:
            merged.append(token)
    write_tiktoken_ranks(path, merged)
    return 256 + len(merged)


SP = lambda c: ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", c.sp]  # noqa: E731


def preprocess(corpus, prefix, *extra, inputs=None):
    return preprocess_data.main(["--input", *(inputs or [corpus.jsonl]), "--output-prefix", str(prefix),
                                 "--append-eod", "--log-interval", "100000", *extra])


def decoded_documents(prefix, tokenizer):
    dataset = IndexedDataset(f"{prefix}_text_document")
    documents = []
    for i in range(len(dataset)):
        ids = dataset[i]
        assert ids[-1] == tokenizer.eod
        documents.append(tokenizer.detokenize(ids[:-1]))
    return documents


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                                  "HuggingFaceTokenizer", "GPT2BPETokenizer", "GPT2BPETokenizer by default",
                                  "TikTokenizer"])
def test_preprocess_round_trip_gives_back_the_text(corpus, tmp_path, kind):
    gpt2_files = ["--vocab-file", str(corpus.root / "vocab.json"), "--merge-file", str(corpus.root / "merges.txt")]
    tiktoken_flags = ["--tokenizer-model", str(corpus.root / "tiktoken.json"), "--tiktoken-pattern", "v2",
                      "--tiktoken-num-special-tokens", "16", "--vocab-size", str(16 + corpus.tiktoken_ranks)]
    flags = {
        "HuggingFaceTokenizer": ["--tokenizer-type", kind, "--tokenizer-model", str(corpus.root / "tokenizer.json")],
        "GPT2BPETokenizer": ["--tokenizer-type", kind, *gpt2_files],
        "GPT2BPETokenizer by default": gpt2_files,  # Megatron-LM's default with GPT-2's two files
        "TikTokenizer": ["--tokenizer-type", kind, *tiktoken_flags],
    }.get(kind, ["--tokenizer-type", kind, "--tokenizer-model", corpus.sp])
    tokenizer = {
        "HuggingFaceTokenizer": lambda: HuggingFaceTokenizer(str(corpus.root)),
        "GPT2BPETokenizer": lambda: GPT2BPETokenizer(str(corpus.root / "vocab.json"), str(corpus.root / "merges.txt")),
        "GPT2BPETokenizer by default": lambda: GPT2BPETokenizer(str(corpus.root / "vocab.json"),
                                                                str(corpus.root / "merges.txt")),
        "TikTokenizer": lambda: TikTokenizer(str(corpus.root / "tiktoken.json"), "v2", 16 + corpus.tiktoken_ranks, 16,
                                             None),
    }.get(kind, lambda: SENTENCEPIECE_TOKENIZERS[kind](corpus.sp))()
    stats = preprocess(corpus, tmp_path / "out", *flags)
    assert stats.documents == len(corpus.texts)
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert dataset.index.dtype == np.uint16  # vocab < 65500
    assert decoded_documents(tmp_path / "out", tokenizer) == corpus.texts
    starts = {int(dataset[i][0]) for i in range(len(dataset))}
    if kind == "Llama2Tokenizer":  # Llama 2's documents start with <s>
        assert starts == {tokenizer.bos}
    else:
        assert len(starts) > 1


def test_workers_and_partitions_give_byte_identical_output(corpus, tmp_path):
    half = len(corpus.texts) // 2
    lines = open(corpus.jsonl).readlines()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    first.write_text("".join(lines[:half]))
    with gzip.open(second, "wt") as f:
        f.write("".join(lines[half:]))
    inputs = [str(first), str(second)]
    outputs = {}
    for name, extra in {"w1": ["--workers", "1"], "w4": ["--workers", "4"],
                        "w1p1": ["--workers", "1", "--partitions", "1"],
                        "w4p2": ["--workers", "4", "--partitions", "2"],
                        "w3p3": ["--workers", "3", "--partitions", "3"]}.items():
        preprocess(corpus, tmp_path / name, *SP(corpus), *extra, inputs=inputs)
        outputs[name] = [(tmp_path / f"{name}_text_document{s}").read_bytes() for s in (".bin", ".idx")]
    reference = outputs.pop("w1")
    for name, produced in outputs.items():
        assert produced == reference, name


def test_a_blend_follows_its_weights_and_trains(corpus, tmp_path):
    lines = open(corpus.jsonl).readlines()
    (tmp_path / "a.jsonl").write_text("".join(lines[0::2]))
    (tmp_path / "b.jsonl").write_text("".join(lines[1::2]))
    for name in "ab":
        preprocess(corpus, tmp_path / name, *SP(corpus), inputs=[str(tmp_path / f"{name}.jsonl")])
    args = types.SimpleNamespace(
        seed=1, seq_length=64, mock_data=False, split="100,0,0", data_cache_path=None, mmap_bin_files=False,
        data_path=["0.25", str(tmp_path / "a_text_document"), "0.75", str(tmp_path / "b_text_document")],
        train_iters=1000, global_batch_size=4, eval_interval=1000, eval_iters=0)
    train, _, _ = data_sets.build_datasets(args, SentencePieceTokenizer(corpus.sp))
    assert {type(part.dataset.bin_reader).__name__ for part in train.datasets} == {"_FileBinReader"}  # no mmap
    counts = np.bincount(train.dataset_index[:4000], minlength=2)
    assert abs(counts[0] / 4000 - 0.25) < 0.01 and abs(counts[1] / 4000 - 0.75) < 0.01
    run = run_training(1, ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                           "--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "4", "--lr", "1e-3",
                           "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "4", "--split", "90,10,0",
                           "--data-cache-path", str(tmp_path / "cache"), "--data-path", *args.data_path, *SP(corpus)])
    assert len(run.check().losses) == 4 and 4 in run.validation_losses


def error_line(excinfo) -> str:
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_malformed_json_line_names_file_and_line(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n{"text": "fine again"}\n')
    with pytest.raises(SystemExit) as excinfo:
        preprocess(corpus, tmp_path / "out", *SP(corpus), inputs=[str(bad)])
    assert f"{bad}:2: not valid JSON" in error_line(excinfo)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".preprocess-*"))
    stats = preprocess(corpus, tmp_path / "out", *SP(corpus), "--skip-bad-lines", inputs=[str(bad)])
    assert (stats.documents, stats.bad_lines) == (2, 1)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_corrupt_gzip_input_names_the_file(corpus, tmp_path, workers):
    truncated, not_gzip = tmp_path / "truncated.jsonl.gz", tmp_path / "plain.jsonl.gz"
    truncated.write_bytes(gzip.compress(open(corpus.jsonl, "rb").read())[:20000])
    not_gzip.write_text('{"text": "plain text under a .gz name"}\n')
    with pytest.raises(SystemExit) as excinfo:
        preprocess(corpus, tmp_path / "out", *SP(corpus), "--workers", workers, inputs=[str(truncated)])
    message = error_line(excinfo)
    assert message.startswith(f"error: {truncated}: the gzip stream ends early after line ")
    assert message.endswith(" (a truncated file?); recompress or download it again")
    with pytest.raises(SystemExit) as excinfo:
        preprocess(corpus, tmp_path / "out", *SP(corpus), "--workers", workers, inputs=[str(not_gzip)])
    assert error_line(excinfo) == \
        f"error: {not_gzip}: not gzip data (it starts with b'{{\"'); name it .jsonl if it is plain text"
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".preprocess-*"))


def test_missing_json_key_is_one_line(corpus, tmp_path):
    data = tmp_path / "k.jsonl"
    data.write_text('{"body": "x"}\n')
    with pytest.raises(SystemExit) as excinfo:
        preprocess(corpus, tmp_path / "out", *SP(corpus), inputs=[str(data)])
    assert f"{data}:1: no key 'text' (its keys: body); pass the right --json-keys" in error_line(excinfo)


def test_missing_tokenizer_file_is_one_line(corpus, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        preprocess(corpus, tmp_path / "out", "--tokenizer-type", "SentencePieceTokenizer",
                   "--tokenizer-model", str(tmp_path / "nope.model"))
    assert f"--tokenizer-model {tmp_path / 'nope.model'} does not exist" in error_line(excinfo)


@pytest.fixture
def punkt_model(tmp_path, monkeypatch):
    """An English punkt model with no learned abbreviations or collocations (nltk's punkt_tab layout), as the only
    one nltk finds: sentences end at '.', '?' or '!' followed by whitespace."""
    import nltk

    model = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (model / name).write_text("")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])


@pytest.mark.parametrize("keep_newlines", [False, True])
def test_split_sentences_writes_each_sentence_as_a_sequence_of_its_document(corpus, tmp_path, punkt_model,
                                                                            keep_newlines):
    text = "The first sentence. A second one?\nAnd a third!\n\nA new paragraph."
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "One."}) + "\n")
    hf = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(corpus.root / "tokenizer.json")]
    newlines = ["--keep-newlines"] if keep_newlines else []
    preprocess(corpus, tmp_path / "out", *hf, "--split-sentences", *newlines, inputs=[str(tmp_path / "in.jsonl")])
    assert not list(tmp_path.glob("out_text_document*"))  # Megatron-LM's name for sentence-level data
    dataset, tokenizer = IndexedDataset(str(tmp_path / "out_text_sentence")), HuggingFaceTokenizer(str(corpus.root))
    assert list(dataset.document_indices) == [0, 4, 5]  # 4 sentences, then 1
    sentences = [tokenizer.detokenize(dataset[i]) for i in range(5)]
    assert sentences[3].endswith(tokenizer.detokenize([tokenizer.eod])) and dataset[4][-1] == tokenizer.eod
    sentences[3] = sentences[3][:-len("<|endoftext|>")]
    if keep_newlines:  # each keeps the whitespace after it: they join back into the document
        assert "".join(sentences[:4]) == text
    else:
        assert sentences[:4] == ["The first sentence.", "A second one?", "And a third!", "A new paragraph."]


def test_preprocess_flags_of_megatron_lm_scripts(corpus, tmp_path, monkeypatch, capsys):
    """Those with nothing to do here warn; T5's extra ids, and sentence splitting without its model, are one line."""
    import nltk

    stats = preprocess(corpus, tmp_path / "out", *SP(corpus), "--keep-sequential-samples", "--trust-remote-code")
    assert stats.documents == len(corpus.texts)
    assert "warning: --keep-sequential-samples changes nothing here" in capsys.readouterr().err
    for flags, expected in [(["--vocab-extra-ids", "100"], "error: --vocab-extra-ids: T5's sentinel tokens are not supported here"),
                            (["--keep-newlines"], "error: --keep-newlines keeps the newlines between split sentences"),
                            (["--split-sentences", "--lang", "english"], "error: --split-sentences: nltk's punkt "
                             "model for --lang english is not installed; run python -m nltk.downloader punkt_tab")]:
        monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])
        with pytest.raises(SystemExit) as excinfo:
            preprocess(corpus, tmp_path / "bad", *SP(corpus), *flags)
        assert error_line(excinfo).startswith(expected)


def test_empty_input_is_one_line(corpus, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit) as excinfo:
        preprocess(corpus, tmp_path / "out", *SP(corpus), inputs=[str(empty)])
    assert "no documents in" in error_line(excinfo)
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("how", ["dies", "raises"])
def test_a_partition_that_dies_or_raises_ends_the_run_in_one_line(corpus, tmp_path, monkeypatch, how):
    """Partitions are forked, so the patched encode_lines runs in them: one exits without a word, or raises
    something that is not a usage error. Either way the run ends (it used to wait forever) and leaves nothing."""
    def broken(args, lines, prefix, workers, total_bytes, label):
        if how == "dies":
            os._exit(3)
        raise RuntimeError("tokenizer blew up")

    monkeypatch.setattr(preprocess_data, "encode_lines", broken)
    with pytest.raises(SystemExit) as excinfo:
        preprocess(corpus, tmp_path / "out", *SP(corpus), "--workers", "2", "--partitions", "2")
    assert error_line(excinfo) in (
        ["error: partition 1/2 died (exit code 3) before it finished; nothing was written",
         "error: partition 2/2 died (exit code 3) before it finished; nothing was written"] if how == "dies" else
        ["error: [partition 1/2] failed: RuntimeError: tokenizer blew up",
         "error: [partition 2/2] failed: RuntimeError: tokenizer blew up"])
    assert not list(tmp_path.iterdir())  # neither output nor the scratch folder


def test_a_killed_tokenizing_worker_ends_the_run_in_one_line(corpus, tmp_path, monkeypatch):
    """A worker of --workers 2 is killed mid-run (the kernel's OOM killer would): the run ends with one line and
    leaves nothing, instead of waiting forever for the chunk that worker held."""
    parent, encode = os.getpid(), preprocess_data.Encoder.encode

    def killed_at_line_40(self, item):
        if os.getpid() != parent and item[1] == 40:
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(self, item)

    monkeypatch.setattr(preprocess_data.Encoder, "encode", killed_at_line_40)
    with pytest.raises(SystemExit) as excinfo:
        preprocess(corpus, tmp_path / "out", *SP(corpus), "--workers", "2")
    assert error_line(excinfo) == ("error: a tokenizing worker process died (killed; out of memory?) before it "
                                   "finished; nothing was written")
    assert not list(tmp_path.iterdir())


def test_interrupted_run_leaves_no_output_pair(corpus, tmp_path, monkeypatch):
    real_encode, calls = preprocess_data.Encoder.encode, []

    def interrupted(self, item):
        calls.append(item)
        if len(calls) == 50:
            raise KeyboardInterrupt
        return real_encode(self, item)

    monkeypatch.setattr(preprocess_data.Encoder, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess(corpus, tmp_path / "out", *SP(corpus))
    assert os.listdir(tmp_path) == []


@pytest.fixture
def prefix(corpus, tmp_path) -> str:
    """The corpus preprocessed with its SentencePiece tokenizer: the .bin/.idx prefix."""
    preprocess(corpus, tmp_path / "out", *SP(corpus))
    return str(tmp_path / "out_text_document")


def test_mismatched_bin_and_idx_detected_when_training_starts(corpus, prefix):
    data_sets.check_data_path([prefix], "90,10,0", used=("train", "valid"))
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 10)
    with pytest.raises(SystemExit) as excinfo:
        data_sets.check_data_path([prefix], "90,10,0", used=("train", "valid"))
    assert "the pair does not match" in error_line(excinfo)
    run = run_training(1, ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                           "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
                           "--data-path", prefix, "--split", "90,10,0", *SP(corpus)])
    assert run.returncode != 0 and "the pair does not match" in run.stderr


def test_split_without_documents_is_one_line(corpus, prefix):
    with pytest.raises(SystemExit) as excinfo:
        data_sets.check_data_path([prefix], "949,50,1", used=data_sets.SPLITS)
    assert "--split 949,50,1 leaves the test split of" in error_line(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        data_sets.check_data_path([prefix], "2000,1,0", used=("train", "valid"))
    assert error_line(excinfo) == (f"error: --split 2000,1,0 leaves the valid split of {prefix} without documents "
                                   f"(it has {len(corpus.texts)}); give valid a larger share, or pass --eval-iters 0")
    data_sets.check_data_path([prefix], "2000,1,0", used=("train",))


def test_default_split_reads_train_and_valid_and_never_builds_test(corpus, prefix, tmp_path):
    """969,30,1 leaves the sample corpus's test split empty; pretrain_gpt.py never reads it, so that is fine."""
    with pytest.raises(SystemExit) as excinfo:
        data_sets.check_data_path([prefix], "969,30,1", used=data_sets.SPLITS)
    assert "leaves the test split of" in error_line(excinfo)
    args = arguments.parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                                 "--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "4", "--lr", "1e-3",
                                 "--device", "cpu", "--data-path", prefix, "--data-cache-path", str(tmp_path / "cache"),
                                 "--eval-iters", "2", *SP(corpus)], world_size=1)
    assert args.split == "969,30,1"
    train, valid, test = data_sets.build_datasets(args, SentencePieceTokenizer(corpus.sp))
    assert len(train) >= 4 * 2 and len(valid) >= 2 * 2 and test is None
    args.eval_iters = 0
    assert data_sets.build_datasets(args, SentencePieceTokenizer(corpus.sp))[1] is None


def test_training_on_the_sample_corpus_lowers_validation_perplexity(corpus, tmp_path):
    preprocess(corpus, tmp_path / "sample", *SP(corpus))
    run = run_training(1, [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "8", "--train-iters", "40", "--lr", "3e-3", "--lr-warmup-iters", "4",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--data-path", str(tmp_path / "sample_text_document"), "--split", "90,10,0",
        "--data-cache-path", str(tmp_path / "cache"), *SP(corpus),
        "--log-interval", "10", "--eval-interval", "40", "--eval-iters", "4"]).check()
    valid = run.validation_losses
    assert valid[40] < valid[0] - 1.0, valid


def test_data_rewritten_under_a_prefix_get_index_caches_of_their_own(corpus, tmp_path):
    """megatron-core names its index caches by the prefix: rewritten data must not be read through the old data's
    indices, but as a fresh cache reads them."""
    def datasets(cache):
        args = arguments.parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                                     "--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "20",
                                     "--lr", "1e-3", "--device", "cpu", "--data-path", str(tmp_path / "d_text_document"),
                                     "--split", "90,10,0", "--data-cache-path", str(cache), "--eval-iters", "2",
                                     *SP(corpus)], world_size=1)
        train, valid, _ = data_sets.build_datasets(args, SentencePieceTokenizer(corpus.sp))
        return [train[i]["tokens"].tolist() for i in range(len(train))], len(valid)

    preprocess(corpus, tmp_path / "d", *SP(corpus))
    before = datasets(tmp_path / "cache")
    half = tmp_path / "half.jsonl"
    half.write_text("".join(open(corpus.jsonl).readlines()[::2]))
    preprocess(corpus, tmp_path / "d", *SP(corpus), inputs=[str(half)])
    after = datasets(tmp_path / "cache")
    assert after == datasets(tmp_path / "fresh") and after != before
    assert len(list((tmp_path / "cache").glob("data-*"))) == 2


def test_data_from_a_larger_vocabulary_stop_the_run_in_one_line(corpus, prefix):
    """Tokenized with the sample's SentencePiece model (8K pieces), read by a model of a 128-token vocabulary: one
    line before the first forward, not an embedding's index error."""
    run = run_training(1, ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                           "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
                           "--data-path", prefix, "--split", "90,10,0", "--tokenizer-type", "NullTokenizer",
                           "--vocab-size", "100"])
    assert run.returncode != 0 and "beyond the model's vocabulary of 128" in run.stderr, run.stderr[-2000:]
    assert "IndexError" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
