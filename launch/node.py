"""This node's ranks of a job: start them, wait, stop the rest when one fails.

`python -m launch.node --world_info=B64 --node_rank=N --master_addr=A --master_port=P -- CMD...` does what
DeepSpeed's per-node launcher (`deepspeed.launcher.launch --no_local_rank`) does for a job, with the same
world_info and the same environment for each rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT,
CROSS_RANK/CROSS_SIZE, LOCAL_SIZE, CUDA_VISIBLE_DEVICES), but without importing torch or DeepSpeed and
without polling. Why our own: DeepSpeed's imports torch before it starts a rank (~1.5-2 s on the critical
path of every launch, each rank then imports torch again) and looks at its ranks once a second, so a
job ends up to a second after its last rank; on a small machine that was ~2.5 s of an ~7 s launch.
It needs nothing of DeepSpeed's: the ranks are plain processes that read their place from the environment.
Multi-node jobs over ssh (`launch.hostfile`) still go through the `deepspeed` runner, which starts
DeepSpeed's per-node launcher on each node.

Behaviour kept from DeepSpeed's: when a rank exits with an error, the other ranks (and their children)
get SIGTERM, then SIGKILL after 30 s, and this process exits with that rank's status; SIGTERM or SIGINT to
this process does the same to every rank and exits 1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys

STOP_GRACE_S = 30  # DeepSpeed's launcher: terminate, then kill what is left after 30 s


def command(world: dict[str, list[int]], node_rank: int, master_addr: str, master_port: int,
            rank_cmd: list[str]) -> list[str]:
    """The command line that starts node `node_rank`'s ranks of `world` (node name -> device indices, in
    node-rank order), each running `rank_cmd`."""
    info = base64.urlsafe_b64encode(json.dumps(world).encode()).decode()
    return [sys.executable, "-u", "-m", "launch.node", f"--world_info={info}", f"--master_addr={master_addr}",
            f"--master_port={master_port}", f"--node_rank={node_rank}", "--", *rank_cmd]


def rank_env(base: dict, world: dict[str, list[int]], node_rank: int, local_rank: int, master_addr: str,
             master_port: int) -> dict:
    """The environment of local rank `local_rank` on node `node_rank` of `world` (node name -> device
    indices, in node-rank order): ranks are numbered node by node, as DeepSpeed's launcher numbers them."""
    nodes = list(world)
    devices = world[nodes[node_rank]]
    first = sum(len(world[n]) for n in nodes[:node_rank])
    env = dict(base)
    env.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
               WORLD_SIZE=str(sum(len(v) for v in world.values())), CROSS_RANK=str(node_rank),
               CROSS_SIZE=str(len(nodes)), LOCAL_SIZE=str(len(devices)), RANK=str(first + local_rank),
               LOCAL_RANK=str(local_rank), CUDA_VISIBLE_DEVICES=",".join(map(str, devices)))
    return env


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every rank still running and to its children, SIGKILL to what is left after the grace."""
    import psutil

    victims = []
    for p in procs:
        try:
            top = psutil.Process(p.pid)
            victims += top.children(recursive=True) + [top]
        except psutil.Error:
            pass
    for v in victims:
        try:
            v.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=STOP_GRACE_S)
    for v in alive:
        try:
            v.kill()
        except psutil.Error:
            pass


def run(world: dict[str, list[int]], node_rank: int, master_addr: str, master_port: int, cmd: list[str]) -> int:
    running: dict[int, subprocess.Popen] = {}  # pid -> rank not yet reaped

    def on_signal(signum, frame):
        _stop_all(list(running.values()))  # not the reaped ones: their pids may belong to others by now
        sys.exit(1)

    # Before the first rank starts: a signal while they start still reaches every rank started so far.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    for r in range(len(world[list(world)[node_rank]])):  # one rank per device of this node
        p = subprocess.Popen(cmd, env=rank_env(os.environ, world, node_rank, r, master_addr, master_port))
        running[p.pid] = p
    while running:
        pid, status = os.wait()  # the first rank to end, as soon as it ends
        if running.pop(pid, None) is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            _stop_all(list(running.values()))
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.node", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world_info", required=True, help="base64 JSON: node name -> device indices")
    ap.add_argument("--node_rank", type=int, required=True)
    ap.add_argument("--master_addr", required=True)
    ap.add_argument("--master_port", type=int, required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then each rank's command line")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no rank command after --")
    world = json.loads(base64.urlsafe_b64decode(args.world_info))
    return run(world, args.node_rank, args.master_addr, args.master_port, cmd)


if __name__ == "__main__":
    sys.exit(main())
