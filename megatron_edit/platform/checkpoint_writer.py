"""megatron-core's torch_dist writer collects its write results through a multiprocessing Manager, a server process
it spawns at the first save. A rank killed by a signal leaves that server running, orphaned, holding the rank's
stdout and stderr: its launcher's pipes never close (a job under torchrun --max-restarts with piped output never
finishes) and a process leaks per killed rank. Here the server is started first, set to die with its rank.
"""
import ctypes
import multiprocessing
import signal
from multiprocessing.managers import SyncManager

from megatron.core.dist_checkpointing.strategies import filesystem_async

_PR_SET_PDEATHSIG = 1
_manager = {"server": None}


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def tie_writer_to_this_process() -> None:
    """Give megatron-core's writer its results queue from a Manager that dies with this process (Linux). Once."""
    if _manager["server"] is not None or filesystem_async._results_queue is not None:
        return
    server = SyncManager(ctx=multiprocessing.get_context("spawn"))
    server.start(initializer=_die_with_parent)
    _manager["server"] = server
    filesystem_async._results_queue = server.Queue()
