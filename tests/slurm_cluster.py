"""A real one-node Slurm cluster on this machine, for the sbatch-script tests.

Installs Debian's slurm + munge when missing (as root), writes every config, socket, pid, state and
log file into one temp folder, starts munged, slurmctld and slurmd by hand (there is no systemd),
and on exit stops only the daemons whose pid files it wrote.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


class SlurmUnavailable(RuntimeError):
    pass


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm is not installed and this is not a root Debian machine (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    r = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr.strip()[-300:]}")


def _node_line() -> str:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("NodeName="))
    return line


class SlurmCluster:
    """``with SlurmCluster(tmp) as c: c.sbatch(...)``; ``c.env`` carries SLURM_CONF for clients."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.env = dict(os.environ)
        self._pidfiles: list[Path] = []

    # -------------------------------------------------------------- start / stop
    def __enter__(self) -> SlurmCluster:
        ensure_installed()
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)
        os.chmod(r / "munge", 0o755)  # clients need o+x on the socket's folder
        key = r / "munge" / "munge.key"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        os.chmod(key, 0o600)
        sock = r / "munge" / "munge.socket.2"
        self._start(
            [
                "munged",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={r / 'munge' / 'munged.pid'}",
                f"--log-file={r / 'log' / 'munged.log'}",
                f"--seed-file={r / 'munge' / 'seed'}",
                "--force",
            ],
            r / "munge" / "munged.pid",
        )
        host = socket.gethostname().split(".")[0]
        node = _node_line()
        nodename = node.split()[0].split("=", 1)[1]
        conf = r / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "ClusterName=wmtest",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={sock},cred_expire=10",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerParameters=bf_interval=1,sched_interval=2",
                    "SlurmdParameters=config_overrides",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "MailProg=/bin/true",
                    "MinJobAge=300",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "SlurmctldPort=16817",
                    "SlurmdPort=16818",
                    node,
                    f"PartitionName=debug Nodes={nodename} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self.env["SLURM_CONF"] = str(conf)
        self._start(["slurmctld", "-c", "-f", str(conf)], r / "slurmctld.pid")
        self._start(["slurmd", "-f", str(conf)], r / "slurmd.pid")
        self._wait_idle(timeout=30)
        return self

    def _start(self, cmd: list[str], pidfile: Path) -> None:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            self.__exit__(None, None, None)
            raise SlurmUnavailable(f"{cmd[0]} did not start: {r.stderr.strip()[-300:]}")
        for _ in range(50):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.1)
        self._pidfiles.append(pidfile)

    def _wait_idle(self, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end:
            out = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"node never became idle; see {self.root / 'log'}")

    def __exit__(self, *exc) -> None:
        for pidfile in reversed(self._pidfiles):
            with contextlib.suppress(Exception):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        time.sleep(1.0)
        for pidfile in reversed(self._pidfiles):
            with contextlib.suppress(Exception):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        self._pidfiles.clear()

    # -------------------------------------------------------------- client helpers
    def run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check)

    def sbatch(self, args: list[str], env: dict[str, str] | None = None) -> int:
        r = subprocess.run(
            ["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, capture_output=True, text=True
        )
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> dict[str, str]:
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        fields = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def wait(
        self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    ) -> dict[str, str]:
        end = time.time() + timeout
        last: dict[str, str] = {}
        while time.time() < end:
            last = self.job_state(job_id)
            if last.get("JobState") in states:
                return last
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} still {last.get('JobState')} after {timeout}s; logs in {self.root / 'log'}")

    def wait_array(self, job_id: int, timeout: float) -> list[dict[str, str]]:
        end = time.time() + timeout
        while time.time() < end:
            r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
            rows = []
            for line in r.stdout.strip().splitlines():
                rows.append(dict(t.split("=", 1) for t in line.split() if "=" in t))
            if rows and all(row.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for row in rows):
                return rows
            time.sleep(1.0)
        raise TimeoutError(f"array {job_id} did not finish in {timeout}s")
