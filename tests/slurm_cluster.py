"""A one-host Slurm cluster for the tests (tests/test_distributed.py): munged, slurmctld and slurmd, with the
config, key, state, spool, logs and sockets in a temporary folder, on free ports; `start` raises Unavailable
(the reason) where Slurm is not installed or does not come up, and stops whatever it started.

Needs Debian's `slurm-wlm` and `munge` (`apt-get install slurm-wlm munge`, what .ci/run tries) and root (slurmd
runs jobs as their user). One node of 2 CPUs (whatever the machine has: config_overrides), proctrack/linuxproc,
task/none: no cgroups needed."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("salloc", "sbatch", "srun", "sinfo", "scontrol", "scancel")


class Unavailable(Exception):
    """Slurm cannot be run here; the message says why."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """This environment without the variables of an enclosing Slurm job (CI may itself run under Slurm)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SALLOC_"))}, **extra}


class Cluster:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.socket = self.folder / "munge" / "munge.socket"
        self.node = socket.gethostname().split(".")[0]
        self.started: list[Path] = []  # pid files of the daemons started, in start order

    @property
    def env(self) -> dict:
        """Variables for salloc / srun / scontrol against this cluster."""
        return clean_env(SLURM_CONF=str(self.conf))

    def run(self, *args, check=True, timeout=60) -> subprocess.CompletedProcess:
        proc = subprocess.run([_which(args[0]) or args[0], *args[1:]], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode:
            raise Unavailable(f"{' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
        return proc

    def _daemon(self, pid_file: Path, *cmd) -> None:
        proc = subprocess.run([_which(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode:
            raise Unavailable(f"{cmd[0]} did not start: {(proc.stderr or proc.stdout).strip()[-500:]}"
                              f"{self._log_tail(cmd[0])}")
        for _ in range(100):  # a daemon writes its pid file after it has forked
            if pid_file.is_file() and pid_file.read_text().strip():
                self.started.append(pid_file)
                return
            time.sleep(0.1)
        raise Unavailable(f"{cmd[0]} wrote no pid file{self._log_tail(cmd[0])}")

    def _log_tail(self, name: str) -> str:
        log = self.folder / "log" / f"{name}.log"
        return f"; {log}: {log.read_text()[-800:]}" if log.is_file() else ""

    def start(self) -> "Cluster":
        for d in ("munge", "state", "spool", "log"):
            (self.folder / d).mkdir(parents=True, exist_ok=True)
        (self.folder / "munge").chmod(0o700)
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        f = self.folder
        self.conf.write_text("\n".join([
            "ClusterName=transfgu-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.socket}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",  # the node's 2 CPUs whatever the machine has
            "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2",
            f"StateSaveLocation={f}/state", f"SlurmdSpoolDir={f}/spool",
            f"SlurmctldPidFile={f}/slurmctld.pid", f"SlurmdPidFile={f}/slurmd.pid",
            f"SlurmctldLogFile={f}/log/slurmctld.log", f"SlurmdLogFile={f}/log/slurmd.log",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        try:
            self._daemon(f / "munge" / "munged.pid", "munged", "--force", f"--socket={self.socket}",
                         f"--key-file={key}", f"--log-file={f}/log/munged.log", f"--pid-file={f}/munge/munged.pid",
                         f"--seed-file={f}/munge/seed")
            self._daemon(f / "slurmctld.pid", "slurmctld", "-f", str(self.conf))
            self._daemon(f / "slurmd.pid", "slurmd", "-f", str(self.conf))
            for _ in range(60):
                state = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
                if state == "idle":
                    return self
                time.sleep(0.5)
            raise Unavailable(f"the node is {state or 'not listed'}, not idle, after 30 s"
                              f"{self._log_tail('slurmd')}{self._log_tail('slurmctld')}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel what still runs, then end the daemons (last started first) and wait until they are gone."""
        if len(self.started) == 3:
            self.run("scancel", "--full", "--user=root", check=False)
        for pid_file in reversed(self.started):
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        self.started.clear()


def start(folder: Path) -> Cluster:
    """A running one-host cluster in `folder`, or Unavailable with the reason."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if not _which(name)]
    if missing:
        raise Unavailable(f"Slurm is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        raise Unavailable("a one-host Slurm cluster needs root (slurmd starts jobs as their user)")
    return Cluster(folder).start()
