"""Start a training script on N CPU processes for a test, the way torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; rank 0 hosts the store), but forked from one interpreter that imported
torch and megatron-core once: on 2 cores those imports are most of what a tiny test run costs, once per rank under
torchrun. As torchrun does, the first rank to fail ends the others, and its exit status is the launch's.

    python tests/fork_launch.py NPROC SCRIPT [ARGS...]
"""
import atexit
import ctypes
import os
import runpy
import signal
import socket
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pretrain_gpt  # noqa: E402,F401  (torch, megatron-core and the project, imported before the fork)
import megatron_edit.dist_checkpoint  # noqa: E402,F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, nproc: int, port: int, script: str, argv: list) -> None:
    """In the forked child: become rank `rank` and run the script as __main__; never returns."""
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the launcher
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.argv = [script, *argv]
    sys.path[0] = str(Path(script).resolve().parent)
    status = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if isinstance(exit_.code, int) or exit_.code is None:
            status = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def launch(nproc: int, script: str, argv: list) -> int:
    """Forks the ranks, waits for them and returns the launch's exit status."""
    port = _free_port()
    children = {}
    for rank in range(nproc):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_rank(rank, nproc, port, script, argv)
        children[pid] = rank
    status = 0
    while children:
        pid, wait_status = os.wait()
        children.pop(pid, None)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 and status == 0:
            status = code if code > 0 else 1
            for other in children:  # the others would wait for the failed rank in a collective
                os.kill(other, signal.SIGKILL)
    return status


if __name__ == "__main__":
    sys.exit(launch(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))
