"""Tokenizers behind one small surface: tokenize, detokenize, vocab_size, eod, unique_identifiers.

The last two are what megatron-core's datasets read. Flags are Megatron-LM's (`--tokenizer-type`,
`--tokenizer-model`, `--vocab-file`, `--merge-file`, `--vocab-size`) and are shared by
pretrain_gpt.py and tools/preprocess_data.py through `add_tokenizer_args`.
"""
import base64
import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional

from megatron_edit.errors import UsageError

TOKENIZER_TYPES = ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer",
                   "GPT2BPETokenizer", "TikTokenizer", "NullTokenizer"]
# Megatron-LM's TikTokenizer patterns (its --tiktoken-pattern), and the vocabulary it assumes without --vocab-size.
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
          r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
          r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
TIKTOKEN_DEFAULT_VOCAB_SIZE = 2 ** 17
TIKTOKEN_REQUIRED_SPECIALS = ["<unk>", "<s>", "</s>"]
_EOD_CANDIDATES = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>"]


def add_tokenizer_args(parser):
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                       help="default: GPT2BPETokenizer with --vocab-file and --merge-file (as Megatron-LM), "
                            "NullTokenizer with --mock-data")
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece .model file, a HuggingFace tokenizer.json or directory holding one, or "
                            "TikTokenizer's JSON list of ranks")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer merges.txt")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="NullTokenizer: ids 0..N-1, end of document N; TikTokenizer: the whole vocabulary, "
                            f"special tokens included (default {TIKTOKEN_DEFAULT_VOCAB_SIZE})")
    group.add_argument("--tiktoken-pattern", choices=sorted(TIKTOKEN_PATTERNS), default=None,
                       help="TikTokenizer's pre-tokenizing regular expression (Megatron-LM's v1 or v2)")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="TikTokenizer: ids reserved below the BPE ranks for special tokens")
    group.add_argument("--tiktoken-special-tokens", nargs="+", default=None,
                       help="TikTokenizer: the first special tokens (must hold <unk>, <s> and </s>; default those "
                            "three), the rest filled with <SPECIAL_i>")
    return parser


def default_tokenizer_type(args) -> None:
    """Megatron-LM's default: GPT-2's BPE when its two files are given without --tokenizer-type."""
    if args.tokenizer_type is None and args.vocab_file and args.merge_file:
        args.tokenizer_type = "GPT2BPETokenizer"


def check_tokenizer_args(args) -> None:
    """One line for each way the tokenizer flags cannot work; run before any heavy work. It reads the files, so
    that one that exists but is not a tokenizer of its kind stops the preflight, not every rank later."""
    build_tokenizer(args)


def build_tokenizer(args):
    kind = args.tokenizer_type
    required = {"HuggingFaceTokenizer": ["tokenizer_model"], "GPT2BPETokenizer": ["vocab_file", "merge_file"],
                "NullTokenizer": []}.get(kind, ["tokenizer_model"])  # the SentencePiece ones: --tokenizer-model
    for attribute in required:
        flag = "--" + attribute.replace("_", "-")
        path = getattr(args, attribute)
        if path is None:
            raise UsageError(f"--tokenizer-type {kind} needs {flag}")
        if not os.path.exists(path):
            raise UsageError(f"{flag} {path} does not exist; train one with tools/train_tokenizer.py "
                                 "or point to an existing file")
    if kind == "NullTokenizer":
        if args.vocab_size is None or args.vocab_size < 1:
            raise UsageError("--tokenizer-type NullTokenizer needs --vocab-size N (N >= 1)")
        return NullTokenizer(args.vocab_size)
    if kind == "TikTokenizer" and args.tiktoken_pattern is None:
        raise UsageError(f"--tokenizer-type TikTokenizer needs --tiktoken-pattern ({' or '.join(TIKTOKEN_PATTERNS)}), "
                         "the one its ranks were made with")
    try:
        if kind == "TikTokenizer":
            return TikTokenizer(args.tokenizer_model, args.tiktoken_pattern, args.vocab_size,
                                args.tiktoken_num_special_tokens, args.tiktoken_special_tokens)
        if kind in SENTENCEPIECE_TOKENIZERS:
            return SENTENCEPIECE_TOKENIZERS[kind](args.tokenizer_model)
        if kind == "HuggingFaceTokenizer":
            return HuggingFaceTokenizer(args.tokenizer_model)
        return GPT2BPETokenizer(args.vocab_file, args.merge_file)
    except Exception as error:  # what sentencepiece or tokenizers raise for a file that is not of their kind
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        files = " and ".join(getattr(args, attribute) for attribute in required)
        raise UsageError(f"--tokenizer-type {kind} cannot read {files} ({reason}); give the file(s) "
                         "tools/train_tokenizer.py or the tokenizer's release wrote, or the --tokenizer-type that "
                         "wrote them") from None


