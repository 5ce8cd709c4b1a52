"""Replicas as nodes behind shaped links: throughput of each data-parallel method against bandwidth.

    sudo python tools/netsim.py --output-dir runs/netsim                       # 10gbit 1gbit 100mbit 10mbit
    sudo python tools/netsim.py --bandwidths 100mbit --methods ddp edit --straggler 1:2
    sudo python tools/netsim.py --rhos 0.35 3.5 --corpus             # links as slow as a real deployment's

Each node (one replica: --nproc-per-node ranks) runs its own torchrun inside its own Linux network namespace,
joined to the others through veth pairs on a bridge in a hub namespace. tc's token-bucket filter (tbf) caps
every node's link in both directions (its egress, and the hub's egress towards it) at the given rate. The
kernel here has no netem, so no delay is added: the links are bandwidth-limited, not long. Gloo is pinned to
the namespace's interface, so all traffic between replicas crosses the shaped links, and nothing else does.
Everything this tool creates is named after its process id and deleted at exit.

The ceiling is the same nodes training with no communication at all: each node trains its share of the
global batch alone (--standalone), all at once; tokens/s are summed. Every method's throughput is reported
as a ratio of that ceiling. With --straggler R:F, node R runs F times slower (--simulate-straggler) in a second
table for ddp, edit and aedit.

A tiny model on a CPU computes slowly and syncs few bytes, so a link rate says little about a real deployment.
What carries over is rho = (time to send one fp32 sync) / (compute time of the H local steps between syncs): a
Llama-1B replica on an 8-GPU node has rho ~3.5 over 100 Mbit/s and ~0.35 over 1 Gbit/s. With --rhos, the tool
measures the step time of the no-communication run and the model's size, sets the link to the rate that gives each
rho (an fp32 ring all-reduce of a replica's shard sends 2 (M-1)/M x 4 bytes per owned parameter), and runs ddp,
diloco (fp32), edit with its shipped defaults (int4), fp32, bf16 and int8 with error feedback, fp32 and int8 with a delayed outer step (TAU = H - 1), int8 in
4 staggered fragments each delayed by H/4 or H/4 + 1 (--sync-fragments 4), and aedit (fp32, a sync every H step-times);
--rho-methods picks rows. Throughput is the steady state after the synchronous warm-up (the iteration lines after
the first --log-interval, which is W, or H without one); warm-up and all bytes are reported beside it.
"""
import argparse
import atexit
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.experiment import (LLAMA_STYLE, METHODS, REPO, add_training_args, check_finished,  # noqa: E402
                              cross_replica_bytes, data_args, job_env, new_figure, save_figure, torchrun_command,
                              write_table)

SUBNET = "10.231.0"


def _ip(*args: str, namespace: str = None) -> None:
    command = (["ip", "netns", "exec", namespace] if namespace else []) + list(args)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")


