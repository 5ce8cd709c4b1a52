"""Replicas as independent jobs (--replica-coordinator torchft), measured: what a sync costs through torchft's quorum
against the same replicas in one launch (a torch.distributed group), how long after a replica is killed the others
commit their next sync, and how long a restarted replica takes to take part again. Prints (and writes) a table.

    python tools/bench_replica_jobs.py --replicas 3 --train-iters 400 --kill-after 40

Everything runs on this machine (CPU: one process per replica), each replica its own torchrun, with a lighthouse
on a free port. Also the helpers tests/test_replica_jobs.py starts its jobs with.
"""
import argparse
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.experiment import LLAMA_STYLE, REPO, data_args, job_env, run_job, torchrun_command, write_table  # noqa: E402

SYNC = re.compile(r" (?:diloco|edit|post-local-sgd) sync at iteration (\d+) \|(.*)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_lighthouse(port: int, min_replicas: int, join_timeout_ms: int = 2000, log: Optional[Path] = None,
                     secret_file: Optional[str] = None) -> subprocess.Popen:
    """torchft's lighthouse behind its gate (megatron_edit.lighthouse) on `port`, admitting the holders of
    `secret_file` (none: the empty key): a quorum needs `min_replicas`, and waits `join_timeout_ms` for replicas that
    heartbeat but have not reached the sync yet. The gate's lines go to `log`."""
    secret = ["--sync-secret-file", secret_file] if secret_file else []
    with open(log or os.devnull, "w") as errors:
        process = subprocess.Popen([sys.executable, "-m", "megatron_edit.lighthouse", "--bind", f"127.0.0.1:{port}",
                                    *secret, "--min_replicas", str(min_replicas), "--quorum_tick_ms", "100",
                                    "--join_timeout_ms", str(join_timeout_ms)],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=errors)
    deadline = time.monotonic() + 60  # listening before any replica starts, however loaded the machine
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return process
        time.sleep(0.1)
    raise RuntimeError(f"the lighthouse on port {port} did not start (exit code {process.poll()})")


@contextlib.contextmanager
def lighthouse(min_replicas: int, join_timeout_ms: int = 2000, log: Optional[Path] = None,
               secret_file: Optional[str] = None):
    """start_lighthouse on a free port, for the block; yields its address (TORCHFT_LIGHTHOUSE)."""
    port = free_port()
    process = start_lighthouse(port, min_replicas, join_timeout_ms, log, secret_file)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


def present(sync_rest: str) -> int:
    """The replicas that met, from the rest of a sync line."""
    return int(re.search(r"replicas: (\d+)", sync_rest).group(1))


class ReplicaJob:
    """One replica's own torchrun (one process on CPU), its stdout and stderr in files under `log_dir`."""

    def __init__(self, replica_id: int, argv: List[str], address: str, log_dir: Path, nproc: int = 1,
                 script: str = "pretrain_gpt.py", env: Optional[dict] = None):
        command = torchrun_command(nproc, [*argv, "--replica-id", str(replica_id)], script=str(REPO / script))
        self.log = Path(log_dir) / f"replica{replica_id}-{time.monotonic_ns()}.log"
        self.errors = self.log.with_suffix(".err")  # torchft's own logging goes to stderr
        with open(self.log, "w") as out, open(self.errors, "w") as err:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err,
                                            env=job_env({"TORCHFT_LIGHTHOUSE": address, **(env or {})}))

    @property
    def text(self) -> str:
        return self.log.read_text()

    def syncs(self) -> List[tuple]:
        """(iteration, the rest of the line) of every sync so far."""
        return [(int(i), rest) for i, rest in SYNC.findall(self.text)]

    def wait_for_sync(self, condition: Callable[[int, str], bool], timeout: float = 180.0) -> tuple:
        """The first sync line for which condition(iteration, rest) holds, as soon as it is logged."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [sync for sync in self.syncs() if condition(*sync)]
            if found:
                return found[0]
            if self.process.poll() is not None:
                raise RuntimeError(f"replica exited ({self.process.returncode}):\n{self.text[-3000:]}\n"
                                   f"{self.errors.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"no such sync within {timeout} s:\n{self.text[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to torchrun and its workers (which torchrun starts in sessions of their own); nothing once the
        job has ended."""
        import psutil

        if self.process.poll() is not None:
            return
        agent = psutil.Process(self.process.pid)
        for process in agent.children(recursive=True) + [agent]:
            process.send_signal(signal.SIGKILL)
        self.process.wait()

    def finish(self, timeout: float = 600.0) -> tuple:
        """(returncode, stdout, stderr) once the job ends."""
        return self.process.wait(timeout=timeout), self.text, self.errors.read_text()


