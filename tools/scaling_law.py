"""Local-SGD scaling laws: final loss against model size and compute, DDP vs EDiT.

    python tools/scaling_law.py --output-dir runs/scaling                 # 5 sizes x (ddp, edit), ~10 min on 2 cores
    python tools/scaling_law.py --data-path data/pydocs/corpus_text_document --seeds 2   # the benchmark corpus

Every size trains on the same tokens (same global batch, sequence and iterations, so L(N) here is at a fixed
data budget, far from convergence), with the same seeds (--seeds, averaged). EDiT runs 2 replicas of one rank each. N is the number
of non-embedding parameters (from the run's log); C is the run's model FLOPs (megatron_edit/flops.py). For each
method the tool fits L = A * X^(-alpha) + E by least squares (alpha on a grid, A and E linear for each alpha,
then Gauss-Newton) and reports one-sigma uncertainties from the fit's covariance, s^2 (J^T J)^-1: with five
points and three constants they are wide, and the table says so rather than hiding it.
"""
import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.experiment import (LLAMA_STYLE, add_data_args, data_argv, new_figure, resolve_local_sgd_warmup,  # noqa: E402
                              run_job, save_figure, seeds, spread, write_table)

# (layers, hidden, heads): tiny to what trains in about a minute on 2 CPU cores.
SIZES = [(1, 32, 2), (2, 48, 3), (2, 64, 4), (3, 96, 4), (4, 128, 4)]
_NON_EMBEDDING = re.compile(r"number of parameters on \(tensor, pipeline\) model parallel rank \(0, 0\): \d+ "
                            r"\(non-embedding: (\d+)\)")


def power_law(x: np.ndarray, a: float, alpha: float, e: float) -> np.ndarray:
    return a * x ** (-alpha) + e


def fit_power_law(x, loss) -> Tuple[np.ndarray, np.ndarray]:
    """(A, alpha, E) minimizing squared error of A x^-alpha + E with A > 0, alpha > 0, E >= 0 (an irreducible loss
    is not negative), and their one-sigma errors (nan when no degrees of freedom are left, and for E when it sits
    on its bound). All nan when no decreasing power law fits (loss not falling with x)."""
    x, loss = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    scale = np.exp(np.mean(np.log(x)))  # fit in x / geometric mean: A stays O(loss) and the problem well scaled
    u = x / scale

    def sse(theta):
        return float(np.sum((power_law(u, *theta) - loss) ** 2))

    def linear_fit(alpha):
        design = np.stack([u ** (-alpha), np.ones_like(u)], axis=1)
        (a, e), *_ = np.linalg.lstsq(design, loss, rcond=None)
        if e < 0:  # on the bound: a pure power law
            a, e = float(design[:, 0] @ loss / (design[:, 0] @ design[:, 0])), 0.0
        return np.array([a, alpha, e])

    feasible = [theta for theta in map(linear_fit, np.linspace(0.005, 3.0, 600)) if theta[0] > 0]
    if not feasible:
        return np.full(3, np.nan), np.full(3, np.nan)
    theta = min(feasible, key=sse)

    def jacobian(theta):
        a, alpha, _ = theta
        return np.stack([u ** (-alpha), -a * np.log(u) * u ** (-alpha), np.ones_like(u)], axis=1)

    for _ in range(100):  # damped Gauss-Newton from the best grid point, staying inside the bounds
        step, *_ = np.linalg.lstsq(jacobian(theta), loss - power_law(u, *theta), rcond=None)
        while np.max(np.abs(step)) > 1e-14:
            candidate = theta + step
            candidate[2] = max(candidate[2], 0.0)
            if candidate[0] > 0 and candidate[1] > 0 and sse(candidate) <= sse(theta):
                break
            step = step / 2
        else:
            break
        theta = candidate
    # One-sigma errors of the free constants; E on its bound (0) is not free, and gets nan.
    free = [0, 1] if theta[2] == 0.0 else [0, 1, 2]
    errors = np.full(3, np.nan)
    if len(x) > len(free):
        j = jacobian(theta)[:, free]
        covariance = sse(theta) / (len(x) - len(free)) * np.linalg.pinv(j.T @ j)
        errors[free] = np.sqrt(np.abs(np.diag(covariance)))
    a, alpha, e = theta
    # back to x's own units: A u^-alpha = A scale^alpha x^-alpha
    return np.array([a * scale ** alpha, alpha, e]), np.array([errors[0] * scale ** alpha, errors[1], errors[2]])


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/scaling")
    parser.add_argument("--methods", nargs="+", default=["ddp", "edit"], choices=["ddp", "edit"])
    parser.add_argument("--sizes", type=int, default=len(SIZES), help=f"the first K of {SIZES}")
    parser.add_argument("--train-iters", type=int, default=150)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--local-sgd-sync-interval", type=int, default=8)
    parser.add_argument("--local-sgd-warmup-iters", type=int, default=None,
                        help="default: a quarter of --train-iters, as pretrain_gpt.py")
    add_data_args(parser)
    args = parser.parse_args(argv)
    resolve_local_sgd_warmup(args)
    return args


