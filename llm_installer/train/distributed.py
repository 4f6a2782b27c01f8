"""The few things `run_training` must agree on when it runs as several processes (torchrun / accelerate).

The training loop itself is transformers' `Trainer`, which already does DDP/FSDP/DeepSpeed through
accelerate. What is ours is the run around it: one run folder for all processes, prepared-data cache
written once, and the adapter, report, plot and console output written by the main process only. A
launcher sets RANK / WORLD_SIZE; without them everything here is a no-op, so single-process runs pay
nothing (not even the import of torch.distributed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_world_size() -> int:
    """Processes on this machine (torchrun sets LOCAL_WORLD_SIZE): they share its cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world_size()


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the launcher's process group the way the Trainer will (accelerate's PartialState)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState()


def _ready() -> bool:
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _ready():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: Any) -> Any:
    """The main process's `value`, on every process."""
    if not _ready():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(value: int) -> int:
    """Sum of an integer over all processes (e.g. tokens each one trained on)."""
    if not _ready():
        return value
    import torch.distributed as dist

    box = [None] * world_size()
    dist.all_gather_object(box, int(value))
    return sum(int(v) for v in box)


@contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (writing caches); the others follow and find them."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


__all__ = [
    "world_size",
    "local_world_size",
    "rank",
    "is_main",
    "init",
    "barrier",
    "broadcast",
    "total",
    "main_first",
]
