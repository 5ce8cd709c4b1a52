"""Replicas as independent jobs (--replica-coordinator torchft): each replica its own torchrun, meeting the others at
every sync through torchft's lighthouse, all on 127.0.0.1. Without failures they train as one launch of all the
replicas would; a killed replica drops out and the others go on; restarted, it takes a live replica's state and
joins; a hung one is ended by its watchdog."""
import contextlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from launcher import REPO, TINY_GPT, Run, run_training, training_command
from megatron_edit.logging import parse_validation_lines

LIGHTHOUSE = Path(sys.executable).with_name("torchft_lighthouse")
SYNC = re.compile(r" diloco sync at iteration (\d+) \|(.*)")
DILOCO = TINY_GPT + ["--dp-mode", "diloco", "--micro-batch-size", "2", "--log-interval", "50", "--eval-iters", "1",
                     "--eval-interval", "100000", "--local-sgd-sync-interval", "4", "--local-sgd-warmup-iters", "0"]


def torchft(replicas: int) -> list:
    return ["--replica-coordinator", "torchft", "--num-replicas", str(replicas), "--torchft-timeout-secs", "10",
            "--torchft-quorum-timeout-secs", "120"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def lighthouse(min_replicas: int):
    """torchft's lighthouse on a free port; a quorum needs `min_replicas` (and waits 2 s for the heartbeating)."""
    port = free_port()
    process = subprocess.Popen([str(LIGHTHOUSE), "--min_replicas", str(min_replicas), "--quorum_tick_ms", "100",
                                "--join_timeout_ms", "2000", "--bind", f"[::]:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


class ReplicaJob:
    """One replica's own torchrun, logging to a file."""

    def __init__(self, replica_id: int, args: list, address: str, log_dir: Path, script: str = "pretrain_gpt.py"):
        command, env = training_command(1, args + ["--replica-id", str(replica_id)], script)
        env["TORCHFT_LIGHTHOUSE"] = address
        self.log = log_dir / f"replica{replica_id}-{time.monotonic_ns()}.log"
        self.errors = self.log.with_suffix(".err")  # torchft's own logging goes to stderr
        with open(self.log, "w") as out, open(self.errors, "w") as err:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)

    @property
    def text(self) -> str:
        return self.log.read_text()

    def syncs(self) -> list:
        """(iteration, the rest of the line) of every sync so far."""
        return [(int(i), rest) for i, rest in SYNC.findall(self.text)]

    def wait_for_sync(self, condition, timeout: float = 180.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [sync for sync in self.syncs() if condition(*sync)]
            if found:
                return found[0]
            assert self.process.poll() is None, \
                f"replica exited ({self.process.returncode}):\n{self.text[-3000:]}\n{self.errors.read_text()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no such sync within {timeout} s:\n{self.text[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to torchrun and its workers (which torchrun starts in sessions of their own)."""
        for process in psutil.Process(self.process.pid).children(recursive=True) + [psutil.Process(self.process.pid)]:
            process.send_signal(signal.SIGKILL)
        self.process.wait()

    def finish(self, timeout: float = 300.0) -> Run:
        return Run(self.process.wait(timeout=timeout), self.text, self.errors.read_text())


def present(rest: str) -> int:
    return int(re.search(r"replicas: (\d+)", rest).group(1))


def test_without_failures_the_replica_jobs_train_as_one_launch_of_all_of_them(tmp_path):
    """Two replica jobs against one launch of the same two replicas: the same parameters after 12 iterations
    (syncs at 4, 8, 12), each job having read its half of every global batch."""
    flags = DILOCO + ["--train-iters", "12"]
    one_launch = tempfile.mkdtemp(dir=tmp_path)
    run_training(2, flags + ["--model-shard-group-size", "1", "--dump-dir", one_launch],
                 script="tests/edit_runner.py").check()
    dumps = [Path(tempfile.mkdtemp(dir=tmp_path)) for _ in range(2)]
    jobs_flags = flags + torchft(2)
    with lighthouse(min_replicas=2) as address:
        jobs = [ReplicaJob(r, jobs_flags + ["--dump-dir", str(dumps[r])], address, tmp_path,
                           script="tests/edit_runner.py") for r in range(2)]
        for job in jobs:
            job.finish().check()
    for replica in range(2):
        expected = torch.load(Path(one_launch) / f"rank{replica}.pt")["params"]
        actual = torch.load(dumps[replica] / "rank0.pt")["params"]
        assert actual.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_killed_replica_drops_out_and_a_restarted_one_heals_and_rejoins(tmp_path):
    flags = DILOCO + ["--train-iters", "400"] + torchft(3)
    with lighthouse(min_replicas=2) as address:
        jobs = [ReplicaJob(r, flags, address, tmp_path) for r in range(3)]
        jobs[2].wait_for_sync(lambda iteration, rest: iteration >= 20)
        jobs[2].kill()
        killed_at = time.monotonic()
        left = jobs[0].wait_for_sync(lambda iteration, rest: present(rest) == 2 and "committed: 0" not in rest)
        print(f"kill -> the survivors' next committed sync: {time.monotonic() - killed_at:.1f} s")
        restarted_at = time.monotonic()
        rejoined = ReplicaJob(2, flags, address, tmp_path)
        rejoined.wait_for_sync(lambda iteration, rest: present(rest) == 3 and iteration > 0)
        print(f"restart -> taking part in a sync: {time.monotonic() - restarted_at:.1f} s")
        runs = [job.finish().check() for job in (jobs[0], jobs[1], rejoined)]
    survivors_syncs = jobs[0].syncs()
    after_kill = [rest for iteration, rest in survivors_syncs if iteration >= left[0]]
    assert "replicas change: -1" in left[1] or any("replicas change: -1" in r for _, r in survivors_syncs)
    assert any(present(rest) == 3 and "replicas change: 1" in rest for rest in after_kill)  # the rejoin
    assert " took a live replica's state: continuing after iteration" in rejoined.text
    for run in runs:
        assert "training summary: 400 iterations" in run.stdout
    finals = [run.validation_losses[400] for run in runs]
    assert finals == pytest.approx([finals[0]] * 3, rel=1e-6)  # one model: the final sync had all three
    assert finals[0] < runs[0].validation_losses[0]


def test_a_hung_replica_is_ended_by_its_watchdog_and_the_others_finish(tmp_path):
    flags = DILOCO + ["--train-iters", "120"] + torchft(3)
    with lighthouse(min_replicas=2) as address:
        jobs = [ReplicaJob(r, flags + (["--inject-fault", "2:30:hang", "--replica-step-timeout-secs", "4"]
                                       if r == 2 else []), address, tmp_path) for r in range(3)]
        hung = jobs[2].finish(timeout=120)
        survivors = [job.finish().check() for job in jobs[:2]]
    assert hung.returncode != 0
    assert "error: replica 2 completed no iteration in 4 s (--replica-step-timeout-secs)" in hung.stderr
    for run in survivors:
        assert "training summary: 120 iterations" in run.stdout
    assert present(jobs[0].syncs()[-1][1]) == 2