def exposed_ms(sync_lines: List[str]) -> float:
    """Median wall time a sync held training up, over the syncs after the first (which waits for start-up)."""
    values = [float(re.search(r"exposed ms: ([0-9.e+]+)", rest).group(1)) for rest in sync_lines]
    return statistics.median(values[1:] or values)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp-mode", default="diloco", choices=["diloco", "edit", "aedit", "post-local-sgd"])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--train-iters", type=int, default=400)
    parser.add_argument("--local-sgd-sync-interval", type=int, default=4)
    parser.add_argument("--kill-after", type=int, default=40, help="kill the last replica after this sync iteration")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--output-dir", default="runs/bench_replica_jobs")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    flags = [*LLAMA_STYLE, "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
             "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "4", "--lr", "1e-3",
             "--train-iters", str(args.train_iters), "--log-interval", "50", "--eval-iters", "1",
             "--eval-interval", "100000", "--dp-mode", args.dp_mode, "--local-sgd-warmup-iters", "0",
             "--local-sgd-sync-interval", str(args.local_sgd_sync_interval), *data_args(mock_data=True)]
    torchft = ["--replica-coordinator", "torchft", "--num-replicas", str(args.replicas), "--torchft-timeout-secs",
               "10", "--torchft-quorum-timeout-secs", "300"]
    log_dir = Path(tempfile.mkdtemp(dir=output))

    one_launch = run_job(args.replicas, flags + ["--model-shard-group-size", "1"])
    with lighthouse(min_replicas=args.replicas) as address:
        jobs = [ReplicaJob(r, flags + torchft, address, log_dir) for r in range(args.replicas)]
        for job in jobs:
            job.finish()
    plain_ms = exposed_ms([rest for _, rest in SYNC.findall(one_launch.text)])
    torchft_ms = exposed_ms([rest for _, rest in jobs[0].syncs()])

    with lighthouse(min_replicas=args.replicas - 1) as address:
        jobs = [ReplicaJob(r, flags + torchft, address, log_dir) for r in range(args.replicas)]
        last_seen = jobs[-1].wait_for_sync(lambda iteration, rest: iteration >= args.kill_after)[0]
        jobs[-1].kill()
        killed = time.monotonic()
        jobs[0].wait_for_sync(lambda iteration, rest: iteration > last_seen and present(rest) == args.replicas - 1
                              and "committed: 0" not in rest)
        kill_to_commit = time.monotonic() - killed
        restarted = time.monotonic()
        rejoined = ReplicaJob(args.replicas - 1, flags + torchft, address, log_dir)
        rejoined.wait_for_sync(lambda iteration, rest: iteration > 0 and present(rest) == args.replicas)
        restart_to_sync = time.monotonic() - restarted
        for job in jobs[:-1] + [rejoined]:
            job.finish()
    table = write_table([
        {"measure": f"exposed ms per sync, {args.replicas} replicas in one launch (process group)",
         "value": f"{plain_ms:.1f}"},
        {"measure": f"exposed ms per sync, {args.replicas} replica jobs through torchft", "value": f"{torchft_ms:.1f}"},
        {"measure": "kill -> the survivors' next committed sync (s)", "value": f"{kill_to_commit:.1f}"},
        {"measure": "restart -> the restarted replica in a sync (s)", "value": f"{restart_to_sync:.1f}"},
    ], output, "replica_jobs")
    print(table)
    print(f"logs: {log_dir}")


if __name__ == "__main__":
    main()
