"""Sweep a local-SGD mode's knobs against DDP at the same tokens: outer LR, momentum, Nesterov, H, W, the inner LR and its
scale in local steps.

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
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_edit.dp import DP_MODES  # noqa: E402
from tools.compare_methods import common_argv, final_validation  # noqa: E402
from tools.experiment import (add_data_args, add_training_args, cross_replica_bytes, default_local_sgd_warmup,  # noqa
                              new_figure, run_job, save_figure, seeds, spread, write_table)

LOCAL_SGD_METHODS = ["edit", "diloco", "post-local-sgd"]
# (column, flag of pretrain_gpt.py, list flag of this tool)
KNOBS = [("lr", "--lr", "lrs"), ("H", "--local-sgd-sync-interval", "sync_intervals"),
         ("H0", "--local-sgd-initial-sync-interval", "initial_sync_intervals"),
         ("W", "--local-sgd-warmup-iters", "warmup_iters"), ("warm-up codec", None, "warmup_codecs"),
         ("sync codec", None, "sync_codecs"), ("outer lr", "--outer-lr", "outer_lrs"),
         ("outer momentum", "--outer-momentum", "outer_momentums"), ("nesterov", None, "nesterov"),
         ("S", "--local-sgd-lr-scale", "lr_scales")]
# What the sync exchange sends (--sync-dtype), "+ef" with error feedback; the warm-up's codecs always carry it.
SYNC_CODECS = {"fp32": ["--sync-dtype", "fp32"],
               **{dtype: ["--sync-dtype", dtype, "--no-sync-error-feedback"] for dtype in ("bf16", "int8", "int4")},
               **{f"{dtype}+ef": ["--sync-dtype", dtype, "--sync-error-feedback"]
                  for dtype in ("bf16", "int8", "int4", "int2", "topk")}}
WARMUP_CODECS = ["fp32", "bf16", "int8", "int4", "int2", "topk"]


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
    g.add_argument("--sync-intervals", type=int, nargs="+", default=None, help="H; default: pretrain_gpt.py's")
    g.add_argument("--initial-sync-intervals", type=int, nargs="+", default=[0],
                   help="H0 of a ramp H0, 2 H0, ... up to H (0: no ramp)")
    g.add_argument("--warmup-codecs", nargs="+", default=["int2"], choices=WARMUP_CODECS,
                   help="what the warm-up's gradient average sends (--local-sgd-warmup-grad-dtype); default: "
                        "pretrain_gpt.py's")
    g.add_argument("--sync-codecs", nargs="+", default=None, choices=list(SYNC_CODECS),
                   help="what a sync sends (--sync-dtype; +ef: --sync-error-feedback); default: pretrain_gpt.py's "
                        "for --method")
    g.add_argument("--warmup-iters", type=int, nargs="+", default=None,
                   help="W: synchronous iterations first; default: a quarter of --train-iters, as pretrain_gpt.py")
    g.add_argument("--outer-lrs", type=float, nargs="+", default=None, help="default: pretrain_gpt.py's for --method")
    g.add_argument("--outer-momentums", type=float, nargs="+", default=None)
    g.add_argument("--nesterov", choices=["on", "off"], nargs="+", default=None, help="outer Nesterov momentum")
    g.add_argument("--lr-scales", type=float, nargs="+", default=None,
                   help="S: local steps at S x the LR schedule (--local-sgd-lr-scale); default: pretrain_gpt.py's for "
                        "--method and --replicas")
    parser.add_argument("--all-runs", action="store_true",
                        help="table and plot every configuration of --output-dir's runs.jsonl run with this budget and "
                             "these seeds, not only this grid (nothing new runs)")
    parser.add_argument("extra", nargs="*", help="after --: more pretrain_gpt.py flags for every run")
    args = parser.parse_args(argv)
    args.warmup_iters = args.warmup_iters or [default_local_sgd_warmup(args.train_iters)]
    recipe = DP_MODES[args.method].defaults  # what pretrain_gpt.py runs --method with when no flag says otherwise
    args.sync_intervals = args.sync_intervals or [recipe.sync_interval]
    args.sync_codecs = args.sync_codecs or [recipe.sync_dtype + ("" if recipe.sync_dtype == "fp32" else "+ef")]
    args.outer_lrs = args.outer_lrs or [recipe.outer_lr]
    args.outer_momentums = args.outer_momentums or [recipe.outer_momentum]
    args.nesterov = args.nesterov or ["on" if recipe.outer_nesterov else "off"]
    args.lr_scales = args.lr_scales or [recipe.lr_scale(args.replicas)]
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
    if config.get("H0"):
        argv += ["--local-sgd-initial-sync-interval", str(config["H0"])]
    argv += ["--local-sgd-warmup-grad-dtype", config.get("warm-up codec", "fp32")]
    argv += SYNC_CODECS[config.get("sync codec", "fp32")]
    if "nesterov" in config:
        argv.append("--outer-nesterov" if config["nesterov"] == "on" else "--no-outer-nesterov")
    if "S" in config:
        argv += ["--local-sgd-lr-scale", str(config["S"])]
    return argv


def run_key(config: dict, seed: int, args) -> str:
    budget = {"iters": args.train_iters, "global batch": args.global_batch_size, "seq": args.seq_length,
              "layers": args.num_layers, "hidden": args.hidden_size, "data": args.data_path or "sample",
              "mock": args.mock_data, "split": args.split, "eval iters": args.eval_iters, "extra": args.extra,
              "lr warmup": args.lr_warmup_iters,
              "micro batch": args.micro_batch_size, "replicas": args.replicas, "shard": args.model_shard_group_size}
    return json.dumps({**config, "seed": seed, **budget}, sort_keys=True)


def load_done(path: Path) -> dict:
    """run key -> its record: validation loss, train loss and the bytes one rank sent to other replicas."""
    if not path.exists():
        return {}
    return {record["key"]: record for record in map(json.loads, path.read_text().splitlines())}


def recorded_seeds(config: dict, args, results: dict) -> list:
    """The seeds `config` ran with this invocation's budget (--all-runs: whatever it has; else: --seeds')."""
    if not args.all_runs:
        return seeds(args)
    found = {json.loads(key)["seed"] for key in results
             if all(json.loads(key).get(k) == v for k, v in config.items())}
    return sorted(seed for seed in found if run_key(config, seed, args) in results)


def recorded_configurations(args, results: dict) -> list:
    """Every configuration in `results` run with this invocation's budget (with at least one seed)."""
    configs = []
    for key in results:
        config = {k: v for k, v in json.loads(key).items() if k in {"method"} | {c for c, _, _ in KNOBS}}
        if config not in configs and recorded_seeds(config, args, results):
            configs.append(config)
    return configs


