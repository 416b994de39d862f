"""A throw-away one-node Slurm cluster on localhost (munged + slurmctld + slurmd), for tests.

Everything lives in one temporary directory: munge key and socket, slurm.conf/cgroup.conf,
state, spool and logs. Clients find it through ``SLURM_CONF``; nothing under /etc is used.
Process tracking is ``proctrack/linuxproc`` and tasks are not confined (``task/none``), so
no cgroup or systemd is needed — only root, which slurmd needs to launch job steps.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")


def why_unavailable() -> str | None:
    """The reason a local cluster cannot be started here, or None when it can."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"Slurm/munge not installed (missing {', '.join(missing)}); .ci/run installs slurm-wlm and munge with apt as root"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root (slurmd launches job steps as the submitting user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, cpus: int) -> str:
    ctld_port, d_port = _free_port(), _free_port()
    return f"""\
ClusterName=memlmci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
SchedulerParameters=sched_interval=2
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root, self.cpus = Path(root), cpus
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(_conf(self.root, self.cpus))
        # Read by slurmd even with task/none; nothing is confined, so autodetection is harmless.
        (self.root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        m = self.root / "munge"
        log = open(self.root / "log" / "daemons.out", "ab")
        self._procs.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
             f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
            env=self.env, stdout=log, stderr=log,
        ))
        deadline = time.monotonic() + 20
        while not (m / "munge.socket").exists() and time.monotonic() < deadline and self._procs[0].poll() is None:
            time.sleep(0.1)
        self._procs.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(self.conf)], env=self.env, stdout=log, stderr=log))
        self._procs.append(subprocess.Popen(["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)], env=self.env, stdout=log, stderr=log))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return
            if any(p.poll() is not None for p in self._procs):
                break
            time.sleep(0.5)
        tail = self.logs()
        self.stop()
        raise RuntimeError(f"local Slurm did not come up:\n{tail}")

    def stop(self) -> None:
        # Jobs first, while slurmd still runs to end their step daemons, then the daemons.
        subprocess.run(["scancel", "--full", "--quiet", "-u", "root"], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.5)
        for p in reversed(self._procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self._procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self._procs.clear()

    def logs(self, lines: int = 40) -> str:
        out = []
        for name in ("log/daemons.out", "log/slurmctld.log", "log/slurmd.log", "munge/munged.log"):
            p = self.root / name
            if p.is_file():
                out.append(f"== {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # -- clients -------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        env = {**(kw.pop("env", None) or self.env), "SLURM_CONF": str(self.conf)}
        proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        out = self.run("sbatch", "--parsable", *args, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        fields = {}
        for tok in out.split():
            k, _, v = tok.partition("=")
            fields[k] = v
        return fields

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout: float = 240.0, release_requeued: bool = False) -> dict[str, str]:
        """Poll until the job reaches one of ``states``. Slurm holds a requeued job for about two
        minutes (its BeginTime); ``release_requeued`` makes it eligible at once, as a test may."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if release_requeued and info.get("JobState") == "PENDING" and info.get("Restarts", "0") != "0":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.5)
