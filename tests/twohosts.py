"""Two hosts on one machine, for tests (issue #26): two network namespaces on a bridge, and
a two-node SLURM across them. BUILD_NOTES.md ("Two hosts on one machine") says how it
works and what it does not prove.

Every name here starts with `cd26` (namespaces, bridge, veths, host names, daemon binaries)
and the SLURM uses its own ports, munge key and socket, spool and state under one scratch
folder, so nothing collides with the single-node SLURM of tests/test_slurm.py
(`pgrep -x slurmctld` does not see ours) or with anything else on the machine. /etc/hosts
lines added here end with MARK and are removed at teardown. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NET = "10.77.26"  # a private /24 of its own
HOSTS = {"cd26nodea": f"{NET}.1", "cd26nodeb": f"{NET}.2"}
BRIDGE, BRIDGE_ADDR = "cd26br0", f"{NET}.254"
CONTROLLER = "cd26ctl"  # slurmctld's host name, on the bridge address (root namespace)
MARK = "# cifar_dist tests/twohosts.py"
SLURM_PORTS = (6927, 6928)  # slurmctld, slurmd: not the single-node SLURM's 6817/6818
HOSTS_FILE = Path("/etc/hosts")


def unavailable() -> str | None:
    """Why the harness cannot run here, or None."""
    if sys.platform != "linux":
        return "two network namespaces need Linux"
    if os.geteuid() != 0:
        return "two network namespaces need root"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"no `{tool}` (iproute2 / util-linux)"
    return None


def run(*argv, check=True, timeout=30):
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")
    return r


def _veths(i: int) -> tuple[str, str]:
    return f"cd26v{i}h", f"cd26v{i}n"  # bridge side, namespace side


def kill_pids(pids, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace` seconds."""
    pids = [p for p in pids if p and p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()
                    and not Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"]
            time.sleep(0.1)


class Network:
    """HOSTS as namespaces named like the hosts, joined by BRIDGE; no route out."""

    def up(self) -> "Network":
        self.down()  # leftovers of a session that was killed
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        for i, (host, addr) in enumerate(HOSTS.items()):
            outer, inner = _veths(i)
            run("ip", "netns", "add", host)
            run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            run("ip", "link", "set", outer, "master", BRIDGE)
            run("ip", "link", "set", outer, "up")
            run("ip", "link", "set", inner, "netns", host)
            run("ip", "-n", host, "addr", "add", f"{addr}/24", "dev", inner)
            run("ip", "-n", host, "link", "set", inner, "up")
            run("ip", "-n", host, "link", "set", "lo", "up")
        lines = [f"{addr} {host} {MARK}" for host, addr in HOSTS.items()]
        lines.append(f"{BRIDGE_ADDR} {CONTROLLER} {MARK}")
        text = HOSTS_FILE.read_text()
        HOSTS_FILE.write_text(text + ("" if text.endswith("\n") else "\n") + "\n".join(lines) + "\n")
        return self

    @staticmethod
    def command(host: str, argv) -> list[str]:
        """argv run on `host`: its network stack, its host name. Not `ip netns exec`, which
        remounts /sys (slurmd then finds no cgroup filesystem)."""
        return ["nsenter", f"--net=/run/netns/{host}", "unshare", "--uts", "sh", "-c",
                f'hostname {host} && exec "$@"', "sh", *map(str, argv)]

    @staticmethod
    def cut(host: str) -> None:
        """The host drops off the network (no reset is sent: its peers hear silence)."""
        run("ip", "link", "set", _veths(list(HOSTS).index(host))[0], "down")

    @staticmethod
    def pids(host: str) -> list[int]:
        r = run("ip", "netns", "pids", host, check=False)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    def down(self) -> None:
        """Every process in the namespaces, the namespaces, the bridge, the /etc/hosts lines."""
        for host in HOSTS:
            kill_pids(self.pids(host))
            run("ip", "netns", "del", host, check=False)
        for i in range(len(HOSTS)):
            run("ip", "link", "del", _veths(i)[0], check=False)
        run("ip", "link", "del", BRIDGE, check=False)
        if HOSTS_FILE.exists():
            text = HOSTS_FILE.read_text()
            kept = [line for line in text.splitlines(keepends=True) if not line.rstrip().endswith(MARK)]
            if "".join(kept) != text:
                HOSTS_FILE.write_text("".join(kept))
        # The first `ip netns add` bind-mounts /run/netns onto itself: undo it once empty.
        if not run("ip", "netns", "list", check=False).stdout.strip():
            run("umount", "/run/netns", check=False)


SLURM_CONF = """\
ClusterName=cd26
SlurmctldHost={ctl}({ctl_addr})
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
MinJobAge=600
KillWait=10
{nodes}
PartitionName=cd26 Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class Slurm:
    """slurmctld (root namespace, on the bridge) and one slurmd per host, with a munged of
    their own; binaries copied under cd26-* names. `env` is what sbatch/scontrol need."""

    def __init__(self, network: Network):
        self.network = network
        self.root = Path(tempfile.mkdtemp(prefix="cifar_dist_cd26_", dir="/tmp"))
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []

    def _bin(self, name: str) -> str:
        path = self.root / "bin" / f"cd26-{name}"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            shutil.copy2(shutil.which(name) or f"/usr/sbin/{name}", path)
        return str(path)

    def _start(self, argv, log: str, **kw) -> subprocess.Popen:
        out = open(self.root / "log" / log, "ab")  # noqa: SIM115 - kept open by the daemon
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **kw)
        out.close()
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 60) -> "Slurm":
        os.chmod(self.root, 0o755)  # munged refuses a socket folder others cannot enter
        for sub in ("log", "run", "state", "spool", "munge"):
            (self.root / sub).mkdir()
        for host in HOSTS:
            (self.root / "spool" / host).mkdir()
        munge = self.root / "munge"
        (munge / "munge.key").write_bytes(os.urandom(1024))
        shutil.chown(munge, "munge", "munge")
        shutil.chown(munge / "munge.key", "munge", "munge")
        os.chmod(munge / "munge.key", 0o400)
        os.chmod(munge, 0o755)
        self._start([self._bin("munged"), "-F", f"--socket={munge}/munge.socket",
                     f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
                     f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"],
                    "munged.out", user="munge", group="munge")
        self._wait(lambda: (munge / "munge.socket").exists(), 20, "munged did not start")
        nodes = "\n".join(f"NodeName={h} NodeAddr={a} NodeHostname={h} CPUs={os.cpu_count()} "
                          "RealMemory=1000 State=UNKNOWN" for h, a in HOSTS.items())
        self.conf.write_text(SLURM_CONF.format(
            ctl=CONTROLLER, ctl_addr=BRIDGE_ADDR, ctl_port=SLURM_PORTS[0], d_port=SLURM_PORTS[1],
            root=self.root, nodes=nodes, names=",".join(HOSTS)))
        # slurmctld checks that it runs on SlurmctldHost: its own host name, same network.
        self._start(["unshare", "--uts", "sh", "-c", f'hostname {CONTROLLER} && exec "$@"', "sh",
                     self._bin("slurmctld"), "-D", "-c", "-f", self.conf], "slurmctld.out",
                    env=self.env)
        for host in HOSTS:
            self._start(self.network.command(host, [self._bin("slurmd"), "-D", "-N", host,
                                                    "-f", self.conf]),
                        f"slurmd-{host}.out", env=self.env)
        self._wait(lambda: self.idle(), timeout, "the two nodes are not idle")
        return self

    def idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                           env=self.env, timeout=30)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return set(states) == set(HOSTS) and all(s.startswith("idle") for s in states.values())

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        raise RuntimeError(f"{what} (logs in {self.root / 'log'}):\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def scontrol(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True,
                              env=self.env, timeout=30)

    def stop(self) -> None:
        """Jobs (every process in the hosts' namespaces: slurmstepd, tasks), the daemons by
        PID, then the scratch folder."""
        for host in HOSTS:
            kill_pids(self.network.pids(host))
        kill_pids([p.pid for p in self.procs if p.poll() is None])
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def task_pid(host: str, job_id: str, network: Network) -> int | None:
    """The cifar_dist worker of SLURM job `job_id` running on `host`."""
    for pid in network.pids(host):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cifar_dist.main" in cmdline and f"SLURM_JOB_ID={job_id}".encode() in environ:
            return pid
    return None


def worker_pid(host: str, network: Network) -> int | None:
    """The cifar_dist worker started on `host` by a test (TF_CONFIG, no SLURM)."""
    for pid in network.pids(host):
        try:
            if re.search(rb"cifar_dist\.main", Path(f"/proc/{pid}/cmdline").read_bytes()):
                return pid
        except OSError:
            continue
    return None
