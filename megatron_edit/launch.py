"""torchrun, without its own failure report: `python -m megatron_edit.launch` takes torchrun's flags and does what
it does. When a rank fails, the rank has said why (one `error: ...` line for anything a user can fix, a traceback
for a bug); torchrun's launcher traceback and failure table after that would bury it, so the launch ends with the
failed rank's exit code and, only for a rank killed by a signal (which says nothing), one line naming it. The
example scripts launch with it.

It also keeps torchrun's own listening sockets (its rendezvous and the workers' store) on the training script's
`--sync-interface` (network.py), and advertises that address to the workers (`--local-addr`)."""
import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, main as torchrun

from megatron_edit import network


def script_flag(script_args, flag: str):
    """The value of `flag` among the training script's arguments (`--flag V` or `--flag=V`), else None."""
    for i, arg in enumerate(script_args):
        if arg == flag and i + 1 < len(script_args):
            return script_args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def master_host(args) -> str:
    """Where torchrun's nodes meet: this machine for --standalone, else the rendezvous or master address."""
    if args.standalone:
        return "127.0.0.1"
    if args.rdzv_backend == "static":
        return args.master_addr
    return args.rdzv_endpoint.rsplit(":", 1)[0].strip("[]") if args.rdzv_endpoint else args.master_addr


def bind_to_sync_interface(argv):
    """Bind this agent's stores to the script's --sync-interface; returns argv with --local-addr on it."""
    args = get_args_parser().parse_args(argv)
    interface = network.listen_interface(script_flag(args.training_script_args, "--sync-interface"), master_host(args))
    network.bind_stores(interface)
    network.use_interface(interface)
    return argv if args.local_addr else ["--local-addr", interface.address, *argv]


def main(argv=None) -> None:
    argv = bind_to_sync_interface(sys.argv[1:] if argv is None else list(argv))
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