def table_rows(args, results: dict, configs: list) -> list:
    """One row per configuration with its seeds' spread, best first, each against DDP at the same seeds: the loss
    gap (to the best DDP lr, and to DDP at the same lr), its spread over seeds, and how many times fewer bytes than
    the best DDP it sent to other replicas over the whole run (warm-up included). DDP runs of earlier invocations with
    the same budget count."""
    ddp_lrs = {c["lr"] for c in configs if c["method"] == "ddp"}
    ddp_lrs |= {json.loads(key)["lr"] for key in results if json.loads(key)["method"] == "ddp"}
    ddp = {lr: {seed: results[run_key({"method": "ddp", "lr": lr}, seed, args)]
                for seed in recorded_seeds({"method": "ddp", "lr": lr}, args, results)
                if run_key({"method": "ddp", "lr": lr}, seed, args) in results} for lr in ddp_lrs}
    ddp = {lr: runs for lr, runs in ddp.items() if runs}
    best_lr = min(ddp, key=lambda lr: statistics.fmean(r["validation loss"] for r in ddp[lr].values()), default=None)

    def gaps(losses: dict, lr) -> list:
        """Per seed: the loss against DDP's at that seed (none unless DDP ran every seed)."""
        if lr not in ddp or not set(losses) <= set(ddp[lr]):
            return []
        return [100 * (losses[seed] / ddp[lr][seed]["validation loss"] - 1) for seed in losses]

    def gap_text(losses: dict, lr) -> str:
        if not gaps(losses, lr):
            return ""
        reference = statistics.fmean(ddp[lr][seed]["validation loss"] for seed in losses)
        return f"{100 * (statistics.fmean(losses.values()) / reference - 1):+.2f}%"

    rows = []
    for config in configs:
        records = {seed: results[run_key(config, seed, args)] for seed in recorded_seeds(config, args, results)}
        losses = {seed: r["validation loss"] for seed, r in records.items()}
        s = spread(list(losses.values()))
        sent = [r.get("bytes") for r in records.values()]
        mean_bytes = statistics.fmean(sent) if None not in sent else None
        ddp_bytes = [ddp[best_lr][seed].get("bytes") for seed in losses if seed in ddp.get(best_lr, {})]
        fewer = round(statistics.fmean(ddp_bytes) / mean_bytes, 1) if mean_bytes and ddp_bytes and None not in \
            ddp_bytes else ""
        per_seed = gaps(losses, best_lr)
        rows.append({"method": config["method"], **{column: config.get(column, "") for column, _, _ in KNOBS},
                     "seeds": len(losses), "validation loss": round(s["mean"], 4), "std": round(s["std"], 4),
                     "min": round(s["min"], 4), "max": round(s["max"], 4),
                     "vs best ddp": gap_text(losses, best_lr), "vs ddp same lr": gap_text(losses, config["lr"]),
                     "gap std": round(statistics.stdev(per_seed), 2) if len(per_seed) > 1 else "",
                     "MB per rank": "" if mean_bytes is None else round(mean_bytes / 1e6, 2),
                     "x fewer bytes than ddp": fewer})
    return sorted(rows, key=lambda row: row["validation loss"])


