"""A real Slurm on localhost for tests: Debian's munge, slurmctld and slurmd, with a generated slurm.conf.

Two emulated nodes (Debian's slurmd runs several daemons on one host with `-N`), one CPU each, all daemons in the
foreground as children of the test, with their own munge socket, ports and state under one directory, so nothing of
the machine's own configuration is read or changed (except installing the packages when they are missing).
"""
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "sinfo"]


def unavailable_reason() -> Optional[str]:
    """Why a local Slurm can't be started here (None when it can): installs the packages if root and missing."""
    if os.geteuid() != 0:
        return "starting munged, slurmctld and slurmd needs root"
    if all(shutil.which(b) for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install Debian's packages"
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-300:]}"
    missing = [b for b in BINARIES if not shutil.which(b)]
    return f"installed, but {missing} are not on PATH" if missing else None


def _free_ports(count: int) -> List[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class LocalSlurm:
    """`with LocalSlurm(directory) as slurm:` a running cluster; `slurm.env` is what sbatch/sinfo need."""

    def __init__(self, directory: Path, nodes: int = 2):
        self.directory, self.nodes = Path(directory), nodes
        self.processes: List[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.directory / "slurm.conf"))

    def _write_config(self) -> None:
        d = self.directory
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        host = socket.gethostname()
        ctld_port, slurmd_port, *node_ports = _free_ports(2 + self.nodes)
        lines = [
            "ClusterName=edit-test", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={d / 'munge.socket'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={d / 'log/slurmctld.log'}", f"SlurmdLogFile={d / 'log/slurmd.%n.log'}",
        ]
        lines += [f"NodeName=node{i + 1} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs=1 RealMemory=1000"
                  for i, port in enumerate(node_ports)]
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        (d / "slurm.conf").write_text("\n".join(lines) + "\n")

    def _start(self, *command: str) -> None:
        log = open(self.directory / "log" / f"{command[0]}.{len(self.processes)}.out", "w")
        self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def __enter__(self) -> "LocalSlurm":
        self._write_config()
        d = self.directory
        self._start("munged", "--foreground", "--force", f"--key-file={d / 'munge.key'}",
                    f"--socket={d / 'munge.socket'}", f"--pid-file={d / 'munged.pid'}",
                    f"--log-file={d / 'log/munged.log'}", f"--seed-file={d / 'munge.seed'}")
        self._wait(lambda: (d / "munge.socket").exists(), "munged did not create its socket")
        self._start("slurmctld", "-D", "-c", "-i")
        for i in range(self.nodes):
            self._start("slurmd", "-D", "-N", f"node{i + 1}")
        self._wait(self._all_idle, f"the {self.nodes} nodes did not become idle")
        return self

    def _all_idle(self) -> bool:
        result = subprocess.run(["sinfo", "-h", "-o", "%D %t"], env=self.env, capture_output=True, text=True)
        return result.stdout.split() == [str(self.nodes), "idle"]

    def _wait(self, ready, message: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-1500:] for p in sorted((self.directory / "log").iterdir()))
                raise RuntimeError(f"local Slurm: {message}\n{logs}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
