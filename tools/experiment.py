"""Shared by the comparison tools: the model and data they train on, seeds, and one training job run to its log.

The default data is the embedded sample corpus (built on first use by examples/prepare_sample_data.sh); the
benchmark corpus (tools/build_corpus.py, Python's documentation) is chosen with --data-path. The sample corpus is
memorized within a few hundred iterations: judge convergence on the benchmark corpus.
"""
import argparse
import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_edit.logging import TrainingLog  # noqa: E402

SAMPLE_DATA_PATH = "data/sample/corpus_text_document"
DATA_CACHE = "data/cache"
LLAMA_STYLE = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
               "--hidden-dropout", "0", "--attention-dropout", "0"]
METHODS = ["ddp", "post-local-sgd", "diloco", "edit", "aedit"]


def add_training_args(parser: argparse.ArgumentParser, num_layers: int, hidden_size: int, seq_length: int,
                      micro_batch_size: int, train_iters: int, sync_interval: Optional[int],
                      warmup_iters: Optional[int] = None) -> None:
    """The model and schedule flags every comparison tool takes (pretrain_gpt.py's names), with its defaults
    (W: pretrain_gpt.py's, see resolve_local_sgd_warmup, unless the tool names one)."""
    parser.add_argument("--num-layers", type=int, default=num_layers)
    parser.add_argument("--hidden-size", type=int, default=hidden_size)
    parser.add_argument("--seq-length", type=int, default=seq_length)
    parser.add_argument("--micro-batch-size", type=int, default=micro_batch_size)
    parser.add_argument("--train-iters", type=int, default=train_iters)
    parser.add_argument("--local-sgd-sync-interval", type=int, default=sync_interval,
                        help="H; default: each mode's (pretrain_gpt.py's)" if sync_interval is None else None)
    parser.add_argument("--local-sgd-warmup-iters", type=int, default=warmup_iters,
                        help="W; default: a quarter of --train-iters, as pretrain_gpt.py" if warmup_iters is None else None)


def default_local_sgd_warmup(train_iters: int) -> int:
    """pretrain_gpt.py's W when no flag names one."""
    from megatron_edit.dp.local_sgd.warmup import DEFAULT_WARMUP_FRACTION

    return int(DEFAULT_WARMUP_FRACTION * train_iters)


def resolve_local_sgd_warmup(args) -> None:
    if args.local_sgd_warmup_iters is None:
        args.local_sgd_warmup_iters = default_local_sgd_warmup(args.train_iters)


def add_data_args(parser: argparse.ArgumentParser, eval_iters: int = 64) -> None:
    """Which corpus, split, evaluation size and seeds a tool's runs use (pretrain_gpt.py's names where it has them)."""
    g = parser.add_argument_group("data and seeds")
    g.add_argument("--data-path", default=None,
                   help="prefix of a .bin/.idx pair (e.g. data/pydocs/corpus_text_document from tools/build_corpus.py); "
                        "default: the sample corpus")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model; default: tokenizer.model beside --data-path")
    g.add_argument("--split", default="95,5,0", help="train,valid,test proportions of the corpus's documents")
    g.add_argument("--eval-iters", type=int, default=eval_iters,
                   help="validation batches of the final evaluation (of the consensus model in local-SGD modes); "
                        "the default covers ~90%% of the benchmark corpus's 5%% held-out split at global batch 16")
    g.add_argument("--mock-data", action="store_true", help="megatron-core's mock data instead of a corpus")
    g.add_argument("--seed", type=int, default=1234, help="the first seed")
    g.add_argument("--seeds", type=int, default=1,
                   help="runs per configuration, with seeds --seed, --seed+1, ... (initialization and data order)")


def seeds(args) -> List[int]:
    return [args.seed + i for i in range(args.seeds)]


def spread(values: Sequence[float]) -> dict:
    """mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def write_table(rows: List[dict], output_dir: Path, name: str) -> str:
    """rows as name.csv and as a markdown table in name.md; returns the markdown."""
    columns = list(rows[0])
    with open(output_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    table = "\n".join(lines)
    (output_dir / f"{name}.md").write_text(table + "\n")
    return table


def new_figure(columns: int = 1):
    """A matplotlib figure for files (no display needed) and its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(7 * columns, 4.5), squeeze=False)


def save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    for axis in figure.axes:
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def data_args(mock_data: bool, data_path: Optional[str] = None, tokenizer_model: Optional[str] = None,
              split: str = "95,5,0") -> List[str]:
    """pretrain_gpt.py's data flags: --mock-data, a corpus (--data-path), or the sample corpus (built here if missing)."""
    if mock_data:
        return ["--mock-data", "--vocab-size", "511"]
    if data_path is None:
        data_path = SAMPLE_DATA_PATH
        if not (REPO / f"{data_path}.idx").exists():
            subprocess.run(["bash", "examples/prepare_sample_data.sh"], cwd=REPO, check=True, capture_output=True)
    if tokenizer_model is None:
        tokenizer_model = str(Path(data_path).parent / "tokenizer.model")
    return ["--data-path", data_path, "--split", split, "--data-cache-path", DATA_CACHE,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model]


def data_argv(args) -> List[str]:
    """data_args from the flags of add_data_args."""
    return data_args(args.mock_data, args.data_path, args.tokenizer_model, args.split)


def cross_replica_bytes(method: str, log: TrainingLog) -> float:
    """Payload one rank sent to other replicas: DDP's gradient all-reduce, or the local-SGD sync group."""
    from megatron_edit.dp import DP_MODES

    return log.bytes_per_group.get(DP_MODES[method].cross_replica_group, 0.0)


class JobFailed(RuntimeError):
    pass


def torchrun_command(nproc: int, argv: Sequence[str], launcher_args: Sequence[str] = ("--standalone",),
                     prefix: Sequence[str] = (), script: str = str(REPO / "pretrain_gpt.py")) -> List[str]:
    return [*prefix, sys.executable, "-m", "megatron_edit.launch", *launcher_args, f"--nproc-per-node={nproc}",
            script, *argv]


def job_env(extra: Optional[dict] = None) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1", **(extra or {}))


def check_finished(command: Sequence[str], returncode: int, stdout: str, stderr: str) -> TrainingLog:
    if returncode != 0:
        raise JobFailed(f"{' '.join(command)}\nexited {returncode}:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return TrainingLog.parse(stdout)


def run_job(nproc: int, argv: Sequence[str], timeout: int = 1800) -> TrainingLog:
    """pretrain_gpt.py under torchrun on this machine (CPU, or the GPUs present), waited for and parsed."""
    command = torchrun_command(nproc, argv)
    result = subprocess.run(command, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)
    return check_finished(command, result.returncode, result.stdout, result.stderr)
