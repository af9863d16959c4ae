"""Process-group set-up shared by every layout.

A single process still gets a (world size 1) process group so that the DeepSpeed engine, and
every collective in the loop, run the same code path as on many GPUs. Ranks and the rendezvous come
from the environment the launcher sets (`deepspeed`, `torchrun` or Slurm's srun wrapper).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_accelerator() -> str:
    """'cuda' when a GPU is usable, else 'cpu'; exported for DeepSpeed before it is imported."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", device)
    return device


def quiet_deepspeed() -> None:
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto", timeout_s: int = 300) -> DistInfo:
    device_type = select_accelerator()
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise RuntimeError("launch.backend=nccl needs CUDA GPUs; none is visible (use gloo or auto)")
    if "RANK" not in os.environ:
        # Launched as a plain single process: give it a private one-rank rendezvous.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    import deepspeed
    import deepspeed.ops

    quiet_deepspeed()
    if device_type == "cpu":
        # DeepSpeed's shared-memory all-reduce for CPU ranks leaves a /dev/shm segment per rank
        # and job that nothing removes (gigabytes after a day of runs); gloo alone is exact and
        # fast enough for the CPU layouts this repository runs.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                   verbose=False)
    return DistInfo(rank, local_rank, world, device, backend)


def _reduce_int(value: int, op, group) -> int:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64,
                     device="cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=op, group=group)
    return int(t.item())


def all_true(flag: bool, group=None) -> bool:
    """True when `flag` holds on every rank of `group` (None: the world)."""
    return _reduce_int(0 if flag else 1, torch.distributed.ReduceOp.SUM, group) == 0


def max_int(value: int, group=None) -> int:
    """The largest `value` over the ranks of `group` (None: the world)."""
    return _reduce_int(value, torch.distributed.ReduceOp.MAX, group)


def barrier(group=None) -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier(group=group)


def broadcast_object(obj, src: int = 0, group=None):
    """`obj` of global rank `src` on every rank of `group`."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size(group) == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, group=group)
    return box[0]


def broadcast_state_dict(sd: dict | None, src: int, group=None, device=None) -> dict:
    """A state dict held by global rank `src` (None elsewhere) on every rank of `group`: the names,
    shapes and dtypes as one object, then each tensor with a plain broadcast (no pickling of the
    tensors themselves, and only `src` ever read the files)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size(group) == 1:
        return sd
    spec = broadcast_object({k: (tuple(v.shape), v.dtype) for k, v in sd.items()} if sd is not None else None,
                            src, group)
    dev = device or torch.device("cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu")
    out = {}
    for name, (shape, dtype) in spec.items():
        t = sd[name].to(dev).contiguous() if sd is not None else torch.empty(shape, dtype=dtype, device=dev)
        torch.distributed.broadcast(t, src=src, group=group)
        out[name] = t.cpu()
    return out


def destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
