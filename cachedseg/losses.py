"""The training losses (`TrainConfig.loss`), made to train W ranks exactly as one process with the whole batch.

    ce        cross-entropy, summed over the labelled pixels and divided by their count in the (global) batch
    dice-ce   ce + soft Dice: 1 - 2 sum(p y) / (sum p + sum y) per class over the whole (global) batch, averaged
              over the classes that have labelled pixels in it (nnU-Net's batch Dice + CE), so a class of a few
              hundred pixels counts in the Dice term as much as the background

The ignore label is left out of both (its pixels add nothing to any sum). Class weights (`TrainConfig.class_weights`)
weigh each pixel's cross-entropy by its label's weight and each class's Dice term by its weight (the Dice mean then
weighted: sum_c w_c (1 - dice_c) / sum_c w_c over the classes present). A batch whose pixels are all ignored has
loss 0 (finite, no gradient).

Under torchrun DistributedDataParallel averages the ranks' gradients. So each rank's loss is scaled by W and
normalised by sums over the whole global batch (labelled pixels; Dice's per-class sums, all-reduced): the average
of the ranks' gradients is then the gradient of the global batch's loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cachedseg.distributed import Context


@dataclass(frozen=True)
class StepLoss:
    """One head's loss on one batch (this rank's part of it).

    Attributes:
        loss: What to backpropagate.
        total: The loss summed over this rank's labelled pixels, detached (the epoch's mean is the sum of these
            over steps and ranks divided by `pixels`' sum).
        pixels: This rank's labelled pixels (int64).
    """

    loss: torch.Tensor
    total: torch.Tensor
    pixels: torch.Tensor


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore: int, loss: str = "ce",
                      weight: torch.Tensor | None = None, ctx: Context = Context()) -> StepLoss:
    """The loss of `logits` [B, K, H, W] (float32) against `target` [B, H, W] (int64; `ignore` marks unlabelled
    pixels), `loss` being `ce` or `dice-ce`, with per-class `weight` [K] (None: all 1), this rank's part of a global
    batch under `ctx` (see the module docstring)."""
    valid = (target != ignore).sum()
    total = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore, reduction="sum")
    if ctx.world == 1:  # summed then divided: an all-ignore batch contributes nothing instead of NaN
        step = total / valid.clamp(min=1)
    else:  # DDP averages gradients over ranks; this makes them those of the whole batch's mean loss
        step = total * ctx.world / ctx.sum(valid.clone()).clamp(min=1)
    if loss == "dice-ce":
        dice = dice_loss(logits, target, ignore, weight, ctx)
        step = step + dice * ctx.world
        total = total + dice.detach() * valid  # reported per labelled pixel, like the cross-entropy
    elif loss != "ce":
        raise ValueError(f"unknown loss {loss!r}")
    return StepLoss(step, total.detach(), valid)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore: int, weight: torch.Tensor | None = None,
              ctx: Context = Context()) -> torch.Tensor:
    """Soft Dice loss over the classes with labelled pixels in the global batch (0 when it has none), the same
    value on every rank: the per-class sums are all-reduced, their gradient flows to this rank's pixels only."""
    k = logits.shape[1]
    labelled = (target != ignore)[:, None]  # [B, 1, H, W]
    probs = logits.softmax(1) * labelled  # [B, K, H, W], 0 at ignored pixels
    onehot = (target[:, None] == torch.arange(k, device=target.device)[None, :, None, None]) & labelled
    sums = torch.stack([(probs * onehot).sum((0, 2, 3)), probs.sum((0, 2, 3)),
                        onehot.sum((0, 2, 3)).to(probs.dtype)])  # [3, K]: intersection, predicted, labelled
    if ctx.world > 1:  # the global sums' values, with this rank's own gradient
        sums = sums + (ctx.sum(sums.detach().clone()) - sums).detach()
    inter, pred, truth = sums
    present = (truth > 0).to(probs.dtype)
    # a present class has at least one labelled pixel, so the clamp only keeps absent classes (weighed 0) finite
    dice = 2 * inter / (pred + truth).clamp(min=1)
    w = present if weight is None else present * weight
    return (w * (1 - dice)).sum() / w.sum().clamp(min=torch.finfo(probs.dtype).tiny)
