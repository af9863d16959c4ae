"""Start and stop a real Slurm cluster on this machine, for the tests in tests/test_slurm.py.

Everything lives in one temporary folder: a generated munge key and munged's socket, a generated
slurm.conf (loopback, free ports, state and spool directories in the folder), and the logs of
munged, slurmctld and slurmd. Nothing under /etc or /run is used, so the tests never touch a
system Slurm. The daemons run in the foreground as children of this process and are stopped by pid.

    cluster = SlurmCluster(tmp_dir)
    cluster.start()                 # munged, slurmctld, slurmd; waits until the node is idle
    cluster.env()                   # environment for sbatch/squeue/scontrol (SLURM_CONF)
    cluster.job(job_id)             # `scontrol show job` as a dict
    cluster.stop()                  # cancels jobs, stops the daemons by pid

Manual use (start a cluster and keep it until Ctrl-C):
    .venv/bin/python -m tests.slurm_cluster /tmp/slurm-dev
then, in another shell, `export SLURM_CONF=/tmp/slurm-dev/slurm.conf` and use sbatch/squeue.

`nodes` > 1 puts each slurmd in its own network namespace (see `SlurmCluster.__init__`); that needs
`ip netns` (iproute2) and a kernel that allows it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.multiproc import free_port

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")


def unavailable_reason() -> str | None:
    """None when a local cluster can be started here, else the reason it cannot (for a skip)."""
    if os.environ.get("RECIPES_SLURM_UNAVAILABLE"):  # set by .ci/run when installing Slurm failed
        return os.environ["RECIPES_SLURM_UNAVAILABLE"]
    missing = [d for d in DAEMONS if shutil.which(d, path=_path()) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not found; "
                "apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd starts jobs as their user)"
    return None


def netns_unavailable_reason() -> str | None:
    """None when this machine can make network namespaces with veth pairs (for several nodes)."""
    for tool in ("ip", "nsenter", "unshare", "mount", "hostname"):
        if shutil.which(tool, path=_path()) is None:
            return f"{tool} not found (iproute2/util-linux) for a cluster of network namespaces"
    probe, env = f"recipes-probe{os.getpid()}", {**os.environ, "PATH": _path()}
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return f"cannot create a network namespace here (ip netns add: {out.stderr.strip()})"
    try:
        out = subprocess.run(["ip", "link", "add", f"rcpprobe{os.getpid() % 1000}", "type", "veth", "peer", "name",
                              f"rcpprobe{os.getpid() % 1000}n"], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            return f"cannot create a veth pair here (ip link add: {out.stderr.strip()})"
        subprocess.run(["ip", "link", "del", f"rcpprobe{os.getpid() % 1000}"], capture_output=True, env=env)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, env=env)
    return None


def _path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def node_topology() -> dict[str, str]:
    """What `slurmd -C` reports for this machine (CPUs, sockets, cores, threads, memory)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, env={**os.environ, "PATH": _path()},
                         check=True).stdout
    first = out.splitlines()[0]
    fields = dict(item.split("=", 1) for item in first.split() if "=" in item)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return {k: fields[k] for k in keep if k in fields}


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, root: Path, cluster_name: str = "recipes", netns_nodes: int = 0, cred_expire: int = 5):
        """A one-node cluster (NodeName=localhost on 127.0.0.1). With `netns_nodes` = n > 0 there
        are n nodes instead, node<i>, each slurmd in its own network namespace (address
        10.77.<k>.<i+2>), UTS namespace (hostname node<i>) and mount namespace (an /etc/hosts that
        names the nodes), like separate machines sharing this file system; veth pairs and a bridge
        join them to this host (10.77.<k>.1), where slurmctld listens. k is derived from the pid so
        that two test sessions on one machine do not collide."""
        self.root = Path(root)
        self.name = cluster_name
        self.netns_nodes = netns_nodes
        self.cred_expire = cred_expire
        self.procs: dict[str, subprocess.Popen] = {}
        self.netns: list[str] = []
        self.links: list[str] = []
        self.net_id = 20 + os.getpid() % 200
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.ctld_port = self.slurmd_port = 0

    # ---- environment ---------------------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        e = dict(os.environ if base is None else base)
        e["SLURM_CONF"] = str(self.conf)
        e["PATH"] = os.pathsep.join([e.get("PATH", ""), "/usr/sbin", "/sbin"])
        for k in list(e):  # a test run inside a Slurm job must not leak that job into this cluster
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del e[k]
        return e

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and out.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        return out

    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(self.netns_nodes)] if self.netns_nodes else ["localhost"]

    # ---- start ---------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> SlurmCluster:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", "--force", f"--keyfile={key}"], check=True, capture_output=True,
                       env={**os.environ, "PATH": _path()})
        os.chmod(key, 0o600)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        check = subprocess.run(f"munge -n -S {self.munge_socket} | unmunge -S {self.munge_socket}", shell=True,
                               capture_output=True, text=True, env={**os.environ, "PATH": _path()})
        if check.returncode != 0:
            raise SlurmError(f"munge round trip failed: {check.stderr.strip()}")

        self.ctld_port, self.slurmd_port = free_port(), free_port()
        ctld_addr = "127.0.0.1"
        if self.netns_nodes:
            ctld_addr = self._setup_netns()
        self.conf.write_text(self._slurm_conf(ctld_addr))
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._wait(lambda: "UP" in self.run("scontrol", "ping", check=False).stdout, timeout,
                   "slurmctld did not answer scontrol ping")
        for name in self.node_names:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
            cmd = ["slurmd", "-D", "-N", name, "-f", str(self.conf)]
            if self.netns_nodes:
                # (not `ip netns exec`: it also remounts /sys, hiding the cgroup mounts slurmd wants)
                cmd = ["nsenter", f"--net=/run/netns/{self._ns(name)}", "unshare", "--mount", "--uts", "sh", "-c",
                       f'mount --bind {self.root / "hosts"} /etc/hosts && hostname {name} && exec "$@"', "sh", *cmd]
            self._spawn(f"slurmd-{name}", cmd)
        self._wait(self._nodes_idle, timeout, "the node(s) did not become idle")

    def _slurm_conf(self, ctld_addr: str) -> str:
        r = self.root
        topo = node_topology()
        topo_s = " ".join(f"{k}={v}" for k, v in topo.items())
        if self.netns_nodes:
            node_lines = [f"NodeName={n} NodeAddr={self._addr(i + 2)} {topo_s} State=UNKNOWN"
                          for i, n in enumerate(self.node_names)]
        else:
            node_lines = [f"NodeName=localhost NodeAddr=127.0.0.1 {topo_s} State=UNKNOWN"]
        return "\n".join([
            f"ClusterName={self.name}",
            f"SlurmctldHost=localhost({ctld_addr})",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (120 s by
            # default); the tests want the restart promptly.
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",  # no cgroups in a container sandbox
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # a requeued job starts within a second of being eligible (not at the next 30-60 s pass)
            "SchedulerParameters=bf_interval=1,sched_interval=1",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "JobRequeue=1",
            "ReturnToService=2",
            "KillWait=30",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            "SlurmctldTimeout=60",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            *node_lines,
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return all(states.get(n, "").startswith("idle") for n in self.node_names)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.console", "ab")
        if name == "slurmctld":
            (self.root / "plugstack.conf").write_text("")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), start_new_session=True)
        log.close()

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with status {p.returncode} while starting; "
                                     f"see {self.root / 'log'}: {self.log_tail(name)}")
            if ok():
                return
            time.sleep(0.2)
        raise SlurmError(f"{what} within {timeout:.0f}s; see {self.root / 'log'}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        texts = []
        for f in sorted((self.root / "log").glob(f"{name}*")):
            texts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(texts)

    # ---- network namespaces (several nodes) ---------------------------------------------------
    def _ns(self, node: str) -> str:
        return f"recipes{self.net_id}-{node}"

    def _addr(self, host: int) -> str:
        return f"10.77.{self.net_id}.{host}"

    def _setup_netns(self) -> str:
        (self.root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"{self._addr(i + 2)} {n}\n" for i, n in enumerate(self.node_names)))
        bridge = f"rcpbr{self.net_id}"
        self._ip("link", "add", bridge, "type", "bridge")
        self.links.append(bridge)
        self._ip("addr", "add", f"{self._addr(1)}/24", "dev", bridge)
        self._ip("link", "set", bridge, "up")
        for i, name in enumerate(self.node_names):
            ns, host_end, ns_end = self._ns(name), f"rcp{self.net_id}h{i}", f"rcp{self.net_id}n{i}"
            self._ip("netns", "add", ns)
            self.netns.append(ns)
            self._ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            self.links.append(host_end)
            self._ip("link", "set", host_end, "master", bridge)
            self._ip("link", "set", host_end, "up")
            self._ip("link", "set", ns_end, "netns", ns)
            self._ip("-n", ns, "addr", "add", f"{self._addr(i + 2)}/24", "dev", ns_end)
            self._ip("-n", ns, "link", "set", ns_end, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        return self._addr(1)

    def _ip(self, *args: str) -> None:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, env={**os.environ, "PATH": _path()})
        if out.returncode != 0:
            raise SlurmError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")

    # ---- jobs ----------------------------------------------------------------------------------
    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, RestartCnt, ExitCode, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.strip()
        # values never contain spaces except Command/WorkDir/StdOut paths, which the tests do not use
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int | str, until, timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Poll `scontrol show job` until `until(info)` is true; the last info on timeout raises."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(poll)
        raise SlurmError(f"job {job_id} did not reach the expected state within {timeout:.0f}s: "
                         f"JobState={info.get('JobState')} Reason={info.get('Reason')} "
                         f"RestartCnt={info.get('Restarts')}")

    # ---- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, then stop slurmd(s), slurmctld and munged by pid. Safe to call twice."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
                if ids:
                    self.run("scancel", *ids, check=False, timeout=10)
                    deadline = time.time() + 40
                    while time.time() < deadline and self.run("squeue", "-h", "-t", "R,CG", "-o", "%i", check=False,
                                                              timeout=10).stdout.split():
                        time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs.clear()
        for link in reversed(self.links):
            subprocess.run(["ip", "link", "del", link], capture_output=True, env={**os.environ, "PATH": _path()})
        for ns in reversed(self.netns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, env={**os.environ, "PATH": _path()})
        self.links.clear()
        self.netns.clear()


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "/tmp/slurm-dev").resolve()
    nodes = int(argv[1]) if len(argv) > 1 else 0
    reason = unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    cluster = SlurmCluster(root, netns_nodes=nodes).start()
    print(f"cluster up: export SLURM_CONF={cluster.conf}   (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
