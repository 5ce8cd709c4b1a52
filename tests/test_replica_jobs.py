"""Replicas as independent jobs (--replica-coordinator torchft): each replica its own torchrun, meeting the others at
every sync through torchft's lighthouse, all on 127.0.0.1. Without failures they train as one launch of all the
replicas would; a killed replica drops out and the others go on; restarted, it takes a live replica's state and
joins; a hung one is ended by its watchdog."""
import os
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from launcher import TINY_GPT, Run, run_training
from tools.bench_replica_jobs import ReplicaJob, free_port, lighthouse, present, start_lighthouse

pytestmark = pytest.mark.slow  # every test here starts processes

COMMON = TINY_GPT + ["--micro-batch-size", "2", "--log-interval", "50", "--eval-iters", "1",
                     "--eval-interval", "100000", "--local-sgd-sync-interval", "4", "--local-sgd-warmup-iters", "0"]
DILOCO = COMMON + ["--dp-mode", "diloco"]
PENALTY = ["--edit-anomaly-elimination", "--edit-weighted-average", "--edit-pseudo-grad-clip", "1.0"]
EDIT = COMMON + ["--dp-mode", "edit"] + PENALTY
AEDIT = COMMON + ["--dp-mode", "aedit", "--aedit-sync-seconds", "0.3"] + PENALTY


def torchft(replicas: int) -> list:
    return ["--replica-coordinator", "torchft", "--num-replicas", str(replicas), "--torchft-timeout-secs", "10",
            "--torchft-quorum-timeout-secs", "120"]


def finished(job: ReplicaJob) -> Run:
    return Run(*job.finish())


# (mode flags, ranks per replica job, one launch's flags for the same replicas, (replica, rank) -> its rank there)
ONE_LAUNCH_OF_THE_REPLICA_JOBS = {
    "edit-penalty": (EDIT, 1, ["--model-shard-group-size", "1"], lambda replica, rank: replica),
    "post-local-sgd": (COMMON + ["--dp-mode", "post-local-sgd"], 1, ["--model-shard-group-size", "1"],
                       lambda replica, rank: replica),
    "edit-shard2-distopt-bf16": (EDIT + ["--use-distributed-optimizer", "--bf16"], 2,
                                 ["--model-shard-group-size", "2"], lambda replica, rank: 2 * replica + rank),
    "diloco-pp2": (DILOCO + ["--pipeline-model-parallel-size", "2"], 2, ["--model-shard-group-size", "1"],
                   lambda replica, rank: 2 * rank + replica),  # megatron-core orders ranks TP, DP, PP
}


@pytest.mark.parametrize("case", ONE_LAUNCH_OF_THE_REPLICA_JOBS)
def test_without_failures_the_replica_jobs_train_as_one_launch_of_all_of_them(tmp_path, case):
    """Two replica jobs against one launch of the same two replicas: the same parameters after 12 iterations
    (syncs at 4, 8, 12; EDiT's penalty decided from norms gathered over the quorum; with two ranks per job, rank k
    of each exchanges its shard or pipeline stage with rank k of the other), each job having read its half of
    every global batch."""
    mode, ranks, one_launch_flags, rank_in_one_launch = ONE_LAUNCH_OF_THE_REPLICA_JOBS[case]
    flags = mode + ["--train-iters", "12"]
    one_launch = Path(tempfile.mkdtemp(dir=tmp_path))
    run_training(2 * ranks, flags + one_launch_flags + ["--dump-dir", str(one_launch)],
                 script="tests/edit_runner.py").check()
    dumps = [Path(tempfile.mkdtemp(dir=tmp_path)) for _ in range(2)]
    jobs_flags = flags + torchft(2)
    with lighthouse(min_replicas=2) as address:
        jobs = [ReplicaJob(r, jobs_flags + ["--dump-dir", str(dumps[r])], address, tmp_path, nproc=ranks,
                           script="tests/edit_runner.py") for r in range(2)]
        for job in jobs:
            finished(job).check()
    for replica in range(2):
        for rank in range(ranks):
            expected = torch.load(one_launch / f"rank{rank_in_one_launch(replica, rank)}.pt")["params"]
            actual = torch.load(dumps[replica] / f"rank{rank}.pt")["params"]
            assert actual.keys() == expected.keys()
            for name in expected:
                torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", [DILOCO, AEDIT], ids=["diloco", "aedit-penalty"])
