import sys
from pathlib import Path

import pytest

# tests import the shared launcher as `launcher`; the project root makes `megatron_edit` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts training (or other) processes; `make test-fast` leaves it out")


@pytest.fixture
def tool_jobs_from_fork_server(monkeypatch):
    """The tools' training jobs (`tools.experiment.run_job`) forked from the session's fork server instead of started
    under torchrun: the same pretrain_gpt.py runs without ~4 s of imports per rank and launch (torchrun itself is
    tested through examples/pretrain_edit.sh and tools/netsim.py)."""
    from launcher import run_training
    from tools import experiment

    def run_job(nproc, argv, timeout=1800):
        run = run_training(nproc, list(argv), timeout=timeout)
        return experiment.check_finished(["pretrain_gpt.py", *argv], run.returncode, run.stdout, run.stderr)

    torchrun_job = experiment.run_job
    for module in list(sys.modules.values()):
        if getattr(module, "run_job", None) is torchrun_job:
            monkeypatch.setattr(module, "run_job", run_job)
