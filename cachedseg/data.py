"""The one preprocessing function every stage shares, and the torch dataset that decodes samples with it.

Where the files are and what their masks mean is the dataset's (`cachedseg.dataset`); this module turns them into
tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from cachedseg.dataset import Sample, load_image
from cachedseg.errors import CachedsegError
from cachedseg.views import apply_view

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a backbone input; read from the model's timm `pretrained_cfg`.

    Attributes:
        image_size: Backbone input (height, width) in pixels, multiples of the patch size.
        mean: Per-channel normalisation mean, RGB in [0, 1].
        std: Per-channel normalisation std.
        interpolation: PIL resampling filter for images (masks always use nearest).
        mask_size: (height, width) of the label grid stored for training.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    mask_size: tuple[int, int]


def preprocess_image(img: Image.Image, pp: Preprocess) -> torch.Tensor:
    """RGB image -> normalised float32 tensor [3, H, W]; shared by extract, live training and predict."""
    height, width = pp.image_size
    img = (img if img.mode == "RGB" else img.convert("RGB")).resize((width, height), _RESAMPLE[pp.interpolation])
    # Channels first while still uint8 (a cheap copy), then the same float32 operations as ever, elementwise:
    # the numbers are bit for bit those of normalising [H, W, 3] and transposing after, at a third of the time.
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))).to(torch.float32) / 255.0  # [3,H,W]
    mean = torch.tensor(pp.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(pp.std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std  # [3, H, W]


def preprocess_mask(labels: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Class indices [H, W] uint8 -> uint8 tensor [Mh, Mw] by nearest-neighbour resize to `size` (height, width)."""
    mask = Image.fromarray(labels).resize((size[1], size[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(np.array(mask, dtype=np.uint8))  # [Mh, Mw]


def collate(items: list[dict]) -> dict:
    """Stack the samples that loaded; pass on the ones a worker could not read, with the reason."""
    good = [it for it in items if "error" not in it]
    batch = {"errors": [(it["index"], it["error"]) for it in items if "error" in it],
             "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
             "view": torch.tensor([it.get("view", 0) for it in good], dtype=torch.long)}
    for key in ("image", "features", "mask"):
        if good and key in good[0]:
            batch[key] = torch.stack([it[key] for it in good])
    return batch


class SegmentationDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses images and masks (in DataLoader workers), returning them by sample index, or by
    (index, view) in one of `views` (see `cachedseg.views`); `read_labels` gives a sample's checked class indices
    (the dataset's `Dataset.sample_labels`; None: images only)."""

    def __init__(self, samples: list[Sample | None], pp: Preprocess,
                 read_labels: Callable[[Sample], np.ndarray] | None, views: tuple[str, ...] = ("identity",)):
        self.samples, self.pp, self.read_labels, self.views = samples, pp, read_labels, views

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, view = key if isinstance(key, tuple) else (key, 0)
        try:
            item = self._load(index)
        except CachedsegError as exc:  # reported by the main process, which knows what to do with it
            return {"index": index, "view": view, "error": str(exc)}
        for name in ("image", "mask"):
            if name in item:
                item[name] = apply_view(item[name], self.views[view]).contiguous()
        return {**item, "view": view}

    def class_pixels(self, indices: list[int], k: int) -> np.ndarray:
        """Pixels of each of `k` classes [k] int64 in the masks of `indices`, as training sees them (checked,
        resized to the mask size: the counts a store of these masks gives); images are not decoded."""
        counts = np.zeros(256, dtype=np.int64)
        for index in indices:
            labels = self.read_labels(self.samples[index])  # [H, W] uint8, checked
            counts += np.bincount(preprocess_mask(labels, self.pp.mask_size).numpy().ravel(), minlength=256)
        return counts[:k]  # the ignore label lies beyond the classes

    def _load(self, index: int) -> dict:
        """Decode, check and preprocess one sample."""
        sample = self.samples[index]
        image = load_image(sample.image)
        item = {"index": index, "image": preprocess_image(image, self.pp)}  # [3, H, W]
        if self.read_labels is not None:
            labels = self.read_labels(sample)  # [H, W] uint8, checked
            if labels.shape != (image.height, image.width):
                raise CachedsegError(f"{sample.mask} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                                     f"{image.width}x{image.height}; a mask must have its image's size")
            item["mask"] = preprocess_mask(labels, self.pp.mask_size)  # [Mh, Mw]
        return item
