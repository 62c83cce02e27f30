"""Several processes, one job: the `torch.distributed` glue for commands started by `torchrun` (directly, or under
SLURM's `srun`). Outside torchrun every call here is a cheap no-op for a job of one process.

Rank 0 does what must happen once (create the store, hold the writer lock, write checkpoints and reports); every
rank computes its share. A setup step that can fail runs on rank 0 and its outcome, value or error, is broadcast,
so a refused job stops on every rank with the same message instead of hanging at the next barrier.

Light at import (torch loads when a job of several processes first needs it): the CLI reads `rank()` before torch
loads. Batch norm across ranks is `cachedseg.syncbn`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from cachedseg.errors import CachedsegError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process stands in its job.

    Attributes:
        rank: This process's rank (0 to world - 1).
        world: Processes in the job.
        local_rank: Rank on this machine (picks the GPU).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process does the job's once-only work."""
        return self.rank == 0

    @property
    def job(self) -> str:
        """An id shared by the ranks of one job (torchrun's run id), to tell this job from another."""
        return os.environ.get("TORCHELASTIC_RUN_ID", f"pid-{os.getpid()}") if self.world > 1 else f"pid-{os.getpid()}"

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def once(self, step: Callable[[], T]) -> T:
        """Run `step` on rank 0 and hand its result, or its CachedsegError, to every rank."""
        outcome: list[Any] = [None]
        if self.main:
            try:
                outcome[0] = ("ok", step())
            except CachedsegError as exc:
                outcome[0] = ("error", str(exc))
        if self.world > 1:
            import torch.distributed as dist
            dist.broadcast_object_list(outcome, src=0)
        status, value = outcome[0]
        if status == "error":
            error = CachedsegError(value)
            error.shared = True  # every rank raises it; the CLI prints it once, on rank 0
            raise error
        return value

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order (on every rank)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (a tensor on this rank's device; gloo also takes CPU tensors)."""
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def count(self, key: str, add: int = 0) -> int:
        """A job-wide counter: add to it and read the total (torchrun's key-value store; no barrier)."""
        if self.world == 1:
            _local_counts[key] = _local_counts.get(key, 0) + add
            return _local_counts[key]
        import torch.distributed as dist
        return int(dist.distributed_c10d._get_default_store().add(key, add))

    def share(self, units: list[T]) -> list[T]:
        """This rank's contiguous block of `units` (blocks differ in length by at most one)."""
        per, extra = divmod(len(units), self.world)
        start = self.rank * per + min(self.rank, extra)
        return units[start:start + per + (self.rank < extra)]


_local_counts: dict[str, int] = {}


def rank() -> int:
    """This process's rank in its torchrun job (0 outside one), from torchrun's environment, without joining the
    process group: the CLI asks before torch loads, to keep the ranks other than 0 quiet."""
    return int(os.environ.get("RANK", "0"))


def context(device: str = "auto") -> Context:
    """This process's place in its job, joining the process group on first use when torchrun started it.

    Args:
        device: The device the job runs on; picks the backend (nccl for cuda, gloo otherwise).

    Raises:
        CachedsegError: If torchrun's environment is incomplete.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context()
    if "RANK" not in os.environ:
        raise CachedsegError("WORLD_SIZE is set but RANK is not; start distributed runs with torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Context(rank=rank(), world=world, local_rank=local_rank)


def device_for(ctx: Context, device: str) -> str:
    """This rank's device: its own GPU under torchrun, else `device` as given."""
    if ctx.world == 1:
        return device
    import torch
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    return device