def unavailable_reason() -> str:
    """Why namespaces can't be made here ('' when they can)."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"me-probe-{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"ip netns add failed: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


class ShapedNetwork:
    """N node namespaces on a bridge in a hub namespace; `shape(rate)` caps every link at rate (tc syntax)."""

    def __init__(self, nodes: int):
        tag = os.getpid()
        self.hub, self.nodes = f"me-hub-{tag}", [f"me-node{i}-{tag}" for i in range(nodes)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(nodes)]
        atexit.register(self.close)
        _ip("ip", "netns", "add", self.hub)
        _ip("ip", "link", "set", "lo", "up", namespace=self.hub)
        _ip("ip", "link", "add", "br0", "type", "bridge", namespace=self.hub)
        _ip("ip", "link", "set", "br0", "up", namespace=self.hub)
        for i, (node, address) in enumerate(zip(self.nodes, self.addresses)):
            _ip("ip", "netns", "add", node)
            _ip("ip", "link", "set", "lo", "up", namespace=node)
            _ip("ip", "link", "add", "eth0", "netns", node, "type", "veth", "peer", "name", f"port{i}",
                "netns", self.hub, namespace=self.hub)
            _ip("ip", "addr", "add", f"{address}/24", "dev", "eth0", namespace=node)
            _ip("ip", "link", "set", "eth0", "up", namespace=node)
            _ip("ip", "link", "set", f"port{i}", "master", "br0", "up", namespace=self.hub)

    def shape(self, rate: str) -> None:
        """tbf on both ends of every link; the burst holds at least 10 ms at the rate (tbf needs rate/HZ)."""
        bits_per_second = _rate_bits(rate)
        burst = max(32 * 1024, int(bits_per_second / 8 / 100))
        for i, node in enumerate(self.nodes):
            for device, namespace in (("eth0", node), (f"port{i}", self.hub)):
                _ip("tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate, "burst", str(burst),
                    "latency", "100ms", namespace=namespace)

    def close(self) -> None:
        for namespace in self.nodes + [self.hub]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _rate_bits(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, factor in units.items():
        if rate.lower().endswith(unit):
            return float(rate[:-len(unit)]) * factor
    raise SystemExit(f"error: bandwidth {rate!r}: write it as tc does, e.g. 10gbit, 100mbit")


def run_on_nodes(network: ShapedNetwork, nproc: int, argv: List[str], log_dir: Path, standalone: bool = False):
    """One torchrun per node namespace, all at once; returns each node's parsed log (the job's log lines are the
    last node's; with standalone=True every node is a job of its own)."""
    port = 29600 + os.getpid() % 300
    log_dir.mkdir(parents=True, exist_ok=True)
    launched = []
    for rank, node in enumerate(network.nodes):
        launcher = ["--standalone"] if standalone else [
            "--nnodes", str(len(network.nodes)), "--node-rank", str(rank), "--master-addr", network.addresses[0],
            "--master-port", str(port)]
        command = torchrun_command(nproc, argv, launcher, prefix=["ip", "netns", "exec", node])
        env = job_env({"GLOO_SOCKET_IFNAME": "lo" if standalone else "eth0"})
        out, err = open(log_dir / f"node{rank}.out", "w+"), open(log_dir / f"node{rank}.err", "w+")
        launched.append((command, subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err), out, err))
    logs = []
    for rank, (command, process, out, err) in enumerate(launched):
        process.wait(timeout=3600)
        with out, err:
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
        if process.returncode != 0 or standalone or rank == len(launched) - 1:
            logs.append(check_finished(command, process.returncode, stdout, stderr))
    return logs


# (row label, --dp-mode, extra flags) of the rho table; "TAU" becomes H - 1, "H/4" H // 4, "H/4+1" one more
FP32 = ["--sync-dtype", "fp32"]
RHO_VARIANTS = [
    ("ddp", "ddp", []),
    ("diloco", "diloco", FP32),
    ("edit defaults", "edit", []),
    ("edit fp32", "edit", FP32),
    ("edit bf16", "edit", ["--sync-dtype", "bf16"]),
    ("edit int8+ef", "edit", ["--sync-dtype", "int8", "--sync-error-feedback"]),
    ("edit fp32 delayed", "edit", FP32 + ["--sync-delay-steps", "TAU"]),
    ("edit int8+ef delayed", "edit", ["--sync-dtype", "int8", "--sync-error-feedback", "--sync-delay-steps", "TAU"]),
    ("edit int8+ef 4 fragments delayed", "edit", ["--sync-dtype", "int8", "--sync-error-feedback", "--sync-fragments",
                                                  "4", "--sync-delay-steps", "H/4"]),
    ("edit int8+ef 4 fragments delayed+1", "edit", ["--sync-dtype", "int8", "--sync-error-feedback",
                                                    "--sync-fragments", "4", "--sync-delay-steps", "H/4+1"]),
    ("edit int8+ef 4 fragments delayed+2", "edit", ["--sync-dtype", "int8", "--sync-error-feedback",
                                                    "--sync-fragments", "4", "--sync-delay-steps", "H/4+2"]),
    ("aedit", "aedit", FP32),
]
_PARAMETERS = re.compile(r"number of parameters on \(tensor, pipeline\) model parallel rank \(0, 0\): (\d+)")


