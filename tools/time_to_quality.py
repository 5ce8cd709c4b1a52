"""What a user pays on a slow link: each method's whole run (warm-up included), and the wall-clock until its
validation loss first reaches DDP's final loss, on links set by rho.

    python tools/time_to_quality.py --data-path data/pydocs/corpus_text_document --replicas 2 --seeds 3 \\
        --variant "edit=--dp-mode edit" --variant "diloco=--dp-mode diloco" --budget-factors 1 1.25

Every run is a real training run on this machine (pretrain_gpt.py under torchrun, the model and schedule of
tools/compare_methods.py), evaluated every --eval-interval iterations. DDP runs --train-iters; each --variant (a label
and its pretrain_gpt.py flags, its shipped defaults for the rest) runs --train-iters times each --budget-factor, each a
schedule of its own, because a method that ends a little above DDP's loss reaches it only with more tokens.

The link is modeled, not shaped (tools/netsim.py shapes real links, at throughput only: a whole run at rho 3.5 takes
DDP ~60x its compute). An iteration costs c, the compute time of one iteration (the median ms/iteration of the DDP runs,
whose loopback all-reduce is a small part of it), the same for every method, plus the bytes this rank sent to other
replicas in it (read from the log lines: the warm-up's averaged gradients, syncs) over the link rate R. R comes from
rho as in tools/netsim.py: one fp32 all-reduce of a replica's gradients (what DDP sends every iteration) takes rho x H
x c. Every transfer counts as exposed (none overlaps compute): DDP's reduction after backward, the warm-up's, and
syncs, whose overlap with the next module's forward or with delayed local steps this leaves out (in EDiT's disfavour).

Reported per method and rho (means over --seeds): whole-run modeled wall-clock and its ratio to DDP's, bytes per rank
(warm-up included) and how many times fewer than DDP, the warm-up's share of them, final validation loss and its gap
to DDP, and the wall-clock at which the validation loss first reaches DDP's final loss (linear between evaluations; the
evaluations go through the validation set in order, the same batches at the same iterations for every method), as a
ratio to DDP's whole run, or "never". Writes time_to_quality.md/.csv; runs are kept in runs.jsonl and not repeated.
"""
import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.compare_methods import common_argv  # noqa: E402
from tools.experiment import add_data_args, add_training_args, run_job, seeds, write_table  # noqa: E402

_SYNC_BYTES = re.compile(r" iteration\s+(\d+)/.*? sync bytes/iter: ([0-9.e+-]+) \|")


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/time_to_quality")
    parser.add_argument("--replicas", type=int, default=2, help="M: replicas, one rank each")
    add_training_args(parser, num_layers=4, hidden_size=128, seq_length=128, micro_batch_size=8, train_iters=400,
                      sync_interval=16)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lr-warmup-iters", type=int, default=None, help="default: min(20, train iters / 10)")
    parser.add_argument("--eval-interval", type=int, default=25, help="also the log interval")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.35, 3.5])
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                        help="a method to set against DDP: a label, '=', its pretrain_gpt.py flags (repeatable)")
    parser.add_argument("--budget-factors", type=float, nargs="+", default=[1.0],
                        help="each variant also runs --train-iters times each factor")
    add_data_args(parser)
    args = parser.parse_args(argv)
    args.log_interval = args.eval_interval
    args.model_shard_group_size = 1
    args.outer_lr, args.outer_momentum, args.extra = None, None, []
    return args


def job_argv(args, flags: List[str], train_iters: int, seed: int) -> List[str]:
    """compare_methods' model and schedule, evaluated every --eval-interval, with a variant's flags last; the
    local-SGD flags common_argv sets are dropped, so a variant without them runs pretrain_gpt.py's defaults."""
    job = argparse.Namespace(**vars(args))
    job.train_iters = train_iters
    argv = common_argv(job)
    for flag in ("--local-sgd-sync-interval", "--local-sgd-warmup-iters"):
        index = argv.index(flag)
        del argv[index:index + 2]
    index = argv.index("--eval-interval")
    argv[index + 1] = str(args.eval_interval)
    return argv + ["--seed", str(seed), *flags]


def run_record(args, flags: List[str], train_iters: int, seed: int) -> dict:
    """One run's curve: validation loss and the cumulative bytes this rank sent to other replicas at every
    evaluation, and its ms per iteration."""
    log = run_job(args.replicas, job_argv(args, flags, train_iters, seed))
    method = flags[flags.index("--dp-mode") + 1] if "--dp-mode" in flags else "ddp"
    validation = {i: loss for i, loss in log.validation.items() if i > 0}
    if method == "ddp":  # the same gradient all-reduce every iteration
        per_iteration = log.bytes_per_group.get("dp", 0.0) / train_iters
        sent = {i: per_iteration * i for i in validation}
    else:
        sent, total, previous = {}, 0.0, 0
        for iteration, per_iteration in ((int(i), float(b)) for i, b in _SYNC_BYTES.findall(log.text)):
            total += per_iteration * (iteration - previous)
            previous = iteration
            sent[iteration] = total
        sent[train_iters] = log.bytes_per_group.get("sync", 0.0)  # the final sync comes after the last line
    warmup = re.search(r"warm-up \(iterations 1-\d+\): ([0-9.]+) MB", log.text)
    return {"validation": validation, "bytes": {i: sent[i] for i in validation}, "train_iters": train_iters,
            "ms_per_iteration": statistics.median(line["ms_per_iteration"] for line in log.iterations),
            "warmup_bytes": float(warmup.group(1)) * 1e6 if warmup else 0.0}


