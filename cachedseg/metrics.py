"""Dataset-level segmentation metrics from one confusion matrix (never averaged per batch)."""

from __future__ import annotations

import torch

# Pixels counted per step: bounds the int64 copies of a native-resolution frame (8 bytes a pixel each) to 8 MB.
CHUNK = 1 << 20


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Confusion counts [K, K] (rows: true class, columns: predicted), skipping pixels labelled `ignore_index`."""
    target, pred = target.reshape(-1), pred.reshape(-1)
    counts = torch.zeros(num_classes ** 2, dtype=torch.long, device=target.device)
    for start in range(0, target.numel(), CHUNK):
        t, p = target[start:start + CHUNK].long(), pred[start:start + CHUNK].long()
        keep = t != ignore_index
        t, p = t[keep], p[keep]
        if t.numel() and not (0 <= int(torch.minimum(t, p).min()) and int(torch.maximum(t, p).max()) < num_classes):
            # a value outside the class set would land in another class's cell (or past the matrix)
            raise ValueError(f"labels or predictions outside the {num_classes} classes 0..{num_classes - 1}")
        counts += torch.bincount(t * num_classes + p, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes).cpu()


def scores(conf: torch.Tensor) -> dict:
    """mIoU over the classes that occur in the labels or the predictions (a non-empty union), which `averaged`
    lists by index; pixel accuracy; per-class IoU (None for a class in neither)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    total = conf.sum()
    return {"miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
            "iou": [float(v) if p else None for v, p in zip(iou, present)],
            "averaged": [int(c) for c in present.nonzero().flatten()]}
