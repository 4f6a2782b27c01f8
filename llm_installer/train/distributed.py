"""The few things `run_training` must agree on when it runs as several processes (torchrun / accelerate).

The training loop itself is transformers' `Trainer`, which already does DDP/FSDP/DeepSpeed through
accelerate. What is ours is the run around it: one run folder for all processes, prepared-data cache
written once, and the adapter, report, plot and console output written by the main process only. The
waiting, broadcasting and gathering are accelerate's (`PartialState`, `broadcast_object_list`,
`gather_object`). A launcher sets RANK / WORLD_SIZE, read here from the environment because the thread
count is set before any process group exists; without them everything here is a no-op, so
single-process runs pay nothing (not even the import of accelerate).
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


def _state() -> Any:
    """accelerate's process state (a shared singleton: the Trainer's Accelerator uses the same one).

    `cpu=True` without CUDA, as transformers' TrainingArguments asks for it: without it accelerate joins
    the process group but records no distributed type, and its broadcast and gather do nothing."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def init() -> None:
    """Join the launcher's process group the way the Trainer will (accelerate's PartialState)."""
    if world_size() > 1:
        _state()


def barrier() -> None:
    """Wait until every process gets here."""
    if world_size() > 1:
        _state().wait_for_everyone()


def broadcast(value: Any) -> Any:
    """The main process's `value`, on every process."""
    if world_size() <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def total(value: int) -> int:
    """Sum of an integer over all processes (e.g. tokens each one trained on)."""
    if world_size() <= 1:
        return value
    from accelerate.utils import gather_object

    return sum(int(v) for v in gather_object([int(value)]))


@contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (writing caches); the others follow and find them."""
    if world_size() <= 1:
        yield
        return
    with _state().main_process_first():
        yield


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
