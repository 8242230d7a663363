"""DistributedDataParallel plumbing for ``torchrun --nproc_per_node=N -m dilateformer train ...``.

gloo on CPU, nccl on CUDA. Only rank 0 writes files and prints; metrics are summed across ranks before they are
reported, so every rank agrees on the numbers and on which epoch was best.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def restart_count() -> int:
    """How many times torchrun's ``--max-restarts`` has restarted this job (0 on the first attempt)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def init(device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun; pick the device. Single process otherwise."""
    want_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(
            device=torch.device("cuda" if want_cuda else "cpu") if device == "auto" else torch.device(device)
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if want_cuda else "gloo", store=_attempt_store(rank, world), rank=rank, world_size=world
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _attempt_store(rank: int, world: int) -> dist.Store:
    """The rendezvous store, with keys private to this torchrun attempt.

    After a ``--max-restarts`` restart, the new workers were seen reading the dead attempt's gloo addresses
    from the shared agent store and connecting to a closed port (refused, or hanging until the timeout). A
    prefix per restart count keeps each attempt's keys apart.
    """
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        int(os.environ.get("MASTER_PORT", "29500")),
        world,
        is_master=not use_agent_store and rank == 0,  # torchrun's agent already serves the store
        timeout=timedelta(minutes=30),
    )
    return dist.PrefixStore(f"dilateformer/attempt_{restart_count()}", store)


def peer_failed(error: BaseException) -> int | None:
    """This process's rank if ``error`` is a collective failing because a peer process went away, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(error).lower()
    lost = ("connection closed", "connection reset", "broken pipe", "gloo", "nccl", "timed out", "socket")
    if isinstance(error, getattr(dist, "DistError", ())) or any(word in text for word in lost):
        return dist.get_rank()
    return None


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few scalars over all ranks (float64 so counts and sums of losses stay exact)."""
    if not info.distributed:
        return list(values)
    device = info.device if info.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


class ShardSampler(torch.utils.data.Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, without the padding DistributedSampler adds.

    For evaluation: each sample is counted exactly once across ranks, so reduced accuracy is exact.
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
