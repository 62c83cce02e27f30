"""Score a trained run against the dataset's own label PNGs at their native resolution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cachedseg.backbone import resolve_device
from cachedseg.data import check_labels, load_image, load_mask, read_dataset
from cachedseg.errors import CachedsegError
from cachedseg.features import backbone_for, cached_source
from cachedseg.metrics import confusion, scores
from cachedseg.predict import labels_from_logits, segment
from cachedseg.store import check_spec
from cachedseg.train import load_checkpoint


@dataclass(frozen=True)
class EvalResult:
    """Dataset-level scores of one run on one split.

    Attributes:
        confusion: Counts [K, K], rows true class, columns predicted.
        miou: Mean IoU over classes with a non-empty union.
        pixel_acc: Fraction of labelled pixels predicted right.
        iou: Per-class IoU (None where the class is absent from both labels and predictions).
        class_names: Names of the K classes.
        images: Number of images scored.
    """

    confusion: np.ndarray
    miou: float
    pixel_acc: float
    iou: list[float | None]
    class_names: tuple[str, ...]
    images: int

    def to_json(self) -> dict:
        """Everything, as plain JSON types."""
        return {"miou": self.miou, "pixel_acc": self.pixel_acc, "images": self.images,
                "iou": dict(zip(self.class_names, self.iou)), "class_names": list(self.class_names),
                "confusion": self.confusion.tolist()}


def evaluate(run: str | Path, store: str | Path | None = None, data: str | Path | None = None, split: str = "val",
             weights: str | None = None, device: str = "auto",
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Evaluate a run on cached features (`store`) or live from the images (`data`), at native label resolution.

    Args:
        run: The run folder (its best checkpoint) or a checkpoint file.
        store: A feature store; its recorded dataset gives the labels unless `data` is also given.
        data: An AeroScapes-layout folder; without `store`, features are computed live by the backbone.
        split: `trn` or `val`.
        weights: Backbone weights for live evaluation; by default those the run was trained with.
        device: `auto`, `cpu` or `cuda`.
        progress: Called as `progress(done, total)`.

    Returns:
        The confusion matrix and the scores derived from it.

    Raises:
        CachedsegError: For a store that does not fit the run, missing labels, or a mismatched backbone.
    """
    if split not in ("trn", "val"):
        raise CachedsegError(f"--split {split!r}: use trn or val")
    if store is None and data is None:
        raise CachedsegError("give --store STORE (cached features) or --data DATA (live backbone)")
    ckpt = load_checkpoint(run)
    torch_device = resolve_device(device)
    if store is not None:
        source = cached_source(store, data=data)
        check_spec(store, source.spec, ckpt.spec, hint=f"the run {run} was trained on other features; evaluate it "
                   "with the store it was trained from, or with --data to run its backbone live")
        indices = source.indices(split)
        ids, root = [source.ids[i] for i in indices], source.data_root
    else:
        samples = [s for s in read_dataset(data) if s.split == split]
        ids, root = [s.id for s in samples], Path(data)
        backbone = backbone_for(ckpt.spec, weights or ckpt.weights, torch_device)
    if not ids:
        raise CachedsegError(f"the {split} split is empty")
    decoder = ckpt.decoder.to(torch_device)
    k = len(ckpt.spec.class_names)
    conf = torch.zeros(k, k, dtype=torch.long)
    for n, id_ in enumerate(ids, 1):
        mask_path = root / "SegmentationClass" / f"{id_}.png"
        if not mask_path.is_file():
            raise CachedsegError(f"{mask_path} is missing; pass --data with the dataset the store was built from")
        labels = np.asarray(load_mask(mask_path))
        check_labels(labels, mask_path, k)
        size = labels.shape[:2]
        if store is not None:
            item = source.dataset[indices[n - 1]]
            with torch.no_grad():
                logits = decoder(item["features"][None].to(torch_device).float())  # [1, K, M, M]
            pred = labels_from_logits(logits, size)
        else:
            image_path = root / "JPEGImages" / f"{id_}.jpg"
            image = load_image(image_path)
            if (image.height, image.width) != size:
                raise CachedsegError(f"{mask_path} is {size[1]}x{size[0]} but {image_path} is "
                                     f"{image.width}x{image.height}; a mask must have its image's size")
            pred = segment(image, backbone, ckpt, size)
        conf += confusion(torch.from_numpy(pred), torch.from_numpy(labels.astype(np.int64)), k)
        if progress:
            progress(n, len(ids))
    s = scores(conf)
    return EvalResult(confusion=conf.numpy(), miou=s["miou"], pixel_acc=s["pixel_acc"], iou=s["iou"],
                      class_names=ckpt.spec.class_names, images=len(ids))