class _Tokenizer:
    source = ""

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What megatron-core hashes into its dataset cache names."""
        return OrderedDict(cls=type(self).__name__, source=self.source, vocab_size=self.vocab_size)


class NullTokenizer(_Tokenizer):
    """Text is space-separated ids below `vocab_size`; id `vocab_size` ends a document (Megatron-LM's convention)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size + 1
        self.eod = vocab_size

    def tokenize(self, text: str) -> List[int]:
        return [int(token) for token in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


class SentencePieceTokenizer(_Tokenizer):
    def __init__(self, model_file: str):
        import sentencepiece

        self.source = os.path.abspath(model_file)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise UsageError(f"{model_file} defines no end-of-sentence piece (</s>) to mark document ends")

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class GPTSentencePieceTokenizer(SentencePieceTokenizer):
    """Megatron-LM's name for the same: the model's pieces, documents ending with its </s>."""


class Llama2Tokenizer(SentencePieceTokenizer):
    """Llama 2's SentencePiece model as Megatron-LM reads it: every document starts with <s> (its bos), ends with
    </s> (with --append-eod)."""

    def __init__(self, model_file: str):
        super().__init__(model_file)
        self.bos = self._sp.bos_id()
        if self.bos < 0:
            raise UsageError(f"{model_file} defines no beginning-of-sentence piece (<s>) for Llama2Tokenizer to "
                             "start documents with; use GPTSentencePieceTokenizer")

    def tokenize(self, text: str) -> List[int]:
        return [self.bos] + super().tokenize(text)


SENTENCEPIECE_TOKENIZERS = {cls.__name__: cls for cls in (SentencePieceTokenizer, GPTSentencePieceTokenizer,
                                                           Llama2Tokenizer)}


class _HFTokenizersBase(_Tokenizer):
    def _set_eod(self, preferred: List[str]) -> None:
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        for token in preferred + _EOD_CANDIDATES:
            if token in vocab:
                self.eod = vocab[token]
                return
        raise UsageError(f"{self.source} has none of the end-of-document tokens {_EOD_CANDIDATES}")

    def tokenize(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class HuggingFaceTokenizer(_HFTokenizersBase):
    """A local `tokenizer.json` (or a directory with it and, optionally, tokenizer_config.json naming eos_token)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise UsageError(f"{path} holds no tokenizer.json; pass the file or a directory with it")
        self.source = os.path.abspath(file)
        self._tokenizer = Tokenizer.from_file(file)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._set_eod(_eos_from_config(os.path.join(directory, "tokenizer_config.json")))


def _eos_from_config(config_path: str) -> List[str]:
    if not os.path.exists(config_path):
        return []
    with open(config_path) as f:
        eos = json.load(f).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return [eos] if eos else []


class GPT2BPETokenizer(_HFTokenizersBase):
    """GPT-2's byte-level BPE from vocab.json and merges.txt; documents end with <|endoftext|>."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self.source = os.path.abspath(vocab_file)
        self._tokenizer = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._set_eod(["<|endoftext|>"])


class TikTokenizer(_Tokenizer):
    """Megatron-LM's TikTokenizer: byte-level BPE ranks from a JSON list of {"rank", "token_bytes" (base64),
    "token_str"} (ranks 0-255 the single bytes), shifted above `num_special_tokens` special ids (<unk>, <s>, </s>,
    ..., then <SPECIAL_i>); documents end with </s>. The vocabulary is `vocab_size` ids in all: ranks beyond it are
    left out. Text is encoded as ordinary text (a special token's spelling in it is not that token)."""

    def __init__(self, path: str, pattern: str, vocab_size: Optional[int], num_special_tokens: int,
                 special_tokens: Optional[List[str]]):
        import tiktoken

        self.source = os.path.abspath(path)
        self.vocab_size = TIKTOKEN_DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        specials = list(TIKTOKEN_REQUIRED_SPECIALS if special_tokens is None else special_tokens)
        if len(set(specials)) != len(specials) or not set(TIKTOKEN_REQUIRED_SPECIALS) <= set(specials):
            raise UsageError(f"--tiktoken-special-tokens {' '.join(specials)}: give each once, <unk>, <s> and </s> "
                             "among them")
        if not len(specials) <= num_special_tokens < self.vocab_size:
            raise UsageError(f"--tiktoken-num-special-tokens {num_special_tokens} must be at least the "
                             f"{len(specials)} special tokens given and below the vocabulary ({self.vocab_size})")
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special_tokens)]
        ranks = _tiktoken_ranks(path, self.vocab_size - num_special_tokens)
        special_ids = {token: i for i, token in enumerate(specials)}
        self.eod = special_ids["</s>"]
        self._encoding = tiktoken.Encoding(name=os.path.basename(path), pat_str=TIKTOKEN_PATTERNS[pattern],
                                           mergeable_ranks={token: rank + num_special_tokens
                                                            for token, rank in ranks.items()},
                                           special_tokens=special_ids)

    def tokenize(self, text: str) -> List[int]:
        return self._encoding.encode_ordinary(text)

    def detokenize(self, ids) -> str:
        return self._encoding.decode([int(i) for i in ids])


def _tiktoken_ranks(path: str, count: int) -> Dict[bytes, int]:
    """The first `count` ranks of a TikTokenizer vocabulary file; ValueError saying what is wrong with it."""
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError("not a JSON list of ranks")
    if len(entries) < count:
        raise ValueError(f"it holds {len(entries)} ranks, fewer than the {count} the vocabulary leaves them "
                         "(--vocab-size minus --tiktoken-num-special-tokens); lower --vocab-size")
    ranks = {}
    for i, entry in enumerate(entries[:count]):
        if not isinstance(entry, dict) or entry.get("rank") != i or "token_bytes" not in entry:
            raise ValueError(f"entry {i} is not {{'rank': {i}, 'token_bytes': ..., 'token_str': ...}}")
        token = base64.b64decode(entry["token_bytes"])
        if (i < 256 and token != bytes([i])) or token in ranks:
            raise ValueError(f"entry {i} ({token!r}) is not " + (f"byte {i}" if i < 256 else "a new token"))
        ranks[token] = i
    return ranks
