"""Dataset-level segmentation metrics from one confusion matrix (never averaged per batch)."""

from __future__ import annotations

import torch

from cachedseg.classes import IGNORE_INDEX


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion counts [K, K] (rows: true class, columns: predicted), skipping ignored pixels."""
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != IGNORE_INDEX
    flat = target[keep] * num_classes + pred[keep]
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu()


def scores(conf: torch.Tensor) -> dict:
    """mIoU over classes with a non-empty union, pixel accuracy, and per-class IoU (None where undefined)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    total = conf.sum()
    return {"miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
            "iou": [float(v) if p else None for v, p in zip(iou, present)]}