def rho_rate_bits(rho: float, parameters: int, args, step_seconds: float) -> float:
    """The link rate at which one fp32 sync of a replica's shard takes rho x the compute time of H steps."""
    replicas, shard = args.nodes, args.nproc_per_node
    sync_bytes = 4 * parameters / shard * 2 * (replicas - 1) / replicas
    return 8 * sync_bytes / (rho * args.local_sgd_sync_interval * step_seconds)


def steady_tokens_per_second(log, tokens_per_iteration: int) -> float:
    """Throughput over the iteration lines after the first (which covers the synchronous warm-up)."""
    steady = log.iterations[1:] or log.iterations
    return tokens_per_iteration * 1000 / (sum(line["ms_per_iteration"] for line in steady) / len(steady))


def run_rhos(args, network: "ShapedNetwork", output_dir: Path) -> List[dict]:
    tokens_per_iteration = args.micro_batch_size * args.nproc_per_node * args.nodes * args.seq_length
    alone = run_on_nodes(network, args.nproc_per_node, job_argv(args, "ddp", 1), output_dir / "logs" / "rho" / "alone",
                         standalone=True)
    ceiling = sum(steady_tokens_per_second(log, tokens_per_iteration // args.nodes) for log in alone)
    step_seconds = tokens_per_iteration / ceiling
    parameters = int(_PARAMETERS.search(alone[0].text).group(1)) * args.nproc_per_node  # whole model: TP=PP=1
    rows = []
    for rho in args.rhos:
        rate = rho_rate_bits(rho, parameters, args, step_seconds)
        network.shape(f"{int(rate)}bit")
        for label, method, extra in (v for v in RHO_VARIANTS if v[0] in args.rho_methods):
            print(f"rho {rho} ({rate / 1e6:.3f} Mbit/s): {label} ...", flush=True)
            interval = args.local_sgd_sync_interval
            delays = {"TAU": interval - 1, "H/4": interval // 4, "H/4+1": interval // 4 + 1, "H/4+2": interval // 4 + 2}
            flags = [str(delays[flag]) if flag in delays else flag for flag in extra]
            flags += ["--aedit-sync-seconds", f"{args.local_sgd_sync_interval * step_seconds:.3f}", "--eval-iters", "16"]
            log = run_on_nodes(network, args.nproc_per_node, job_argv(args, method, args.nodes) + flags,
                               output_dir / "logs" / f"rho{rho}" / label.replace(" ", "_"))[-1]
            steady = steady_tokens_per_second(log, tokens_per_iteration)
            rows.append({"rho": rho, "link Mbit/s": round(rate / 1e6, 3), "method": label,
                         "steady tokens/s": round(steady, 1), "vs ceiling": round(steady / ceiling, 3),
                         "warm-up s/iter": round(log.iterations[0]["ms_per_iteration"] / 1000, 3),
                         "MB to other replicas per rank": round(cross_replica_bytes(method, log) / 1e6, 2),
                         "final validation loss": round(log.validation[max(log.validation)], 4)})
    return rows


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/netsim")
    parser.add_argument("--bandwidths", nargs="+", default=["10gbit", "1gbit", "100mbit", "10mbit"])
    parser.add_argument("--rhos", type=float, nargs="+", default=None,
                        help="instead of --bandwidths: link rates that make an fp32 sync take rho x the compute of "
                             "H steps, and the slow-link methods (see the module docstring)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--rho-methods", nargs="+", default=[v[0] for v in RHO_VARIANTS],
                        choices=[v[0] for v in RHO_VARIANTS], metavar="ROW",
                        help="with --rhos: the rows to run (quoted labels; default: all of them)")
    parser.add_argument("--nodes", type=int, default=2, help="replicas, one namespace each")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="ranks of a replica (the shard group)")
    add_training_args(parser, num_layers=2, hidden_size=128, seq_length=64, micro_batch_size=4, train_iters=40,
                      sync_interval=8, warmup_iters=4)
    parser.add_argument("--aedit-sync-seconds", type=float, default=1.0)
    parser.add_argument("--straggler", default=None, metavar="NODE:FACTOR",
                        help="also run ddp, edit, aedit with this node slowed down (at the first bandwidth)")
    parser.add_argument("--corpus", action="store_true", help="train on the sample corpus instead of mock data")
    return parser.parse_args(argv)


def log_interval(args) -> int:
    """One line for the whole run, or with --rhos a first line for the warm-up (W, or H without one) and then more."""
    if not args.rhos:
        return args.train_iters
    return args.local_sgd_warmup_iters or args.local_sgd_sync_interval


def job_argv(args, method: str, replicas: int) -> List[str]:
    global_batch = args.micro_batch_size * args.nproc_per_node * replicas
    return [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size), "--num-attention-heads", "4",
        "--seq-length", str(args.seq_length), *LLAMA_STYLE, "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(global_batch), "--train-iters", str(args.train_iters), "--lr", "2e-3",
        "--seed", "1234", "--log-interval", str(log_interval(args)), "--eval-interval", str(10 * args.train_iters),
        "--eval-iters", "1", *data_args(not args.corpus), "--dp-mode", method,
        "--model-shard-group-size", str(args.nproc_per_node),  # the local-SGD flags; ddp leaves them unused
        "--local-sgd-sync-interval", str(args.local_sgd_sync_interval),
        "--local-sgd-warmup-iters", str(args.local_sgd_warmup_iters),
        "--aedit-sync-seconds", str(args.aedit_sync_seconds),
    ]


def plot(rows: List[dict], output_dir: Path) -> None:
    figure, axes = new_figure()
    axis = axes[0, 0]
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((_rate_bits(r["bandwidth"]), r["tokens/s"]) for r in rows if r["method"] == method)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                  label=method, linestyle="--" if method == "no communication" else "-")
    axis.set_xscale("log")
    axis.set_xlabel("link bandwidth per node (bit/s)")
    axis.set_ylabel("training tokens/s (all replicas)")
    save_figure(figure, output_dir / "throughput_vs_bandwidth.png")


