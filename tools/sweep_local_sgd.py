"""Sweep a local-SGD mode's knobs against DDP at the same tokens: outer LR, momentum, Nesterov, H, W and the inner LR.

    python tools/sweep_local_sgd.py --data-path data/pydocs/corpus_text_document --train-iters 1000 --seeds 3 \\
        --ddp-lrs 2e-3 3e-3 --lrs 2e-3 3e-3 --outer-lrs 0.7 1.0 --outer-momentums 0.8 0.9 --sync-intervals 16

Every combination of the lists (a grid) trains --method with --replicas replicas (of --model-shard-group-size ranks
each) on the same global batch, tokens and seeds as DDP, which is tuned over --ddp-lrs. Writes sweep.md and sweep.csv:
one row per configuration, best first, with the final validation loss's mean, std, min and max over seeds and its gap
to the best DDP (and to DDP at the same inner LR when that was run; DDP runs of earlier invocations with the same
budget and seeds count too). Every run's result is appended to runs.jsonl in
--output-dir, and a run already there is not repeated: rerun with more values or seeds to extend a sweep.
The model, schedule and data flags are tools/compare_methods.py's.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.compare_methods import common_argv, final_validation  # noqa: E402
from tools.experiment import (add_data_args, add_training_args, default_local_sgd_warmup, run_job, seeds,  # noqa: E402
                              spread, write_table)

LOCAL_SGD_METHODS = ["edit", "diloco", "post-local-sgd"]
# (column, flag of pretrain_gpt.py, list flag of this tool)
KNOBS = [("lr", "--lr", "lrs"), ("H", "--local-sgd-sync-interval", "sync_intervals"),
         ("W", "--local-sgd-warmup-iters", "warmup_iters"), ("outer lr", "--outer-lr", "outer_lrs"),
         ("outer momentum", "--outer-momentum", "outer_momentums"), ("nesterov", None, "nesterov")]


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/sweep")
    parser.add_argument("--table-name", default="sweep", help="the table's file names (NAME.md, NAME.csv)")
    parser.add_argument("--method", default="edit", choices=LOCAL_SGD_METHODS)
    parser.add_argument("--replicas", type=int, default=2, help="M: replicas (sync group size)")
    parser.add_argument("--model-shard-group-size", type=int, default=1, help="ranks holding one replica")
    add_training_args(parser, num_layers=4, hidden_size=128, seq_length=128, micro_batch_size=8, train_iters=1000,
                      sync_interval=16)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--lr-warmup-iters", type=int, default=None, help="default: min(20, train iters / 10)")
    parser.add_argument("--log-interval", type=int, default=100)
    add_data_args(parser)
    g = parser.add_argument_group("the grid (every combination runs)")
    g.add_argument("--ddp-lrs", type=float, nargs="*", default=[2e-3], help="DDP's inner LRs (none: no DDP runs)")
    g.add_argument("--lrs", type=float, nargs="+", default=[2e-3], help="inner (Adam) peak LR of the local steps")
    g.add_argument("--sync-intervals", type=int, nargs="+", default=[16], help="H")
    g.add_argument("--warmup-iters", type=int, nargs="+", default=None,
                   help="W: synchronous iterations first; default: a quarter of --train-iters, as pretrain_gpt.py")
    g.add_argument("--outer-lrs", type=float, nargs="+", default=[0.7])
    g.add_argument("--outer-momentums", type=float, nargs="+", default=[0.8])
    g.add_argument("--nesterov", choices=["on", "off"], nargs="+", default=["on"], help="outer Nesterov momentum")
    parser.add_argument("extra", nargs="*", help="after --: more pretrain_gpt.py flags for every run")
    args = parser.parse_args(argv)
    args.warmup_iters = args.warmup_iters or [default_local_sgd_warmup(args.train_iters)]
    args.local_sgd_sync_interval = args.local_sgd_warmup_iters = None  # set per configuration
    args.outer_lr = args.outer_momentum = None
    return args


def configurations(args):
    """The DDP runs, then the grid, as dicts {column: value} with 'method'."""
    for lr in args.ddp_lrs:
        yield {"method": "ddp", "lr": lr}
    for values in itertools.product(*(getattr(args, attribute) for _, _, attribute in KNOBS)):
        yield {"method": args.method, **{column: value for (column, _, _), value in zip(KNOBS, values)}}


def job_argv(args, config: dict, seed: int) -> list:
    job = argparse.Namespace(**vars(args))
    job.lr = config["lr"]
    job.local_sgd_sync_interval = config.get("H", 1)
    job.local_sgd_warmup_iters = config.get("W", 0)
    job.outer_lr, job.outer_momentum = config.get("outer lr", 0.7), config.get("outer momentum", 0.8)
    argv = common_argv(job) + ["--dp-mode", config["method"], "--seed", str(seed)]
    return argv + (["--no-outer-nesterov"] if config.get("nesterov") == "off" else [])


def run_key(config: dict, seed: int, args) -> str:
    budget = {"iters": args.train_iters, "global batch": args.global_batch_size, "seq": args.seq_length,
              "layers": args.num_layers, "hidden": args.hidden_size, "data": args.data_path or "sample",
              "mock": args.mock_data, "split": args.split, "eval iters": args.eval_iters, "extra": args.extra,
              "lr warmup": args.lr_warmup_iters,
              "micro batch": args.micro_batch_size, "replicas": args.replicas, "shard": args.model_shard_group_size}
    return json.dumps({**config, "seed": seed, **budget}, sort_keys=True)


def load_done(path: Path) -> dict:
    if not path.exists():
        return {}
    return {record["key"]: record["validation loss"] for record in map(json.loads, path.read_text().splitlines())}


def table_rows(args, results: dict) -> list:
    """One row per configuration with its seeds' spread, best first, each against DDP."""
    summaries = []
    for config in configurations(args):
        losses = [results[run_key(config, seed, args)] for seed in seeds(args)]
        summaries.append((config, spread(losses)))
    ddp = {config["lr"]: s["mean"] for config, s in summaries if config["method"] == "ddp"}
    for lr in {json.loads(key)["lr"] for key in results if json.loads(key)["method"] == "ddp"} - set(ddp):
        keys = [run_key({"method": "ddp", "lr": lr}, seed, args) for seed in seeds(args)]
        if all(key in results for key in keys):  # DDP of an earlier invocation, same budget and seeds
            ddp[lr] = spread([results[key] for key in keys])["mean"]
    best_ddp = min(ddp.values()) if ddp else None
    rows = []
    for config, s in sorted(summaries, key=lambda item: item[1]["mean"]):
        gap = lambda reference: "" if reference is None else f"{100 * (s['mean'] / reference - 1):+.2f}%"  # noqa
        rows.append({"method": config["method"], **{column: config.get(column, "") for column, _, _ in KNOBS},
                     "seeds": len(seeds(args)), "validation loss": round(s["mean"], 4), "std": round(s["std"], 4),
                     "min": round(s["min"], 4), "max": round(s["max"], 4),
                     "vs best ddp": gap(best_ddp), "vs ddp same lr": gap(ddp.get(config["lr"]))})
    return rows


def main(argv=None):
    args = get_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    done_path = output_dir / "runs.jsonl"
    results = load_done(done_path)
    for config in configurations(args):
        nproc = args.replicas * args.model_shard_group_size  # DDP too: the same ranks and micro-batches
        for seed in seeds(args):
            key = run_key(config, seed, args)
            if key in results:
                continue
            print(f"running {config}, seed {seed} ...", flush=True)
            log = run_job(nproc, job_argv(args, config, seed))
            results[key] = final_validation(log)
            with open(done_path, "a") as f:
                f.write(json.dumps({"key": key, "validation loss": results[key],
                                    "train loss": log.iterations[-1]["lm_loss"]}) + "\n")
            print(f"  validation loss {results[key]:.4f}", flush=True)
    table = write_table(table_rows(args, results), output_dir, args.table_name)
    print(table)
    print(f"written to {output_dir}/: {args.table_name}.md, {args.table_name}.csv, runs.jsonl")


if __name__ == "__main__":
    main()