def plot_front(rows: list, path: Path) -> None:
    """Loss gap to the best DDP against how many times fewer bytes were sent, one point per configuration (error
    bars: the std over seeds of its per-seed gap), the Pareto front (no other point both closer to DDP and cheaper)
    joined by a line."""
    points = [(row["x fewer bytes than ddp"], float(row["vs best ddp"].rstrip("%")), row["gap std"] or 0.0, row)
              for row in rows if row["method"] != "ddp" and row["x fewer bytes than ddp"] != "" and row["vs best ddp"]]
    if not points:
        return
    figure, axes = new_figure()
    axis = axes[0, 0]
    axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], fmt="o", capsize=3,
                  label="a configuration (mean gap, std over seeds)")
    front = [p for p in points if not any(q[0] >= p[0] and q[1] < p[1] or q[0] > p[0] and q[1] <= p[1]
                                          for q in points)]
    front.sort(key=lambda p: p[0])
    axis.plot([p[0] for p in front], [p[1] for p in front], "-", color="tab:red", label="Pareto front")
    varying = [column for column, _, _ in KNOBS if len({str(p[3][column]) for p in points}) > 1]
    middle = (min(p[0] for p in points) * max(p[0] for p in points)) ** 0.5
    for ratio, gap_pct, _, row in front:  # labels point inwards, so that they stay inside the axes
        label = ", ".join(f"{column} {row[column]}" for column in varying)
        right = ratio > middle
        axis.annotate(label, (ratio, gap_pct), fontsize=6, xytext=(-4 if right else 4, 4), textcoords="offset points",
                      ha="right" if right else "left")
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("x fewer bytes than DDP to other replicas, whole run")
    axis.set_ylabel("validation loss vs best DDP (%)")
    save_figure(figure, path)


def main(argv=None):
    args = get_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    done_path = output_dir / "runs.jsonl"
    results = load_done(done_path)
    configs = recorded_configurations(args, results) if args.all_runs else list(configurations(args))
    for config in [] if args.all_runs else configs:
        nproc = args.replicas * args.model_shard_group_size  # DDP too: the same ranks and micro-batches
        for seed in seeds(args):
            key = run_key(config, seed, args)
            if key in results:
                continue
            print(f"running {config}, seed {seed} ...", flush=True)
            log = run_job(nproc, job_argv(args, config, seed))
            results[key] = {"key": key, "validation loss": final_validation(log),
                            "train loss": log.iterations[-1]["lm_loss"],
                            "bytes": cross_replica_bytes(config["method"], log)}
            with open(done_path, "a") as f:
                f.write(json.dumps(results[key]) + "\n")
            print(f"  validation loss {results[key]['validation loss']:.4f}", flush=True)
    rows = table_rows(args, results, configs)
    print(write_table(rows, output_dir, args.table_name))
    plot_front(rows, output_dir / f"{args.table_name}_front.png")
    print(f"written to {output_dir}/: {args.table_name}.md, {args.table_name}.csv, {args.table_name}_front.png, "
          "runs.jsonl")


if __name__ == "__main__":
    main()