def main(argv=None):
    args = get_args(argv)
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"error: no network simulation here: {reason}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    network = ShapedNetwork(args.nodes)
    rows = []
    try:
        if args.rhos:
            print(write_table(run_rhos(args, network, output_dir), output_dir, "throughput_vs_rho"))
            return
        for bandwidth in args.bandwidths:
            network.shape(bandwidth)
            alone = run_on_nodes(network, args.nproc_per_node, job_argv(args, "ddp", 1),
                                 output_dir / "logs" / bandwidth / "alone", standalone=True)
            ceiling = sum(log.tokens_per_second for log in alone)
            rows.append({"bandwidth": bandwidth, "method": "no communication", "tokens/s": round(ceiling, 1),
                         "vs ceiling": 1.0, "MB to other replicas per rank": 0.0})
            for method in args.methods:
                print(f"{bandwidth}: {method} ...", flush=True)
                log = run_on_nodes(network, args.nproc_per_node, job_argv(args, method, args.nodes),
                                   output_dir / "logs" / bandwidth / method)[-1]
                rows.append({"bandwidth": bandwidth, "method": method, "tokens/s": round(log.tokens_per_second, 1),
                             "vs ceiling": round(log.tokens_per_second / ceiling, 3),
                             "MB to other replicas per rank": round(cross_replica_bytes(method, log) / 1e6, 2)})
        print(write_table(rows, output_dir, "throughput_vs_bandwidth"))
        plot(rows, output_dir)
        if args.straggler:
            network.shape(args.bandwidths[0])
            straggler_rows = []
            for method in ("ddp", "edit", "aedit"):
                log = run_on_nodes(network, args.nproc_per_node,
                                   job_argv(args, method, args.nodes) + ["--simulate-straggler", args.straggler],
                                   output_dir / "logs" / "straggler" / method)[-1]
                straggler_rows.append({"bandwidth": args.bandwidths[0], "straggler": args.straggler, "method": method,
                                       "tokens/s": round(log.tokens_per_second, 1),
                                       "final train loss": round(log.iterations[-1]["lm_loss"], 4)})
            print(write_table(straggler_rows, output_dir, "straggler"))
    finally:
        network.close()
    print(f"written to {output_dir}/")


if __name__ == "__main__":
    main()
