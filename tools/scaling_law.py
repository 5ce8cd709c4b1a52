"""Local-SGD scaling laws: final loss against model size, tokens and compute, DDP vs EDiT.

    python tools/scaling_law.py --output-dir runs/scaling                 # 5 sizes x (ddp, edit), ~10 min on 2 cores
    python tools/scaling_law.py --data-path data/pydocs/corpus_text_document --sizes 4 --budgets 100 200 400

Every size trains on the same tokens (same global batch, sequence and iterations, so L(N) here is at a fixed
data budget, far from convergence), with the same seeds (--seeds, averaged). EDiT runs 2 replicas of one rank each. N is the number
of non-embedding parameters (from the run's log); C is the run's model FLOPs (megatron_edit/flops.py). For each
method the tool fits L = A * X^(-alpha) + E by least squares (alpha on a grid, A and E linear for each alpha,
then Gauss-Newton) and reports one-sigma uncertainties from the fit's covariance, s^2 (J^T J)^-1: with five
points and three constants they are wide, and the table says so rather than hiding it.

With several token budgets (`--budgets`, iterations at the same global batch and sequence), every size trains at
every budget, and the tool also fits L(N, D) = E + A N^-a + B D^-b per method (D: training tokens), then EDiT's
compute-equivalence factor: for each EDiT run, the tokens D' at which DDP's fitted law, at the same N, reaches
EDiT's loss, over the tokens EDiT used (compute is 6 N D for both, so this is DDP's compute for EDiT's loss over
EDiT's). Below 1, EDiT needs more compute than DDP for the same loss. Its uncertainty comes from sampling DDP's
fitted constants from their covariance.
"""
import argparse
import csv
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.experiment import (LLAMA_STYLE, add_data_args, data_argv, default_local_sgd_warmup, new_figure,  # noqa: E402
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


def loss_nd(n: np.ndarray, d: np.ndarray, e: float, a: float, alpha: float, b: float, beta: float) -> np.ndarray:
    return e + a * n ** (-alpha) + b * d ** (-beta)


def fit_loss_nd(n, d, loss) -> Tuple[np.ndarray, np.ndarray]:
    """(E, A, alpha, B, beta) of L(N, D) by least squares, and their covariance (nan without degrees of freedom).
    Variable projection: for each (alpha, beta) on a grid, E, A and B are linear; the best grid point (A, B > 0,
    E >= 0) then starts a damped Gauss-Newton over all five. Fitted in N and D over their geometric means."""
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    n_scale, d_scale = np.exp(np.mean(np.log(n))), np.exp(np.mean(np.log(d)))
    u, v = n / n_scale, d / d_scale

    def sse(theta):
        return float(np.sum((loss_nd(u, v, *theta) - loss) ** 2))

    def linear_fit(alpha, beta):
        design = np.stack([np.ones_like(u), u ** (-alpha), v ** (-beta)], axis=1)
        (e, a, b), *_ = np.linalg.lstsq(design, loss, rcond=None)
        return np.array([e, a, alpha, b, beta])

    grid = np.linspace(0.02, 2.0, 100)
    feasible = [theta for theta in (linear_fit(alpha, beta) for alpha in grid for beta in grid)
                if theta[0] >= 0 and theta[1] > 0 and theta[3] > 0]
    if not feasible:
        return np.full(5, np.nan), np.full((5, 5), np.nan)
    theta = min(feasible, key=sse)

    def jacobian(theta):
        _, a, alpha, b, beta = theta
        return np.stack([np.ones_like(u), u ** (-alpha), -a * np.log(u) * u ** (-alpha),
                         v ** (-beta), -b * np.log(v) * v ** (-beta)], axis=1)

    for _ in range(200):
        step, *_ = np.linalg.lstsq(jacobian(theta), loss - loss_nd(u, v, *theta), rcond=None)
        while np.max(np.abs(step)) > 1e-14:
            candidate = theta + step
            if candidate[0] >= 0 and min(candidate[1:]) > 0 and sse(candidate) <= sse(theta):
                break
            step = step / 2
        else:
            break
        theta = candidate
    covariance = np.full((5, 5), np.nan)
    if len(loss) > 5:
        j = jacobian(theta)
        covariance = sse(theta) / (len(loss) - 5) * np.linalg.pinv(j.T @ j)
    # back to N's and D's own units: A u^-alpha = A' N^-alpha with A' = A n_scale^alpha (likewise B); the covariance
    # follows through that map's Jacobian
    e, a, alpha, b, beta = theta
    units = np.array([e, a * n_scale ** alpha, alpha, b * d_scale ** beta, beta])
    to_units = np.eye(5)
    to_units[1, 1], to_units[1, 2] = n_scale ** alpha, units[1] * math.log(n_scale)
    to_units[3, 3], to_units[3, 4] = d_scale ** beta, units[3] * math.log(d_scale)
    return units, to_units @ covariance @ to_units.T


def equivalent_tokens(n: float, loss: float, theta: np.ndarray) -> float:
    """The tokens at which L(N, D) with constants theta reaches `loss` at size n (inf: never, below its floor)."""
    e, a, alpha, b, beta = theta
    gap = loss - e - a * n ** (-alpha)
    return float((b / gap) ** (1 / beta)) if gap > 0 else math.inf


def compute_equivalence(ddp_theta: np.ndarray, ddp_covariance: np.ndarray, edit_rows: List[dict],
                        samples: int = 2000) -> List[dict]:
    """Per EDiT run, DDP's tokens for EDiT's loss over EDiT's tokens: the fit's value, and the median and 16th-84th
    percentiles over DDP constants drawn from the fit's covariance."""
    rng = np.random.default_rng(0)
    draws = ddp_theta[None]
    if np.all(np.isfinite(ddp_covariance)):  # symmetric, and rounding's negative eigenvalues set to zero
        eigenvalues, vectors = np.linalg.eigh((ddp_covariance + ddp_covariance.T) / 2)
        covariance = vectors @ np.diag(np.clip(eigenvalues, 0, None)) @ vectors.T
        draws = rng.multivariate_normal(ddp_theta, covariance, size=samples)
        draws = draws[(draws[:, 0] >= 0) & (draws[:, 1:] > 0).all(axis=1)]
    out = []
    for row in edit_rows:
        n, d, loss = row["non-embedding params"], row["tokens"], row["validation loss"]
        factors = np.array([equivalent_tokens(n, loss, theta) / d for theta in draws])
        low, median, high = np.percentile(factors, [16, 50, 84]) if len(factors) else (math.nan,) * 3
        out.append({"N": n, "D": d, "edit loss": loss, "factor": equivalent_tokens(n, loss, ddp_theta) / d,
                    "median": median, "p16": low, "p84": high})
    return out


def interpolated_tokens(n: int, loss: float, ddp_rows: List[dict]) -> float:
    """Without a law: DDP's tokens for `loss` at size n, log-linear in D between the two DDP budgets of that size
    whose losses bracket it (nan outside the measured budgets)."""
    runs = sorted((r["tokens"], r["validation loss"]) for r in ddp_rows if r["non-embedding params"] == n)
    for (d1, l1), (d2, l2) in zip(runs, runs[1:]):
        if l1 >= loss >= l2 and l1 > l2:
            return d1 * (d2 / d1) ** ((l1 - loss) / (l1 - l2))
    return math.nan


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/scaling")
    parser.add_argument("--methods", nargs="+", default=["ddp", "edit"], choices=["ddp", "edit"])
    parser.add_argument("--sizes", type=int, default=len(SIZES), help=f"the first K of {SIZES}")
    parser.add_argument("--train-iters", type=int, default=150)
    parser.add_argument("--fit-only", action="store_true",
                        help="fit the runs.csv an earlier invocation wrote to --output-dir instead of training")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="train every size for each of these iteration counts and fit L(N, D) (default: "
                             "--train-iters only)")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--local-sgd-sync-interval", type=int, default=8)
    parser.add_argument("--local-sgd-warmup-iters", type=int, default=None,
                        help="default: a quarter of each run's iterations, as pretrain_gpt.py")
    add_data_args(parser)
    args = parser.parse_args(argv)
    args.budgets = sorted(args.budgets or [args.train_iters])
    return args


