"""Live inference: image -> shared preprocessing -> backbone -> cast to the cache dtype -> decoder -> labels.

`evaluate --data` and `predict` both go through `segment`, so their labels are the same by construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cachedseg.backbone import Backbone, resolve_device
from cachedseg.data import load_image, preprocess_image
from cachedseg.errors import CachedsegError
from cachedseg.features import backbone_for
from cachedseg.train import Checkpoint, load_checkpoint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
# One fixed colour per class (background, person, bike, car, drone, boat, animal, obstacle, construction,
# vegetation, road, sky); the README shows the legend.
PALETTE = np.array([(0, 0, 0), (220, 20, 60), (119, 11, 32), (0, 0, 142), (255, 0, 255), (0, 170, 255),
                    (255, 140, 0), (255, 255, 0), (140, 70, 20), (0, 160, 0), (128, 128, 128), (135, 206, 235)],
                   dtype=np.uint8)


def labels_from_logits(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Logits [1, K, M, M] -> class indices [H, W] at `size` (H, W): bilinear resize, then argmax."""
    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)  # [1, K, H, W]
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()  # [H, W]


@torch.no_grad()
def segment(image: Image.Image, backbone: Backbone, ckpt: Checkpoint, size: tuple[int, int] | None = None) -> np.ndarray:
    """Class indices [H, W] for one RGB image, at its own size unless `size` (H, W) is given."""
    device = next(backbone.parameters()).device
    x = preprocess_image(image, backbone.preprocess)[None].to(device)  # [1, 3, S, S]
    feats = backbone(x).to(getattr(torch, ckpt.spec.dtype)).float()  # [1, C, h, w], numbers as in the cache
    logits = ckpt.decoder.to(device)(feats)  # [1, K, M, M]
    return labels_from_logits(logits, size or (image.height, image.width))


def colorize(labels: np.ndarray) -> Image.Image:
    """Class indices [H, W] -> RGB image with the fixed palette (ignored/unknown labels black)."""
    return Image.fromarray(PALETTE[np.where(labels < len(PALETTE), labels, 0)])


def find_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders into image files, sorted within each folder."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            found.append(item)
        else:
            raise CachedsegError(f"{item}: no such file or folder")
    if not found:
        raise CachedsegError(f"no images found in {', '.join(map(str, inputs))}")
    return found


def _save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG through a temporary file, so a kill never leaves a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Prediction:
    """The files written for one input image."""

    image: Path
    label: Path
    color: Path
    overlay: Path


def predict(images: list[str | Path], run: str | Path, out: str | Path = "predictions", weights: str | None = None,
            device: str = "auto", progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Segment images with a trained run, writing a label, a colour and an overlay PNG per image.

    Args:
        images: Image files and folders of images.
        run: The run folder (its best checkpoint) or a checkpoint file.
        out: Output folder.
        weights: Backbone weights (`auto`, a file, or `random`); by default those the run was trained with.
            They must give the fingerprint the run was trained on.
        device: `auto`, `cpu` or `cuda`.
        progress: Called as `progress(done, total)`.

    Returns:
        The files written, per image.

    Raises:
        CachedsegError: For missing inputs, an unreadable image, or a backbone that does not match the run.
    """
    paths = find_images(images)
    ckpt = load_checkpoint(run)
    backbone = backbone_for(ckpt.spec, weights or ckpt.weights, resolve_device(device))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n, path in enumerate(paths, 1):
        image = load_image(path)
        labels = segment(image, backbone, ckpt)  # [H, W]
        pred = Prediction(path, out / f"{path.stem}_label.png", out / f"{path.stem}_color.png",
                          out / f"{path.stem}_overlay.png")
        color = colorize(labels)
        _save_png(Image.fromarray(labels, mode="L"), pred.label)
        _save_png(color, pred.color)
        _save_png(Image.blend(image, color, 0.5), pred.overlay)
        written.append(pred)
        if progress:
            progress(n, len(paths))
    return written
