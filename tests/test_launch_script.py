"""examples/pretrain_edit.sh outside Slurm: bad input stops before launch; a local EDiT run trains."""
import os
import socket
import subprocess

import pytest

from launcher import REPO

pytestmark = pytest.mark.slow  # every test here starts processes


def launch(env_overrides, *args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON_BIN=str(REPO / ".venv/bin/python"), **env_overrides)
    env.pop("SLURM_JOB_ID", None)
    return subprocess.run(["bash", "examples/pretrain_edit.sh", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_unknown_dp_mode_and_missing_data_stop_before_launch():
    result = launch({"DP_MODE": "nope"})
    assert result.returncode == 2 and result.stderr.strip() == "error: DP_MODE=nope is unknown; use ddp, edit, aedit, diloco or post-local-sgd"
    result = launch({"DATA_PATH": "/nonexistent/corpus"})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: DATA_PATH=/nonexistent/corpus: /nonexistent/corpus.bin does not exist")


def test_gpu_check_refuses_in_one_line_without_a_gpu(tmp_path):
    env = dict(os.environ, PYTHON=str(REPO / ".venv/bin/python"), GPU_CHECK_DIR=str(tmp_path / "gpu_check"),
               CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: gpu-check needs a CUDA device and this machine has none visible "
                                          "(torch.cuda.is_available() is False); run it where one is"]
    assert not (tmp_path / "gpu_check").exists()


def test_configuration_error_is_one_line_before_torchrun_starts():
    subprocess.run(["bash", "examples/prepare_sample_data.sh"], cwd=REPO, check=True, capture_output=True,
                   env=dict(os.environ, PYTHON_BIN=str(REPO / ".venv/bin/python")))  # its progress is not the point
    result = launch({"NPROC": "2"}, "--tensor-model-parallel-size", "3")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: world size 2 is not divisible by tensor x pipeline parallel size "
                                          "3x1=3; launch a multiple of 3 processes or change the parallel sizes"]
    result = launch({"NPROC": "2"}, "--no-such-flag")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: unrecognized arguments: --no-such-flag (--help lists the flags)"]
    assert "ChildFailedError" not in result.stderr and "Traceback" not in result.stderr


def test_warm_ups_scale_with_a_short_run():
    result = launch({"TRAIN_ITERS": "6", "NUM_LAYERS": "2", "HIDDEN_SIZE": "64", "SEQ_LENGTH": "64"},
                    "--eval-iters", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert " training summary: 6 iterations," in result.stdout


def test_a_rank_that_fails_while_training_is_its_one_line_without_torchruns_report():
    """A rank stops with one line (a NaN loss here); the launch (megatron_edit/launch.py) ends with its exit code
    and adds no launcher traceback or failure table after it."""
    result = launch({"TRAIN_ITERS": "6", "NUM_LAYERS": "2", "HIDDEN_SIZE": "64", "SEQ_LENGTH": "64", "DP_MODE": "ddp"},
                    "--eval-iters", "1", "--inject-fault", "1:3:nan-loss")
    assert result.returncode == 1
    assert "error: non-finite loss at iteration 3 on rank 1; the step was not taken" in result.stderr
    for report in ("ChildFailedError", "Traceback", "failed (exitcode"):
        assert report not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("how,code,line", [("sys.exit(3)", 3, None),
                                           ("os.kill(os.getpid(), signal.SIGKILL)", 128 + 9,
                                            "error: rank 1 was killed by SIGKILL, with nothing more to say")])
def test_the_launcher_ends_with_the_failed_ranks_code(tmp_path, how, code, line):
    script = tmp_path / "rank.py"
    script.write_text(f"import os, signal, sys, time\nif os.environ['RANK'] == '1':\n    {how}\ntime.sleep(60)\n")
    result = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "megatron_edit.launch", "--standalone",
                             "--nproc-per-node", "2", str(script)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == code
    assert [text for text in result.stderr.splitlines() if text.startswith("error:") or "Traceback" in text] == \
        ([line + " (out of memory, or killed from outside?)"] if line else [])


def test_local_run_with_two_edit_replicas_lowers_validation_loss():
    """Without GPUs the defaults are `make train`'s: two processes, each its own EDiT replica."""
    result = launch({"TRAIN_ITERS": "40", "NUM_LAYERS": "2", "HIDDEN_SIZE": "64",
                     "SEQ_LENGTH": "64", "MICRO_BATCH_SIZE": "4", "GLOBAL_BATCH_SIZE": "8",
                     "LOCAL_SGD_SYNC_INTERVAL": "4", "LOCAL_SGD_WARMUP_ITERS": "8"},
                    "--eval-interval", "40", "--eval-iters", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "edit sync at iteration 13" in result.stdout
    assert "TP=1 PP=1 DP=2 (edit)" in result.stdout
    assert "   across replicas: sync group " in result.stdout
    before = float(result.stdout.split("validation loss at iteration 0: ")[1].split()[0])
    after = float(result.stdout.split("validation loss at iteration 40: ")[1].split()[0])
    assert after < before - 1.0


def test_multicluster_script_runs_two_replica_jobs_and_a_lighthouse_locally(tmp_path):
    """examples/pretrain_edit_multicluster.sh local: a lighthouse and two EDiT replica jobs (one process each),
    meeting at every sync; both finish on one model."""
    from tools.bench_replica_jobs import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON_BIN=str(REPO / ".venv/bin/python"), RUN_DIR=str(tmp_path),
               LIGHTHOUSE_PORT=str(free_port()), MIN_REPLICAS="2", TRAIN_ITERS="8", NUM_LAYERS="2",
               HIDDEN_SIZE="64", SEQ_LENGTH="64", MICRO_BATCH_SIZE="4", LOCAL_SGD_SYNC_INTERVAL="4")
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run(["bash", "examples/pretrain_edit_multicluster.sh", "local", "--eval-iters", "1",
                             "--eval-interval", "8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = [(tmp_path / f"replica{r}.log").read_text() for r in range(2)]
    finals = []
    for log in logs:
        assert " training summary: 8 iterations," in log
        assert "edit sync at iteration 5 | replicas: 2 |" in log
        finals.append(log.split("validation loss at iteration 8: ")[1].split()[0])
    assert finals[0] == finals[1]
    # The lighthouse went with the script; one still on the port (an earlier run's) is refused in one line.
    with socket.create_server(("", int(env["LIGHTHOUSE_PORT"])), family=socket.AF_INET6, dualstack_ipv6=True):
        again = subprocess.run(["bash", "examples/pretrain_edit_multicluster.sh", "local"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert again.stderr.strip() == f"error: port {env['LIGHTHOUSE_PORT']} is in use (a lighthouse left from an " \
                                   "earlier run?): stop it or set LIGHTHOUSE_PORT"