def train(args, method: str, layers: int, hidden: int, heads: int) -> Dict[str, float]:
    """One size and method, averaged over --seeds (the validation loss's std is kept beside its mean)."""
    runs = [train_once(args, method, layers, hidden, heads, seed) for seed in seeds(args)]
    valid = spread([r["validation loss"] for r in runs])
    return {**runs[0], "compute FLOPs": sum(r["compute FLOPs"] for r in runs) / len(runs),
            "validation loss": valid["mean"], "validation std": valid["std"]}


def train_once(args, method: str, layers: int, hidden: int, heads: int, seed: int) -> Dict[str, float]:
    nproc = 1 if method == "ddp" else 2
    argv = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
            "--seq-length", str(args.seq_length), *LLAMA_STYLE, "--micro-batch-size", str(args.global_batch_size // 2),
            "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.train_iters),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", str(min(15, args.train_iters // 10)),
            "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95", "--seed", str(seed),
            "--log-interval", str(args.train_iters), "--eval-interval", str(args.train_iters),
            "--eval-iters", str(args.eval_iters), *data_argv(args), "--dp-mode", method, "--model-shard-group-size", "1",
            "--local-sgd-sync-interval", str(args.local_sgd_sync_interval),
            "--local-sgd-warmup-iters", str(args.local_sgd_warmup_iters)]
    log = run_job(nproc, argv)
    return {"method": method, "layers": layers, "hidden": hidden,
            "non-embedding params": int(_NON_EMBEDDING.search(log.text).group(1)),
            "compute FLOPs": log.tflops_per_device * 1e12 * nproc * log.train_seconds,
            "validation loss": log.validation[max(log.validation)]}


def fits_table(rows: List[dict], methods: List[str]) -> Tuple[str, dict]:
    lines = ["| method | law | A | alpha | E |", "|---|---|---|---|---|"]
    fits = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        loss = [r["validation loss"] for r in mine]
        for law, column in (("L(N)", "non-embedding params"), ("L(C)", "compute FLOPs")):
            values, errors = fit_power_law([r[column] for r in mine], loss)
            fits[(method, law)] = values
            e = f"{values[2]:.3f} ± {errors[2]:.3f}" if values[2] > 0 else "0 (on its bound)"
            lines.append(f"| {method} | {law} | {values[0]:.4g} ± {errors[0]:.2g} | {values[1]:.3f} ± {errors[1]:.3f} "
                         f"| {e} |")
    return "\n".join(lines), fits


def plot(rows, fits, methods, output_dir: Path) -> None:
    figure, axes = new_figure(2)
    for axis, (law, column) in zip(axes[0], (("L(N)", "non-embedding params"), ("L(C)", "compute FLOPs"))):
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            x = np.array([r[column] for r in mine], dtype=np.float64)
            points = axis.scatter(x, [r["validation loss"] for r in mine], label=method)
            grid = np.geomspace(x.min(), x.max(), 100)
            axis.plot(grid, power_law(grid, *fits[(method, law)]), color=points.get_facecolor()[0])
        axis.set_xscale("log")
        axis.set_xlabel(column)
        axis.set_ylabel("validation loss")
        axis.set_title(f"{law} = A x^-alpha + E")
    save_figure(figure, output_dir / "scaling_laws.png")


def main(argv=None):
    args = get_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers, hidden, heads in SIZES[:args.sizes]:
        for method in args.methods:
            print(f"training {method} with {layers} layers, hidden {hidden} ...", flush=True)
            rows.append(train(args, method, layers, hidden, heads))
    write_table(rows, output_dir, "runs")
    table, fits = fits_table(rows, args.methods)
    (output_dir / "fits.md").write_text(table + "\n")
    plot(rows, fits, args.methods, output_dir)
    for row in rows:
        print(f"{row['method']:5s} N={row['non-embedding params']:>9d} C={row['compute FLOPs']:.3e} "
              f"loss={row['validation loss']:.4f}")
    print(table)
    print(f"written to {output_dir}/: runs.csv, fits.md, scaling_laws.png")


if __name__ == "__main__":
    main()