def test_a_killed_replica_drops_out_and_a_restarted_one_heals_and_rejoins(tmp_path, mode):
    """Replica 0 straggles (4x): under DiLoCo the others wait for it at every sync, under A-EDiT (syncs every
    0.3 s) they take more local steps; either way training outlasts a restart. The lighthouse waits up to 30 s for
    a replica that still heartbeats (the straggler, however loaded the machine), so only the killed one is left out.
    (A replica that starts after the first quorum formed heals into a later one: the kill waits for all three.)"""
    flags = mode + ["--train-iters", "400", "--simulate-straggler", "0:4"] + torchft(3)
    with lighthouse(min_replicas=2, join_timeout_ms=30000) as address:
        jobs = [ReplicaJob(r, flags, address, tmp_path) for r in range(3)]
        last_seen = jobs[2].wait_for_sync(lambda iteration, rest: iteration >= 20 and present(rest) == 3)[0]
        jobs[2].kill()
        killed_at = time.monotonic()
        left = jobs[0].wait_for_sync(lambda iteration, rest: iteration > last_seen and present(rest) == 2
                                     and "committed: 0" not in rest)
        print(f"kill -> the survivors' next committed sync: {time.monotonic() - killed_at:.1f} s")
        restarted_at = time.monotonic()
        rejoined = ReplicaJob(2, flags, address, tmp_path)
        rejoined.wait_for_sync(lambda iteration, rest: present(rest) == 3 and iteration > 0)
        print(f"restart -> taking part in a sync: {time.monotonic() - restarted_at:.1f} s")
        runs = [finished(job).check() for job in (jobs[0], jobs[1], rejoined)]
    survivors_syncs = jobs[0].syncs()
    after_kill = [rest for iteration, rest in survivors_syncs if iteration >= left[0]]
    assert "replicas change: -1" in left[1] or any("replicas change: -1" in r for _, r in survivors_syncs)
    assert any(present(rest) == 3 and "replicas change: 1" in rest for rest in after_kill)  # the rejoin
    assert " took a live replica's state: continuing after iteration" in rejoined.text
    finals = [run.validation_losses[max(run.validation_losses)] for run in runs]  # A-EDiT: at each one's end
    assert finals == pytest.approx([finals[0]] * 3, rel=1e-6)  # one model: the final sync had all three
    for run, final in zip(runs, finals):  # from where each started (a replica starting late also heals)
        assert final < run.validation_losses[min(run.validation_losses)]
    assert any("training summary: 400 iterations" in run.stdout for run in runs)  # A-EDiT: the first to get there


def test_a_hung_replica_is_ended_by_its_watchdog_and_the_others_finish(tmp_path):
    flags = DILOCO + ["--train-iters", "120"] + torchft(3)
    with lighthouse(min_replicas=2) as address:
        jobs = [ReplicaJob(r, flags + (["--inject-fault", "2:30:hang", "--replica-step-timeout-secs", "4"]
                                       if r == 2 else []), address, tmp_path) for r in range(3)]
        hung = Run(*jobs[2].finish(timeout=120))
        survivors = [finished(job).check() for job in jobs[:2]]
    assert hung.returncode != 0
    assert "error: replica 2 completed no iteration in 4 s (--replica-step-timeout-secs)" in hung.stderr
    for run in survivors:
        assert "training summary: 120 iterations" in run.stdout
    assert present(jobs[0].syncs()[-1][1]) == 2


