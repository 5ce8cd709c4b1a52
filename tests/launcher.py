"""The one way tests start training: real processes under torchrun on CPU with gloo, read back from the log."""
import atexit
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

from megatron_edit.logging import parse_iteration_lines, parse_validation_lines

REPO = Path(__file__).resolve().parent.parent

# A tiny GPT with dropout off, so that runs are deterministic and comparable across layouts. Local-SGD exchanges in
# fp32 (the shipped defaults are int2), so that runs compare exactly with references, layouts and one another; the
# codecs are tested where a test names them. One recipe for every mode, whatever its defaults (a sync every 16 local
# steps, the outer Nesterov step, the local steps at the schedule's LR: the inner LR's default depends on M, which
# a single-process reference does not have); tests name H, the outer step and the scale where they are the subject.
TINY_GPT = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-3", "--seed", "1234",
    "--mock-data", "--vocab-size", "511", "--sync-dtype", "fp32", "--local-sgd-warmup-grad-dtype", "fp32",
    "--local-sgd-sync-interval", "16", "--outer-lr", "0.7", "--outer-momentum", "0.8", "--outer-nesterov",
    "--local-sgd-lr-scale", "1",
]


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def losses(self) -> List[float]:
        """Training loss of every logged iteration, in order."""
        return [line["lm_loss"] for line in parse_iteration_lines(self.stdout)]

    @property
    def learning_rates(self) -> List[float]:
        return [line["learning_rate"] for line in parse_iteration_lines(self.stdout)]

    @property
    def validation_losses(self) -> dict:
        return parse_validation_lines(self.stdout)

    def check(self) -> "Run":
        assert self.returncode == 0, f"training failed ({self.returncode}):\n{self.stdout[-3000:]}\n{self.stderr[-6000:]}"
        return self


def training_command(nproc: int, args: List[str], script: str = "pretrain_gpt.py"):
    """(command, environment) that launch `script` on `nproc` CPU processes: with torchrun's variables, forked from
    one interpreter that imported torch and megatron-core once (fork_launch.py; torchrun itself is tested through
    examples/pretrain_edit.sh and the restart test)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="",
               CUDA_DEVICE_MAX_CONNECTIONS="1")
    command = [sys.executable, str(REPO / "tests" / "fork_launch.py"), str(nproc), str(REPO / script), *args]
    return command, env


class _ForkServer:
    """fork_server.py, started on the first launch and shared by every test of the session."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="fork_server_")
        self.socket_path = os.path.join(self.folder, "socket")
        _, env = training_command(1, [])
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "fork_server.py"), self.socket_path],
                                        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        ready = self.process.stdout.readline().strip()
        assert ready == "ready", f"tests/fork_server.py did not start (it said {ready!r})"
        atexit.register(self.close)

    def launch(self, nproc: int, script: str, args: List[str], env: dict, timeout: int) -> Run:
        with tempfile.TemporaryDirectory() as out, socket.socket(socket.AF_UNIX) as connection:
            request = {"nproc": nproc, "script": str(REPO / script), "argv": list(args), "env": env, "cwd": str(REPO),
                       "stdout": os.path.join(out, "stdout"), "stderr": os.path.join(out, "stderr")}
            connection.connect(self.socket_path)
            connection.sendall(json.dumps(request).encode() + b"\n")
            answers = connection.makefile()
            pid = int(answers.readline())
            connection.settimeout(timeout)
            try:
                status = answers.readline().strip()
            except BaseException as error:  # a timeout, or the test was interrupted: the launch and its ranks go
                os.killpg(pid, signal.SIGKILL)
                if isinstance(error, socket.timeout):
                    raise subprocess.TimeoutExpired([script, *args], timeout) from None
                raise
            stdout, stderr = (Path(request[name]).read_text(errors="replace") for name in ("stdout", "stderr"))
        if not status:  # the launch itself was killed before it could answer
            return Run(-signal.SIGKILL, stdout, stderr + "\nthe launch was killed")
        return Run(int(status), stdout, stderr)

    def close(self):
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


_fork_server = None


def run_training(nproc: int, args: List[str], script: str = "pretrain_gpt.py", timeout: int = 600) -> Run:
    """Launch `script` on `nproc` CPU processes and wait for it: as `training_command` would, but forked from the
    session's fork server, which imported everything once."""
    global _fork_server
    if _fork_server is None:
        _fork_server = _ForkServer()
    _, env = training_command(nproc, args, script)
    return _fork_server.launch(nproc, script, args, env, timeout)