def train(args, method: str, layers: int, hidden: int, heads: int, iters: int) -> Dict[str, float]:
    """One size, budget and method, averaged over --seeds (the validation loss's std is kept beside its mean)."""
    runs = [train_once(args, method, layers, hidden, heads, seed, iters) for seed in seeds(args)]
    valid = spread([r["validation loss"] for r in runs])
    return {**runs[0], "compute FLOPs": sum(r["compute FLOPs"] for r in runs) / len(runs),
            "validation loss": valid["mean"], "validation std": valid["std"]}


def train_once(args, method: str, layers: int, hidden: int, heads: int, seed: int, iters: int) -> Dict[str, float]:
    nproc = 1 if method == "ddp" else 2
    warmup = default_local_sgd_warmup(iters) if args.local_sgd_warmup_iters is None else args.local_sgd_warmup_iters
    argv = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
            "--seq-length", str(args.seq_length), *LLAMA_STYLE, "--micro-batch-size", str(args.global_batch_size // 2),
            "--global-batch-size", str(args.global_batch_size), "--train-iters", str(iters),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", str(min(15, iters // 10)),
            "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95", "--seed", str(seed),
            "--log-interval", str(iters), "--eval-interval", str(iters),
            "--eval-iters", str(args.eval_iters), *data_argv(args), "--dp-mode", method, "--model-shard-group-size", "1",
            "--local-sgd-sync-interval", str(args.local_sgd_sync_interval),
            "--local-sgd-warmup-iters", str(warmup)]
    log = run_job(nproc, argv)
    return {"method": method, "layers": layers, "hidden": hidden, "iters": iters,
            "tokens": iters * args.global_batch_size * args.seq_length,
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


def read_runs(path: Path) -> List[dict]:
    """runs.csv as main wrote it, numbers as numbers."""
    with open(path) as f:
        return [{k: v if k == "method" else (int(v) if v.isdigit() else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def nd_tables(rows: List[dict], methods: List[str]) -> str:
    """L(N, D) per method and, with both ddp and edit, EDiT's compute-equivalence factor per run and overall."""
    lines = ["| method | E | A | alpha | B | beta |", "|---|---|---|---|---|---|"]
    fits = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        theta, covariance = fit_loss_nd([r["non-embedding params"] for r in mine], [r["tokens"] for r in mine],
                                        [r["validation loss"] for r in mine])
        fits[method] = theta, covariance
        errors = np.sqrt(np.abs(np.diag(covariance)))
        lines.append("| " + " | ".join([method] + [f"{v:.4g} ± {s:.2g}" for v, s in zip(theta, errors)]) + " |")
    if not {"ddp", "edit"} <= set(fits):
        return "\n".join(lines)
    lines += ["", "EDiT's compute-equivalence factor, DDP's compute for EDiT's loss over EDiT's (below 1: EDiT needs more), "
              "from the L(N, D) fit (with the 16th-84th percentile over DDP's fitted constants) and, without a law, "
              "from DDP's runs of the same size interpolated log-linearly in tokens:", "",
              "| N | tokens | edit loss | factor (fit) | 16th-84th percentile | factor (interpolated) |",
              "|---|---|---|---|---|---|"]
    ddp_rows = [r for r in rows if r["method"] == "ddp"]
    rows_out = compute_equivalence(*fits["ddp"], [r for r in rows if r["method"] == "edit"])
    for r in rows_out:
        r["interpolated"] = interpolated_tokens(r["N"], r["edit loss"], ddp_rows) / r["D"]
        lines.append(f"| {r['N']} | {r['D']} | {r['edit loss']:.4f} | {r['factor']:.3f} | "
                     f"{r['p16']:.3f} - {r['p84']:.3f} | {r['interpolated']:.3f} |")
    means = [geometric_mean([r[key] for r in rows_out]) for key in ("factor", "interpolated")]
    lines.append(f"| geometric mean (finite) | | | {means[0]:.3f} | | {means[1]:.3f} |")
    return "\n".join(lines)


def geometric_mean(values: List[float]) -> float:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(map(math.log, finite)) / len(finite)) if finite else math.nan


def main(argv=None):
    args = get_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.fit_only:
        rows = read_runs(output_dir / "runs.csv")
        args.budgets = sorted({r["iters"] for r in rows})
    else:
        rows = []
        for iters in args.budgets:
            for layers, hidden, heads in SIZES[:args.sizes]:
                for method in args.methods:
                    print(f"training {method} with {layers} layers, hidden {hidden}, {iters} iterations ...",
                          flush=True)
                    rows.append(train(args, method, layers, hidden, heads, iters))
        write_table(rows, output_dir, "runs")
    largest = [r for r in rows if r["iters"] == args.budgets[-1]]  # L(N) and L(C) at one token budget
    table, fits = fits_table(largest, args.methods)
    if len(args.budgets) > 1:
        table += "\n\nL(N, D) = E + A N^-alpha + B D^-beta over every size and budget:\n\n" + nd_tables(rows, args.methods)
    (output_dir / "fits.md").write_text(table + "\n")
    plot(largest, fits, args.methods, output_dir)
    for row in rows:
        print(f"{row['method']:5s} N={row['non-embedding params']:>9d} C={row['compute FLOPs']:.3e} "
              f"loss={row['validation loss']:.4f}")
    print(table)
    print(f"written to {output_dir}/: runs.csv, fits.md, scaling_laws.png")


if __name__ == "__main__":
    main()
