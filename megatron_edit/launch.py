"""torchrun, without its own failure report: `python -m megatron_edit.launch` takes torchrun's flags and does what
it does. When a rank fails, the rank has said why (one `error: ...` line for anything a user can fix, a traceback
for a bug); torchrun's launcher traceback and failure table after that would bury it, so the launch ends with the
failed rank's exit code and, only for a rank killed by a signal (which says nothing), one line naming it. The
example scripts launch with it."""
import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun


def main(argv=None) -> None:
    # torchrun's agent logs "failed (exitcode: N) local_rank: ..." at ERROR level as a rank fails; the rank said it.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torchrun(argv)
    except ChildFailedError as failure:
        rank, first = failure.get_first_failure()
        if first.exitcode < 0:
            name = signal.Signals(-first.exitcode).name
            print(f"error: rank {rank} was killed by {name}, with nothing more to say (out of memory, or killed from "
                  "outside?)", file=sys.stderr, flush=True)
            sys.exit(128 - first.exitcode)
        sys.exit(first.exitcode)


if __name__ == "__main__":
    main()
