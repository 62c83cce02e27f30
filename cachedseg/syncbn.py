"""Batch norm across the ranks of a torchrun job (see `cachedseg.distributed`): the statistics of every rank's
part of the global batch, so W ranks train as one process with the whole batch would."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
