"""Train the same model on the same data, seed and token budget with every data-parallel method, side by side.

    python tools/compare_methods.py --output-dir runs/compare              # 2 replicas, sample corpus
    python tools/compare_methods.py --nproc 4 --model-shard-group-size 2 --train-iters 400

Writes results.md and results.csv (final train loss, validation loss and perplexity, tokens/s, bytes one rank
sent to other replicas, peak memory) and loss_vs_tokens.png / loss_vs_time.png. A-EDiT's wall-clock interval
defaults to H x EDiT's measured time per iteration, so both sync about equally often. The runs are sequential on
one machine, so throughput differences here come from computation and communication volume, not a network;
tools/netsim.py puts the replicas behind shaped links.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.experiment import (LLAMA_STYLE, METHODS, add_training_args, cross_replica_bytes, data_args,  # noqa: E402
                              new_figure, run_job, save_figure, write_table)
from megatron_edit.logging import perplexity  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model-shard-group-size", type=int, default=1)
    add_training_args(parser, num_layers=4, hidden_size=128, seq_length=128, micro_batch_size=8, train_iters=200,
                      sync_interval=16, warmup_iters=20)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--eval-iters", type=int, default=8)
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.8)
    parser.add_argument("--aedit-sync-seconds", type=float, default=None,
                        help="default: H x EDiT's measured seconds per iteration (EDiT runs first)")
    parser.add_argument("--mock-data", action="store_true", help="megatron-core's mock data instead of the corpus")
    parser.add_argument("extra", nargs="*", help="after --: more pretrain_gpt.py flags for every run")
    return parser.parse_args(argv)


def common_argv(args) -> list:
    return [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length), *LLAMA_STYLE,
        "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
        "--train-iters", str(args.train_iters), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(min(20, args.train_iters // 10)),
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95", "--seed", "1234",
        "--log-interval", str(args.log_interval), "--eval-interval", str(args.train_iters),
        "--eval-iters", str(args.eval_iters), *data_args(args.mock_data),
        "--model-shard-group-size", str(args.model_shard_group_size),
        "--local-sgd-sync-interval", str(args.local_sgd_sync_interval),
        "--local-sgd-warmup-iters", str(args.local_sgd_warmup_iters),
        "--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum), *args.extra,
    ]


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
    rows, curves, seconds_per_iteration = [], {}, {}
    for method in sorted(args.methods, key=lambda m: m == "aedit"):  # A-EDiT's interval comes from EDiT's pace
        argv = base + ["--dp-mode", method]
        if method == "aedit":
            tau = args.aedit_sync_seconds or args.local_sgd_sync_interval * seconds_per_iteration.get(
                "edit", seconds_per_iteration.get("ddp", 1.0))
            argv += ["--aedit-sync-seconds", f"{tau:.3f}"]
        print(f"running {method} ...", flush=True)
        log = run_job(args.nproc, argv)
        seconds_per_iteration[method] = log.train_seconds / args.train_iters
        final_valid = log.validation[max(log.validation)]
        rows.append({
            "method": method,
            "final train loss": round(log.iterations[-1]["lm_loss"], 4),
            "validation loss": round(final_valid, 4),
            "validation PPL": round(perplexity(final_valid), 2),
            "tokens/s": round(log.tokens_per_second, 1),
            "MB to other replicas per rank": round(cross_replica_bytes(method, log) / 1e6, 2),
            "peak memory MiB": round(log.peak_memory_mib),
            "train seconds": round(log.train_seconds, 1),
        })
        curves[method] = loss_curve(log, args.seq_length)
    table = write_outputs(rows, curves, Path(args.output_dir))
    print(table)
    print(f"written to {args.output_dir}/: results.md, results.csv, loss_vs_tokens.png, loss_vs_time.png")


if __name__ == "__main__":
    main()