def modeled_seconds(record: dict, compute: float, rate: float) -> Dict[int, float]:
    """Wall-clock at every evaluation: c per iteration plus every byte sent over the link, exposed."""
    return {i: i * compute + sent / rate for i, sent in record["bytes"].items()}


def mean_curve(records: List[dict], compute: float, rate: float) -> List[tuple]:
    """(iteration, mean validation loss, mean modeled seconds) over seeds, by evaluation."""
    times = [modeled_seconds(r, compute, rate) for r in records]
    return [(i, statistics.fmean(r["validation"][i] for r in records), statistics.fmean(t[i] for t in times))
            for i in sorted(records[0]["validation"])]


def time_to_reach(curve: List[tuple], target: float) -> Optional[float]:
    """When the loss first reaches `target`, linear in time between the evaluations around it (None: never)."""
    previous = (0.0, float("inf"))
    for _, loss, seconds in curve:
        if loss <= target:
            before_seconds, before_loss = previous
            if before_loss == float("inf"):
                return seconds
            return before_seconds + (seconds - before_seconds) * (before_loss - target) / (before_loss - loss)
        previous = (seconds, loss)
    return None


def table_rows(args, runs: Dict[str, List[dict]]) -> List[dict]:
    ddp = runs["ddp"]
    compute = statistics.median(r["ms_per_iteration"] for r in ddp) / 1000
    ddp_bytes_per_iteration = statistics.fmean(r["bytes"][r["train_iters"]] / r["train_iters"] for r in ddp)
    target = statistics.fmean(r["validation"][r["train_iters"]] for r in ddp)
    rows = []
    for rho in args.rhos:
        rate = ddp_bytes_per_iteration / (rho * args.local_sgd_sync_interval * compute)  # bytes per second
        ddp_seconds = mean_curve(ddp, compute, rate)[-1][2]
        for label, records in runs.items():
            curve = mean_curve(records, compute, rate)
            reached = time_to_reach(curve, target)
            total_bytes = statistics.fmean(r["bytes"][r["train_iters"]] for r in records)
            warmup_bytes = statistics.fmean(r["warmup_bytes"] for r in records)
            rows.append({
                "rho": rho, "M": args.replicas, "method": label, "iterations": records[0]["train_iters"],
                "seeds": len(records), "wall-clock s": round(curve[-1][2], 1),
                "vs ddp wall-clock": round(curve[-1][2] / ddp_seconds, 3),
                "MB per rank": round(total_bytes / 1e6, 1),
                "x fewer bytes": round(ddp_bytes_per_iteration * args.train_iters / total_bytes, 1),
                "warm-up share of bytes": "" if label == "ddp" else f"{100 * warmup_bytes / total_bytes:.0f}%",
                "final validation loss": round(curve[-1][1], 4),
                "vs ddp loss": f"{100 * (curve[-1][1] / target - 1):+.2f}%",
                "time to ddp's loss, vs ddp": "never" if reached is None else round(reached / ddp_seconds, 3),
            })
    return rows


def main(argv=None):
    args = get_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    done_path = output_dir / "runs.jsonl"
    done = {}
    if done_path.exists():
        done = {r["key"]: r for r in map(json.loads, done_path.read_text().splitlines())}
    plans = [("ddp", [], args.train_iters)]
    for variant in args.variant:
        label, _, flags = variant.partition("=")
        for factor in args.budget_factors:
            iters = round(args.train_iters * factor)
            plans.append((label if factor == 1 else f"{label} x{factor:g} tokens", flags.split(), iters))
    runs = {}
    for label, flags, iters in plans:
        runs[label] = []
        for seed in seeds(args):
            key = json.dumps({"flags": flags, "iters": iters, "seed": seed, "argv": job_argv(args, [], iters, seed),
                              "replicas": args.replicas})
            if key not in done:
                print(f"running {label}, seed {seed} ...", flush=True)
                record = {"key": key, **run_record(args, flags, iters, seed)}
                with open(done_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                done[key] = json.loads(json.dumps(record))  # evaluation iterations as the file holds them
            record = done[key]
            runs[label].append({**record, "validation": {int(i): v for i, v in record["validation"].items()},
                                "bytes": {int(i): v for i, v in record["bytes"].items()}})
    print(write_table(table_rows(args, runs), output_dir, "time_to_quality"))
    print(f"written to {output_dir}/: time_to_quality.md, time_to_quality.csv, runs.jsonl")


if __name__ == "__main__":
    main()