def test_replicas_wait_for_a_lighthouse_that_restarts_and_end_in_one_line_when_it_is_gone(tmp_path):
    """The lighthouse killed: the replicas' next quorum asks again until it is back, and they go on; killed for good:
    after --torchft-quorum-timeout-secs each replica stops with one line, none hangs."""
    flags = DILOCO + ["--train-iters", "1000000"] + torchft(2) + ["--torchft-quorum-timeout-secs", "20"]
    port = free_port()
    first = start_lighthouse(port, min_replicas=2)
    jobs = [ReplicaJob(r, flags, f"http://127.0.0.1:{port}", tmp_path) for r in range(2)]
    try:
        jobs[0].wait_for_sync(lambda iteration, rest: iteration >= 8)
        first.kill()
        first.wait()
        stopped_at = jobs[0].syncs()[-1][0]
        second = start_lighthouse(port, min_replicas=2)
        try:
            for job in jobs:  # both meet again through the new lighthouse
                job.wait_for_sync(lambda iteration, rest: iteration >= stopped_at + 16 and present(rest) == 2)
        finally:
            second.kill()
            second.wait()
        runs = [Run(*job.finish(timeout=180)) for job in jobs]
    finally:
        for job in jobs:
            job.kill()
    for replica, run in enumerate(runs):
        assert run.returncode != 0
        assert f"error: replica {replica} met no quorum within 20 s (--torchft-quorum-timeout-secs): the lighthouse " \
               f"at http://127.0.0.1:{port} did not answer" in run.stderr


def write_secret(path: Path) -> str:
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return str(path)


def listening_addresses() -> set:
    """The addresses the sockets of this test's processes (lighthouse, torchrun agents, ranks) listen on."""
    processes = psutil.Process().children(recursive=True)
    return {c.laddr.ip for p in processes for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}


def test_replicas_listen_on_loopback_only_and_one_with_another_secret_is_refused_on_both_sides(tmp_path):
    """Two replica jobs share a secret file, a third holds another. Every socket of the run (the lighthouse and its
    gate, torchrun's agents, the ranks) listens on 127.0.0.1, the default --sync-interface on one machine. The third
    is refused at the lighthouse's gate: one line there, one line from it as it exits; the two train on."""
    good, other = write_secret(tmp_path / "good"), write_secret(tmp_path / "other")
    flags = DILOCO + ["--train-iters", "40"] + torchft(3)
    gate_log = tmp_path / "gate.err"
    with lighthouse(min_replicas=2, log=gate_log, secret_file=good) as address:
        jobs = [ReplicaJob(r, flags + ["--sync-secret-file", secret], address, tmp_path)
                for r, secret in enumerate([good, good, other])]
        jobs[0].wait_for_sync(lambda iteration, rest: iteration >= 8)
        assert listening_addresses() == {"127.0.0.1"}
        refused = Run(*jobs[2].finish(timeout=300))
        runs = [finished(job).check() for job in jobs[:2]]
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: the lighthouse gate at {address} refused this replica: it holds another sync secret "
        "(--sync-secret-file); give every replica the same file")
    assert "warning: the lighthouse gate refused a connection from 127.0.0.1: it did not prove the sync secret " \
           "(--sync-secret-file)" in gate_log.read_text()
    for run in runs:
        assert "training summary: 40 iterations" in run.stdout
    assert all(present(rest) == 2 for job in jobs[:2] for _, rest in job.syncs())


def test_a_replica_with_another_layout_is_refused_in_one_line(tmp_path):
    """Replica 1 splits its two ranks by tensor parallelism where replica 0 shards data: rank k of each would
    exchange different things. Replica 1 (not the layout of the lowest --replica-id) stops; replica 0 goes on.
    Replica 1 starts only once replica 0 is syncing (so their first quorum has both, however slowly either starts),
    and replica 0 is stopped once it has synced alone after the refusal."""
    flags = EDIT + torchft(2)
    with lighthouse(min_replicas=1) as address:
        going_on = ReplicaJob(0, flags + ["--train-iters", "100000"], address, tmp_path, nproc=2)
        try:
            going_on.wait_for_sync(lambda iteration, rest: iteration > 0)
            refused = Run(*ReplicaJob(1, flags + ["--train-iters", "12", "--tensor-model-parallel-size", "2"],
                                      address, tmp_path, nproc=2).finish(timeout=300))
            since = going_on.syncs()[-1][0]
            going_on.wait_for_sync(lambda iteration, rest: iteration > since and present(rest) == 1
                                   and "committed: 0" not in rest)
        finally:
            going_on.kill()
    assert refused.returncode != 0
    assert "error: this replica's layout differs from the " in refused.stderr
    assert "(TP 2 vs 1, data-parallel ranks 1 vs 2): every replica of a --replica-coordinator torchft run needs " \
           "the same parallel sizes and model; relaunch it with theirs" in refused.stderr
