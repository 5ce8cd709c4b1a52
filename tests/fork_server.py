"""One interpreter for the whole test session that imports torch, megatron-core and the project once (fork_launch.py)
and forks every launch of `launcher.run_training` from there: a tiny run then costs its training, not the ~4 s of
imports that each `python tests/fork_launch.py` pays again.

    python tests/fork_server.py SOCKET     (launcher.py starts it; it prints "ready" once it listens)

A request is one JSON line {nproc, script, argv, env, cwd, stdout, stderr}. For each, the server forks a launch that
becomes a process group of its own (so that a test that times out kills it with its ranks), takes the request's
environment, directory and output files, answers its pid, runs fork_launch's ranks and answers their exit status.
The server, each launch and each rank die with their parent.
"""
import ctypes
import json
import os
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fork_launch  # noqa: E402  (its imports happen here, once)


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run_launch(connection: socket.socket, request: dict) -> None:
    """In the forked launch: become the request's process, run its ranks, answer; never returns."""
    _die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it; the launch waits for its ranks
    os.setpgid(0, 0)
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    connection.sendall(f"{os.getpid()}\n".encode())
    status = 1
    try:
        status = fork_launch.launch(request["nproc"], request["script"], request["argv"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        connection.sendall(f"{status}\n".encode())
        os._exit(0)


def serve(path: str) -> None:
    _die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished launches are reaped by the kernel
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        print("ready", flush=True)
        while True:
            connection, _ = server.accept()
            request = json.loads(connection.makefile().readline())
            if os.fork() == 0:
                server.close()
                _run_launch(connection, request)
            connection.close()


if __name__ == "__main__":
    serve(sys.argv[1])
