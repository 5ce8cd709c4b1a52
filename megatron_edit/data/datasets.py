"""Train/validation/test datasets built by megatron-core's BlendedMegatronDatasetBuilder.

`--data-path` names preprocessed .bin/.idx pairs (one prefix, or weight/prefix pairs to blend);
`--mock-data` uses megatron-core's MockGPTDataset. Pairs are checked before training starts:
a missing file or a .bin whose size disagrees with its .idx stops the run with one line, and so does a
`--split` that is not three weights or that leaves a split the run reads without documents.
Splits the run does not read (test, and valid without evaluation) are neither checked nor built.
"""
import hashlib
import os
import re
from typing import List, Optional, Sequence, Tuple

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list

from megatron_edit.errors import UsageError


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_blend(data_path: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """`[prefix ...]` -> (prefixes, None); `[weight prefix ...]` -> (prefixes, weights), as megatron-core's
    get_blend_from_list reads them, after refusing what it would misread (a weight without its prefix)."""
    numbers = [_is_number(item) for item in data_path]
    pairs_ok = len(data_path) % 2 == 0 and all(numbers[0::2]) and not any(numbers[1::2])
    if any(numbers) and not pairs_ok:
        raise UsageError(f"--data-path {' '.join(data_path)}: give prefixes, or weight/prefix pairs "
                        "(e.g. --data-path 0.3 wiki_text_document 0.7 code_text_document)")
    return get_blend_from_list(list(data_path))


SPLITS = ("train", "valid", "test")
_WEIGHT = re.compile(r"\s*(\d+\.?\d*|\.\d+)\s*")  # what megatron-core's parse_and_normalize_split reads as one number


def used_splits(args) -> Tuple[str, ...]:
    """The splits a run reads: train always, valid when it evaluates (--eval-iters > 0); pretrain_gpt.py never
    reads test."""
    return ("train", "valid") if args.eval_iters > 0 else ("train",)


def check_split(split: str, used: Sequence[str]) -> List[float]:
    """--split as (train, valid, test) weights: three non-negative numbers, with a share for every split in `used`."""
    parts = split.split(",")
    if len(parts) != len(SPLITS) or not all(_WEIGHT.fullmatch(part) for part in parts):
        raise UsageError(f"--split {split}: expected three non-negative train,valid,test weights, e.g. 969,30,1")
    weights = [float(part) for part in parts]
    if weights[0] == 0:
        raise UsageError(f"--split {split} gives the train split no share; training needs one, e.g. 969,30,1")
    if "valid" in used and weights[1] == 0:
        raise UsageError(f"--split {split} gives the valid split no share, but evaluation reads it; give valid a "
                         "share (e.g. 969,30,1) or pass --eval-iters 0")
    return weights


def check_indexed_dataset(prefix: str, split: str, used: Sequence[str]) -> None:
    """The pair exists, its .bin holds exactly the tokens its .idx describes (an interrupted write does not),
    and every split in `used` (see `used_splits`) gets at least one document (megatron-core loops forever if not)."""
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (bin_path, idx_path):
        if not os.path.exists(path):
            raise UsageError(f"--data-path {prefix}: {path} does not exist; make it with tools/preprocess_data.py "
                            "(the prefix is --output-prefix plus _{key}_document)")
    try:
        index = IndexedDataset(prefix, multimodal=False, mmap=False).index
    except Exception as exc:  # megatron-core raises assorted errors on a damaged index
        raise UsageError(f"{idx_path} is not a readable Megatron index ({exc}); rerun tools/preprocess_data.py")
    expected = 0
    if len(index) > 0:
        expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * DType.size(index.dtype)
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise UsageError(f"{bin_path} has {actual} bytes but {idx_path} describes {expected}; the pair does not "
                        "match (an interrupted or mixed-up run?): rerun tools/preprocess_data.py")
    documents = len(index.document_indices) - 1
    check_split(split, used)
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds in zip(SPLITS, matrix):
        # The same rounding as BlendedMegatronDatasetBuilder.
        if name in used and bounds is not None and int(round(bounds[1] * documents)) == int(round(bounds[0] * documents)):
            fix = ", or pass --eval-iters 0" if name == "valid" else ""
            raise UsageError(f"--split {split} leaves the {name} split of {prefix} without documents (it has "
                            f"{documents}); give {name} a larger share{fix}")


def check_data_path(data_path: List[str], split: str, used: Sequence[str]) -> None:
    prefixes, _ = parse_blend(data_path)
    for prefix in prefixes:
        check_indexed_dataset(prefix, split, used)


def dataset_sizes(args):
    """Samples each split must provide, as Megatron-LM computes them for --train-iters."""
    evaluations = args.train_iters // args.eval_interval + 1
    return [
        args.train_iters * args.global_batch_size,
        evaluations * args.eval_iters * args.global_batch_size,
        args.eval_iters * args.global_batch_size,
    ]


def index_cache_path(data_path: Optional[List[str]], cache_path: Optional[str]) -> Optional[str]:
    """Where megatron-core keeps the sample indices of these data: a folder of --data-cache-path named by the size and
    modification time of every .bin/.idx they read. megatron-core names its caches by the prefixes alone, so data
    rewritten under the same prefix would be read through the old data's indices; here they get indices of their
    own. (Without --data-cache-path, megatron-core's own place, beside each prefix, and its naming.)"""
    if not data_path or cache_path is None:
        return cache_path
    prefixes, _ = parse_blend(data_path)
    stamps = [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns)
              for prefix in prefixes for path in (prefix + ".bin", prefix + ".idx")]
    digest = hashlib.sha256(repr(stamps).encode()).hexdigest()[:16]
    return os.path.join(cache_path, f"data-{digest}")


def build_datasets(args, tokenizer):
    """(train, valid, test) datasets, None for a split the run does not read (see `used_splits`); every rank
    builds them (rank 0 first, so index caches are shared)."""
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=None if args.mock_data else parse_blend(args.data_path),
        split=args.split,
        path_to_cache=index_cache_path(None if args.mock_data else args.data_path, args.data_cache_path),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=args.mmap_bin_files,
    )
    used = used_splits(args)
    config.split_matrix = [bounds if name in used else None for name, bounds in zip(SPLITS, config.split_matrix)]
    dataset_class = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_class, dataset_sizes(args), lambda: True, config).build()
