"""Train the same model on the same data, seed and token budget with every data-parallel method, side by side.

    python tools/compare_methods.py --output-dir runs/compare              # 2 replicas, sample corpus
    python tools/compare_methods.py --nproc 4 --model-shard-group-size 2 --train-iters 400
    python tools/compare_methods.py --data-path data/pydocs/corpus_text_document --train-iters 1000 --seeds 3 \
        --methods ddp edit diloco post-local-sgd       # the benchmark corpus (tools/build_corpus.py)

Writes results.md and results.csv, one row per method (final train loss, validation loss: mean, std, min and max
over --seeds, and its gap to DDP's mean; perplexity, tokens/s, bytes one rank sent to other replicas, peak memory),
runs.csv (one row per run) and loss_vs_tokens.png / loss_vs_time.png (the first seed). Every local-SGD mode ends on
a final sync, and the validation loss is the consensus model's over --eval-iters batches. Each method runs with its
own defaults (pretrain_gpt.py's: H, the outer step, the codecs) unless --local-sgd-sync-interval, --outer-lr or
--outer-momentum name one for all. A-EDiT's wall-clock interval defaults to H (its recipe's 16, or the flag's) x
EDiT's measured time per iteration. The runs are sequential on
one machine, so throughput differences here come from computation and communication volume, not a network;
tools/netsim.py puts the replicas behind shaped links.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.experiment import (LLAMA_STYLE, METHODS, add_data_args, add_training_args,  # noqa: E402
                              cross_replica_bytes, data_argv, new_figure, resolve_local_sgd_warmup, run_job,
                              save_figure, seeds, spread, write_table)
from megatron_edit.dp import DP_MODES  # noqa: E402
from megatron_edit.logging import perplexity  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model-shard-group-size", type=int, default=1)
    add_training_args(parser, num_layers=4, hidden_size=128, seq_length=128, micro_batch_size=8, train_iters=200,
                      sync_interval=None)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="inner (Adam) peak LR; --min-lr is a tenth of it")
    parser.add_argument("--lr-warmup-iters", type=int, default=None, help="default: min(20, train iters / 10)")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--outer-lr", type=float, default=None, help="default: each method's")
    parser.add_argument("--outer-momentum", type=float, default=None, help="default: each method's")
    parser.add_argument("--aedit-sync-seconds", type=float, default=None,
                        help="default: H x EDiT's measured seconds per iteration (EDiT runs first)")
    add_data_args(parser)
    parser.add_argument("extra", nargs="*", help="after --: more pretrain_gpt.py flags for every run")
    args = parser.parse_args(argv)
    resolve_local_sgd_warmup(args)
    return args


def common_argv(args) -> list:
    return [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length), *LLAMA_STYLE,
        "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
        "--train-iters", str(args.train_iters), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(lr_warmup_iters(args)),
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95",
        "--log-interval", str(args.log_interval), "--eval-interval", str(args.train_iters),
        "--eval-iters", str(args.eval_iters), *data_argv(args),
        "--model-shard-group-size", str(args.model_shard_group_size),
        "--local-sgd-warmup-iters", str(args.local_sgd_warmup_iters),
        *[argument for flag, value in (("--local-sgd-sync-interval", args.local_sgd_sync_interval),
                                       ("--outer-lr", args.outer_lr), ("--outer-momentum", args.outer_momentum))
          if value is not None for argument in (flag, str(value))],
        *args.extra,
    ]


def lr_warmup_iters(args) -> int:
    return min(20, args.train_iters // 10) if args.lr_warmup_iters is None else args.lr_warmup_iters


def final_validation(log) -> float:
    return log.validation[max(log.validation)]


def summary_row(method: str, runs: list, ddp_mean=None) -> dict:
    """One method's runs (dicts of run_row) as a table row: validation loss mean and spread over seeds."""
    valid = spread([r["validation loss"] for r in runs])
    mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    return {
        "method": method,
        "seeds": len(runs),
        "final train loss": round(mean("final train loss"), 4),
        "validation loss": round(valid["mean"], 4),
        "validation std": round(valid["std"], 4),
        "validation min": round(valid["min"], 4),
        "validation max": round(valid["max"], 4),
        "vs ddp": "" if ddp_mean is None else f"{100 * (valid['mean'] / ddp_mean - 1):+.2f}%",
        "validation PPL": round(perplexity(valid["mean"]), 2),
        "tokens/s": round(mean("tokens/s"), 1),
        "MB to other replicas per rank": round(mean("MB to other replicas per rank"), 2),
        "peak memory MiB": round(max(r["peak memory MiB"] for r in runs)),
        "train seconds": round(mean("train seconds"), 1),
    }


