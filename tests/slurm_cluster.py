"""A real one-node Slurm cluster on this machine, for the Slurm tests and for trying the templates.

    python tests/slurm_cluster.py install  # only install the Debian packages (a CI setup step)
    python tests/slurm_cluster.py start    # install if needed, start, wait until the node is idle
    python tests/slurm_cluster.py status
    python tests/slurm_cluster.py stop

`start` prints `export SLURM_CONF=...`: Slurm's commands (sbatch, squeue, ...) find this cluster
through that variable; nothing under /etc/slurm is written.

What it does: installs Debian's `slurmctld slurmd slurm-client munge` with apt-get when they are
missing (root only), starts munged unless a working one answers already, writes a slurm.conf for
one node (this machine's real CPU count and memory, one partition, no cgroups, requeue allowed,
short job-record lifetime, credentials that expire quickly so requeued jobs restart within
seconds) into a state directory, starts slurmctld and slurmd as daemons (no systemd) and waits
until `sinfo` shows the node idle. Daemons run on their own ports, so a system Slurm on the same
machine is left alone.

It is idempotent: a cluster from an earlier `start` with the same config is reused as it is; one
with another config is stopped (by the pids in its pidfiles) and started again. `stop` ends only
the daemons recorded in the state directory (munged only if this helper started it).

The state directory is $LAUNCHER_SLURM_DIR, default /tmp/launcher-slurm.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "munged", "munge", "unmunge")
PARTITION = "debug"
CTLD_PORT = 16817  # not Slurm's default 6817/6818, so a system cluster on this machine is untouched
SLURMD_PORT = 16818
CRED_EXPIRE_S = 5  # a requeued job waits cred_expire + 1 s before it may start again (default 120)
SCHED_INTERVAL_S = 1  # the main scheduling loop (default 60 s) is what starts an eligible requeued job
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_KEY = Path("/etc/munge/munge.key")


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (no apt-get, or not root)."""


@dataclass(frozen=True)
class Cluster:
    state_dir: Path
    node: str
    cpus: int
    partition: str = PARTITION

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """The current environment plus SLURM_CONF pointing at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster; output captured as text."""
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc


def default_state_dir() -> Path:
    return Path(os.environ.get("LAUNCHER_SLURM_DIR", "/tmp/launcher-slurm"))


# ---------------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------------


def missing_binaries() -> list[str]:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    return [b for b in BINARIES if shutil.which(b, path=search) is None]


def install() -> float:
    """Install the Debian packages if any binary is missing; returns the seconds spent (0 if none)."""
    missing = missing_binaries()
    if not missing:
        return 0.0
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and installing needs root")
    started = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # stale or missing package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, check=False)
        proc = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    still_missing = missing_binaries()
    if still_missing:
        raise RuntimeError(f"installed {' '.join(PACKAGES)} but {', '.join(still_missing)} are still missing")
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None, name: str) -> bool:
    """True if `pid` runs a program called `name` (guards against a recycled pid)."""
    if pid is None:
        return False
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm == name[:15]


