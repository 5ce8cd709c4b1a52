"""Show the pseudo-gradient penalty at work: one replica fed corrupted data, with and without the penalty.

On the embedded sample corpus (examples/prepare_sample_data.sh), three EDiT runs with 3 single-rank replicas:
  healthy        no fault
  no penalty     replica 0 trains on random tokens from --corrupt-from on
  penalty        the same, with anomaly elimination (8 warm-up syncs, alpha 0.1, threshold 3)
Validation loss is that of replica 2 (healthy; the last rank logs), which receives the others' pseudo-gradients
at every sync. Writes a table (stdout and table.md), loss_curves.png and each run's log to --output-dir.
Weighted averaging and clipping are left off here: on this corruption they hurt (see docs/edit.md).

    python tools/penalty_demo.py --output-dir runs/penalty_demo
"""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VALID = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+)")
TRAIN = re.compile(r" iteration +(\d+)/ *\d+ \|.*\| lm loss: ([0-9.E+-]+) \|")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="runs/penalty_demo")
    parser.add_argument("--train-iters", type=int, default=240)
    parser.add_argument("--corrupt-from", type=int, default=80)
    parser.add_argument("--sync-interval", type=int, default=4)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    subprocess.run(["bash", "examples/prepare_sample_data.sh"], cwd=REPO, check=True)

    common = [
        "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--ffn-hidden-size", "384",
        "--seq-length", "128", "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
        "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--micro-batch-size", "4", "--global-batch-size", "12", "--train-iters", str(args.train_iters),
        "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20",
        "--weight-decay", "0.1", "--adam-beta2", "0.95",
        "--data-path", "data/sample/corpus_text_document", "--split", "95,5,0", "--data-cache-path", "data/cache",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "data/sample/tokenizer.model",
        "--log-interval", "10", "--eval-interval", "20", "--eval-iters", "4",
        "--dp-mode", "edit", "--model-shard-group-size", "1", "--local-sgd-warmup-iters", "20",
        "--local-sgd-sync-interval", str(args.sync_interval), "--outer-lr", "0.7", "--outer-momentum", "0.8",
    ]
    fault = ["--inject-fault", f"0:{args.corrupt_from}:bad-data"]
    penalty = ["--edit-anomaly-elimination", "--edit-anomaly-warmup-syncs", "8", "--edit-anomaly-ewma-alpha", "0.1",
               "--edit-anomaly-threshold", "3"]
    runs = {"healthy": [], "no penalty": fault, "penalty": fault + penalty}
    curves, outliers = {}, {}
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    for name, extra in runs.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                                 "pretrain_gpt.py", *common, *extra], cwd=REPO, env=env, capture_output=True, text=True)
        Path(args.output_dir, f"{name.replace(' ', '_')}.log").write_text(result.stdout)
        if result.returncode != 0:
            sys.exit(f"error: the {name} run failed:\n{result.stderr[-3000:]}")
        curves[name] = {
            "valid": [(int(i), float(v)) for i, v in VALID.findall(result.stdout)],
            "train": [(int(i), float(v)) for i, v in TRAIN.findall(result.stdout)],
        }
        outliers[name] = sum(1 for line in result.stdout.splitlines()
                             if line.startswith(" edit sync") and "replica 0 in" in line)

    iterations = [i for i, _ in curves["healthy"]["valid"]]
    header = "| iteration | " + " | ".join(f"{n} (valid loss)" for n in runs) + " |"
    rows = [header, "|" + "---|" * (len(runs) + 1)]
    for k, iteration in enumerate(iterations):
        rows.append(f"| {iteration} | " + " | ".join(f"{curves[n]['valid'][k][1]:.4f}" for n in runs) + " |")
    rows.append("")
    rows.append(f"replica 0 corrupted from iteration {args.corrupt_from}; syncs that flagged it as an outlier: "
                + ", ".join(f"{n}: {outliers[n]}" for n in runs))
    table = "\n".join(rows)
    print(table)
    Path(args.output_dir, "table.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (train_axis, valid_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name in runs:
        train_axis.plot(*zip(*curves[name]["train"]), label=name)
        valid_axis.plot(*zip(*curves[name]["valid"]), marker="o", label=name)
    for axis, title in ((train_axis, "training loss (replica 2)"), (valid_axis, "validation loss (replica 2)")):
        axis.axvline(args.corrupt_from, color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel("iteration")
        axis.set_title(title)
        axis.legend()
    figure.suptitle(f"EDiT, 3 replicas, replica 0 fed random tokens from iteration {args.corrupt_from}")
    figure.tight_layout()
    figure.savefig(Path(args.output_dir, "loss_curves.png"), dpi=110)
    print(f"wrote {args.output_dir}/table.md and loss_curves.png", file=sys.stderr)


if __name__ == "__main__":
    main()