def run_row(method: str, seed: int, log) -> dict:
    return {"method": method, "seed": seed, "final train loss": log.iterations[-1]["lm_loss"],
            "validation loss": final_validation(log), "tokens/s": log.tokens_per_second,
            "MB to other replicas per rank": cross_replica_bytes(method, log) / 1e6,
            "peak memory MiB": log.peak_memory_mib, "train seconds": log.train_seconds}


def loss_curve(log, seq_length: int):
    """(tokens, seconds, loss) at every log line; seconds accumulate each interval's time per iteration."""
    points, seconds, previous = [], 0.0, 0
    for line in log.iterations:
        seconds += line["ms_per_iteration"] / 1000 * (line["iteration"] - previous)
        previous = line["iteration"]
        points.append((line["consumed_samples"] * seq_length, seconds, line["lm_loss"]))
    return points


def write_outputs(rows, curves, output_dir: Path) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    table = write_table(rows, output_dir, "results")
    for index, (xlabel, filename) in enumerate([("tokens", "loss_vs_tokens.png"), ("seconds", "loss_vs_time.png")]):
        figure, axes = new_figure()
        for method, points in curves.items():
            axes[0, 0].plot([p[index] for p in points], [p[2] for p in points], label=method)
        axes[0, 0].set_xlabel(f"training {xlabel}")
        axes[0, 0].set_ylabel("training loss (lm loss)")
        save_figure(figure, output_dir / filename)
    return table


def main(argv=None):
    args = get_args(argv)
    base = common_argv(args)
    runs, curves, seconds_per_iteration = {}, {}, {}
    for method in sorted(args.methods, key=lambda m: m == "aedit"):  # A-EDiT's interval comes from EDiT's pace
        argv = base + ["--dp-mode", method]
        if method == "aedit":
            interval = args.local_sgd_sync_interval or DP_MODES["aedit"].defaults.sync_interval
            tau = args.aedit_sync_seconds or interval * seconds_per_iteration.get(
                "edit", seconds_per_iteration.get("ddp", 1.0))
            argv += ["--aedit-sync-seconds", f"{tau:.3f}"]
        for seed in seeds(args):
            print(f"running {method}, seed {seed} ...", flush=True)
            log = run_job(args.nproc, argv + ["--seed", str(seed)])
            seconds_per_iteration.setdefault(method, log.train_seconds / args.train_iters)
            runs.setdefault(method, []).append(run_row(method, seed, log))
            curves.setdefault(method, loss_curve(log, args.seq_length))
            print(f"  validation loss {runs[method][-1]['validation loss']:.4f}", flush=True)
    ddp_mean = spread([r["validation loss"] for r in runs["ddp"]])["mean"] if "ddp" in runs else None
    rows = [summary_row(method, runs[method], ddp_mean) for method in runs]
    output_dir = Path(args.output_dir)
    table = write_outputs(rows, curves, output_dir)
    write_table([{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                 for method_runs in runs.values() for r in method_runs], output_dir, "runs")
    print(table)
    print(f"written to {args.output_dir}/: results.md/.csv, runs.md/.csv, loss_vs_tokens.png, loss_vs_time.png")


if __name__ == "__main__":
    main()