def _stop_pid(pid: int | None, name: str, timeout: float = 10.0) -> None:
    if not _alive(pid, name):
        return
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid, name):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def _wait_for(check, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        if cred.returncode != 0:
            return False
        back = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return back.returncode == 0


def _start_munge(state_dir: Path) -> None:
    """Start munged (as the `munge` user, default socket) unless a working one answers."""
    if _munge_works():
        return
    MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
    if not MUNGE_KEY.exists():
        subprocess.run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)], check=True, capture_output=True)
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o600)
    pid_file = MUNGE_SOCKET.parent / "munged.pid"
    if _alive(_read_pid(pid_file), "munged"):  # running but not answering: replace it
        _stop_pid(_read_pid(pid_file), "munged")
    subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True, capture_output=True)
    _wait_for(_munge_works, 10, "munged to answer")
    (state_dir / "munged.pid.ours").write_text(str(_read_pid(pid_file)))


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(1, int(line.split()[1]) // 1024 - 512)  # leave some for the OS, as slurmd -C does
    return 1024


def slurm_conf(state_dir: Path, node: str, cpus: int, memory_mb: int) -> str:
    d = state_dir
    return f"""\
# One-node test cluster written by tests/slurm_cluster.py.
ClusterName=launchertest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire={CRED_EXPIRE_S}
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval={SCHED_INTERVAL_S}
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
MinJobAge=60
KillWait=5
InactiveLimit=0
Waittime=0
SlurmdTimeout=300
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


# ---------------------------------------------------------------------------------------------
# Start / stop
# ---------------------------------------------------------------------------------------------


def _node_state(cluster: Cluster) -> str:
    proc = cluster.run("sinfo", "-h", "-N", "-n", cluster.node, "-o", "%T", check=False, timeout=10)
    return proc.stdout.strip().lower() if proc.returncode == 0 else ""


def _daemons_running(state_dir: Path) -> bool:
    return (_alive(_read_pid(state_dir / "slurmctld.pid"), "slurmctld")
            and _alive(_read_pid(state_dir / "slurmd.pid"), "slurmd"))


def _stop_daemons(state_dir: Path) -> None:
    _stop_pid(_read_pid(state_dir / "slurmd.pid"), "slurmd")
    _stop_pid(_read_pid(state_dir / "slurmctld.pid"), "slurmctld")


def start(state_dir: Path | None = None) -> tuple[Cluster, bool]:
    """Install if needed and start (or reuse) the cluster; returns it and whether it was started now.

    Raises SlurmUnavailable when Slurm is missing and cannot be installed, RuntimeError when the
    daemons do not come up (with the tail of their log).
    """
    state_dir = (state_dir or default_state_dir()).resolve()
    install()
    if os.geteuid() != 0:
        raise SlurmUnavailable("this cluster runs its daemons as root (SlurmUser=root); run as root")
    state_dir.mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", node):
        raise RuntimeError(f"hostname {node!r} is not usable as a Slurm node name")
    cluster = Cluster(state_dir=state_dir, node=node, cpus=os.cpu_count() or 1)
    conf = slurm_conf(state_dir, node, cluster.cpus, _memory_mb())

    _start_munge(state_dir)
    same_config = cluster.conf.exists() and cluster.conf.read_text() == conf
    if same_config and _daemons_running(state_dir) and _node_state(cluster) in ("idle", "mixed", "allocated"):
        return cluster, False
    _stop_daemons(state_dir)

    for sub in ("ctld", "spool"):
        shutil.rmtree(state_dir / sub, ignore_errors=True)
        (state_dir / sub).mkdir()
    for log in ("slurmctld.log", "slurmd.log"):
        (state_dir / log).unlink(missing_ok=True)
    cluster.conf.write_text(conf)

    env = cluster.env()
    # Without -D both daemonize and write their pidfiles; -c: start with an empty job list.
    subprocess.run(["slurmctld", "-c", "-f", str(cluster.conf)], env=env, check=True, capture_output=True)
    _wait_for(lambda: cluster.run("scontrol", "ping", check=False, timeout=10).returncode == 0, 20,
              "slurmctld to answer", state_dir / "slurmctld.log")
    subprocess.run(["slurmd", "-f", str(cluster.conf)], env=env, check=True, capture_output=True)
    _wait_for(lambda: _node_state(cluster) in ("idle", "mixed", "allocated"), 30,
              f"node {node} to become idle", state_dir / "slurmd.log")
    return cluster, True


def stop(state_dir: Path | None = None) -> None:
    """Stop the daemons recorded in the state directory (and munged if this helper started it)."""
    state_dir = (state_dir or default_state_dir()).resolve()
    _stop_daemons(state_dir)
    ours = state_dir / "munged.pid.ours"
    if ours.exists():
        _stop_pid(_read_pid(ours), "munged")
        ours.unlink()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("install", "start", "stop", "status"):
        print("usage: python tests/slurm_cluster.py install|start|stop|status", file=sys.stderr)
        return 2
    state_dir = default_state_dir()
    if argv[0] == "install":
        spent = install()
        print(f"slurm installed ({spent:.1f} s)" if spent else "slurm already installed", file=sys.stderr)
    elif argv[0] == "start":
        t0 = time.monotonic()
        spent_installing = install()
        cluster, started = start(state_dir)
        total = time.monotonic() - t0
        how = "started" if started else "already running"
        print(f"slurm cluster {how}: node {cluster.node}, {cluster.cpus} CPUs, partition {cluster.partition} "
              f"(install {spent_installing:.1f} s, total {total:.1f} s)", file=sys.stderr)
        print(f"export SLURM_CONF={cluster.conf}")
    elif argv[0] == "stop":
        stop(state_dir)
        print("slurm cluster stopped", file=sys.stderr)
    else:
        running = _daemons_running(state_dir.resolve())
        print(f"slurm cluster in {state_dir}: {'running' if running else 'not running'}")
        return 0 if running else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
