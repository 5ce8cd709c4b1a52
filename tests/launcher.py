"""The one way tests start training: real processes under torchrun on CPU with gloo, read back from the log."""
import dataclasses
import os
import subprocess
import sys
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


def run_training(nproc: int, args: List[str], script: str = "pretrain_gpt.py", timeout: int = 600) -> Run:
    """Launch `script` on `nproc` CPU processes and wait for it."""
    command, env = training_command(nproc, args, script)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return Run(result.returncode, result.stdout, result.stderr)
