"""Several processes, one job: the `torch.distributed` glue for commands started by `torchrun` (directly, or under
SLURM's `srun`). Outside torchrun every call here is a cheap no-op for a job of one process.

Rank 0 does what must happen once (create the store, hold the writer lock, write checkpoints and reports); every
rank computes its share. A setup step that can fail runs on rank 0 and its outcome, value or error, is broadcast,
so a refused job stops on every rank with the same message instead of hanging at the next barrier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from cachedseg.errors import CachedsegError

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
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (a tensor on this rank's device; gloo also takes CPU tensors)."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def count(self, key: str, add: int = 0) -> int:
        """A job-wide counter: add to it and read the total (torchrun's key-value store; no barrier)."""
        if self.world == 1:
            _local_counts[key] = _local_counts.get(key, 0) + add
            return _local_counts[key]
        return int(dist.distributed_c10d._get_default_store().add(key, add))

    def share(self, units: list[T]) -> list[T]:
        """This rank's contiguous block of `units` (blocks differ in length by at most one)."""
        per, extra = divmod(len(units), self.world)
        start = self.rank * per + min(self.rank, extra)
        return units[start:start + per + (self.rank < extra)]


_local_counts: dict[str, int] = {}


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
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except KeyError:
        raise CachedsegError("WORLD_SIZE is set but RANK is not; start distributed runs with torchrun") from None
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Context(rank=rank, world=world, local_rank=local_rank)


def device_for(ctx: Context, device: str) -> str:
    """This rank's device: its own GPU under torchrun, else `device` as given."""
    if ctx.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    return device


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient of each rank's input is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every rank's part of the global batch, so W ranks train as one
    process with the whole batch would. Unlike torch's SyncBatchNorm it also runs on CPUs (gloo); its state dict is
    a BatchNorm2d's, so checkpoints load anywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply  # gradients flow back across ranks
        c, dims = x.shape[1], (0, 2, 3)
        count = torch.full((1,), x.numel() // c, dtype=x.dtype, device=x.device)
        totals = all_reduce(torch.cat([x.sum(dims), count]))  # [C + 1]
        n = totals[-1]
        mean = totals[:c] / n  # [C]
        var = all_reduce((x - mean.view(1, c, 1, 1)).pow(2).sum(dims)) / n  # [C], biased, as BatchNorm normalises
        with torch.no_grad():  # running statistics as BatchNorm2d keeps them (unbiased variance)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), self.momentum)
            self.num_batches_tracked += 1
        scale = torch.rsqrt(var + self.eps) * self.weight  # [C]
        return (x - mean.view(1, c, 1, 1)) * scale.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every BatchNorm2d replaced by a SyncBatchNorm holding the same parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            synced = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(child.weight.device)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            sync_batchnorm(child)
    return module
