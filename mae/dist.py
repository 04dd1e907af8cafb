"""Where a process runs under torchrun: rank, world size, device, and the few collectives the stages need.

Training (DDP, FSDP2) and the multi-node embedding of ``mae embed`` / ``mae index build`` share it, so it lives
in the core. torchrun (``--nnodes N --node_rank R --master_addr HOST``, or ``srun torchrun ...``) sets the
variables read here; a process started any other way is a world of one.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    """Where this process runs: rank, world size and device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None, timeout_minutes: float | None = None) -> Dist:
    """Join the torchrun process group when launched by torchrun; otherwise a single process.

    CUDA when available (one GPU per local rank, NCCL), else CPU with gloo. ``timeout_minutes`` bounds how long
    a collective waits for the slowest rank (embedding ranks wait for each other's whole slice).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (e.g. the loss) use TF32
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if timeout_minutes is not None:
            kwargs["timeout"] = datetime.timedelta(minutes=timeout_minutes)
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", **kwargs)
    return Dist(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
        # Models wrapped by DDP/FSDP keep the process group alive through reference cycles; free them now, while
        # the interpreter is whole: a gloo group destroyed during interpreter shutdown can abort the process
        # ("terminate called without an active exception") after a run that succeeded.
        gc.collect()


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    if not dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return t.tolist()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def all_gather_objects(value: Any, dist: Dist) -> list[Any]:
    """Every rank's ``value`` (small, picklable: counts, names, errors), in rank order."""
    if not dist.enabled:
        return [value]
    out: list[Any] = [None] * dist.world
    torch_dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, dist: Dist, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (an error message, a decision rank 0 made)."""
    if not dist.enabled:
        return value
    box = [value if dist.rank == src else None]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous run [a, b) of ``n`` items that rank ``rank`` of ``world`` takes (sizes differ by <= 1)."""
    return n * rank // world, n * (rank + 1) // world


def work_folder(out: str | Path, what: str) -> Path:
    """Where the ranks of a torchrun job leave their parts for rank 0: beside ``out`` (the filesystem the result
    goes to, which every node must see), under a name every rank derives alike (torchrun's run id)."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.{what}-{os.environ.get('TORCHELASTIC_RUN_ID', 'ranks')}"
