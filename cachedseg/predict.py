"""Live inference: image -> shared preprocessing -> backbone -> cast to the cache dtype -> decoder -> labels.

`evaluate --data` and `predict` both go through `segment_batch`, batching images in the order given, so for the
same images in the same order and batch size their labels are the same by construction.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from cachedseg import checkpoint
from cachedseg.backbone import Backbone, backbone_for, resolve_device
from cachedseg.data import load_image, preprocess_image
from cachedseg.errors import CachedsegError
from cachedseg.paths import check_images
from cachedseg.store import StoreSpec
from cachedseg.views import apply_view

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
# One fixed colour per class (background, person, bike, car, drone, boat, animal, obstacle, construction,
# vegetation, road, sky); every colour and overlay PNG carries a legend of the classes it shows.
PALETTE = np.array([(0, 0, 0), (220, 20, 60), (119, 11, 32), (0, 0, 142), (255, 0, 255), (0, 170, 255),
                    (255, 140, 0), (255, 255, 0), (140, 70, 20), (0, 160, 0), (128, 128, 128), (135, 206, 235)],
                   dtype=np.uint8)


def labels_from_logits(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Logits [1, K, Mh, Mw] -> class indices [H, W] at `size` (H, W): bilinear resize, then argmax."""
    logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)  # [1, K, H, W]
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()  # [H, W]


def labels_over_views(logits: list[torch.Tensor], views: tuple[str, ...],
                      sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Logits [B, K, Mh, Mw] computed in each view -> class indices [H, W] per image at its size (H, W), from the
    views' mean in the original frame (test-time augmentation)."""
    total = apply_view(logits[0], views[0])
    for view_logits, view in zip(logits[1:], views[1:]):
        total = total + apply_view(view_logits, view)
    mean = total / len(views)  # [B, K, Mh, Mw]
    return [labels_from_logits(mean[i:i + 1], size) for i, size in enumerate(sizes)]


def tta_views(spec: StoreSpec, tta: bool) -> tuple[str, ...]:
    """The views to average: all the features' views with `tta`, else the identity only."""
    if tta and len(spec.views) == 1:
        raise CachedsegError("--tta averages over the cached views, but these features have only the identity "
                             "view; extract with --views flip (and train on that store) to use it")
    return spec.views if tta else ("identity",)


@torch.no_grad()
def segment_batch(x: torch.Tensor, sizes: list[tuple[int, int]], backbone: Backbone, spec: StoreSpec,
                  decoder: torch.nn.Module, views: tuple[str, ...] = ("identity",)) -> list[np.ndarray]:
    """Class indices [H, W] at each size (H, W) for a batch of preprocessed images [B, 3, H', W'], averaging the
    logits of `views` (each computed as extraction computes it, then mapped back to the frame)."""
    device = next(backbone.parameters()).device
    x = x.to(device, non_blocking=True)
    logits = []
    for view in views:
        feats = backbone(apply_view(x, view)).to(getattr(torch, spec.dtype)).float()  # [B, L, C, h, w], as cached
        logits.append(decoder.to(device)(feats))  # [B, K, Mh, Mw], in the view
    return labels_over_views(logits, views, sizes)


def segment(image: Image.Image, backbone: Backbone, spec: StoreSpec, decoder: torch.nn.Module,
            size: tuple[int, int] | None = None, views: tuple[str, ...] = ("identity",)) -> np.ndarray:
    """Class indices [H, W] for one RGB image, at its own size unless `size` (H, W) is given."""
    x = preprocess_image(image, backbone.preprocess)[None]  # [1, 3, H', W']
    return segment_batch(x, [size or (image.height, image.width)], backbone, spec, decoder, views)[0]


class ImageFiles(torch.utils.data.Dataset):
    """Images decoded and preprocessed in DataLoader workers: the backbone's input and the image itself."""

    def __init__(self, paths: list[Path], pp):
        self.paths, self.pp = paths, pp

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, n: int) -> dict:
        try:
            image = load_image(self.paths[n])
        except CachedsegError as exc:
            return {"n": n, "error": str(exc)}
        return {"n": n, "x": preprocess_image(image, self.pp), "image": image}


def batches(dataset: torch.utils.data.Dataset, batch_size: int, workers: int | None,
            device: torch.device) -> torch.utils.data.DataLoader:
    """Batches (lists of items) of `dataset` in order, loaded by `workers` processes (default: none on a CPU, where
    the backbone dwarfs decoding, min(4, CPUs) on a GPU)."""
    if batch_size < 1:
        raise CachedsegError("--batch-size must be at least 1")
    if workers is None:
        workers = 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list)


def failed(items: list[dict]) -> None:
    """Raise the first error a worker reported."""
    for item in items:
        if "error" in item:
            raise CachedsegError(item["error"])


def colorize(labels: np.ndarray) -> Image.Image:
    """Class indices [H, W] -> RGB image with the fixed palette (ignored/unknown labels black)."""
    return Image.fromarray(PALETTE[np.where(labels < len(PALETTE), labels, 0)])


def with_legend(picture: Image.Image, labels: np.ndarray, class_names: tuple[str, ...]) -> Image.Image:
    """`picture` with a strip below it naming, in its colour, each class present in `labels`."""
    present = [int(c) for c in np.unique(labels) if c < len(class_names)]
    size = max(11, min(18, picture.width // 40))
    font = ImageFont.load_default(size=size)
    pad, swatch = size // 2, size
    items, x, rows = [], pad, 0
    for c in present:  # lay the entries out left to right, wrapping to new rows
        width = swatch + pad // 2 + int(font.getlength(class_names[c])) + 2 * pad
        if x + width > picture.width and x > pad:
            x, rows = pad, rows + 1
        items.append((c, x, rows))
        x += width
    row_h = size + pad
    strip = Image.new("RGB", (picture.width, (rows + 1) * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for c, x, row in items:
        y = pad + row * row_h
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(v) for v in PALETTE[c]), outline=(0, 0, 0))
        draw.text((x + swatch + pad // 2, y + size // 2), class_names[c], fill=(0, 0, 0), font=font, anchor="lm")
    out = Image.new("RGB", (picture.width, picture.height + strip.height))
    out.paste(picture.convert("RGB"), (0, 0))
    out.paste(strip, (0, picture.height))
    return out


def find_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders into image files, sorted within each folder."""
    check_images(inputs)
    found: list[Path] = []
    for item in map(Path, inputs):
        found += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if item.is_dir() else [item]
    if not found:
        raise CachedsegError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, inputs))}")
    return found


def _check_names(paths: list[Path]) -> None:
    """Refuse inputs whose outputs would overwrite each other (same file name in different folders)."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        by_stem[path.stem].append(path)
    clashes = [group for group in by_stem.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(" and ".join(map(str, group)) for group in clashes[:3])
        raise CachedsegError(f"{sum(map(len, clashes))} inputs share a file name, so their outputs would overwrite "
                             f"each other ({shown}); predict them in separate calls with different --out folders")


def _save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG through a temporary file, so a kill never leaves a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Prediction:
    """The files written for one input image, and whether they replaced files already there."""

    image: Path
    label: Path
    color: Path
    overlay: Path
    replaced: bool = False


def predict(images: list[str | Path], run: str | Path, out: str | Path = "predictions", weights: str | None = None,
            device: str = "auto", tta: bool = False, batch_size: int = 4, workers: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Segment images with a trained run, writing a label, a colour and an overlay PNG per image.

    Args:
        images: Image files and folders of images.
        run: The run folder (its best checkpoint) or a checkpoint file.
        out: Output folder.
        weights: Backbone weights (`auto`, a file, or `random`); by default those the run was trained with.
            They must give the fingerprint the run was trained on.
        device: `auto`, `cpu` or `cuda`.
        tta: Average the logits of every view the run's features were cached in (e.g. flipped).
        batch_size: Images per backbone forward pass.
        workers: DataLoader processes that decode images (default: 0 on a CPU, min(4, CPUs) on a GPU).
        progress: Called as `progress(done, total)`.

    Returns:
        The files written, per image (`replaced` tells which overwrote an earlier prediction's files).

    Raises:
        CachedsegError: For missing inputs, inputs whose outputs would collide, an unreadable image, or a backbone
            that does not match the run.
    """
    paths = find_images(images)
    _check_names(paths)
    ckpt = checkpoint.load_run(run)
    views = tta_views(ckpt.spec, tta)
    torch_device = resolve_device(device)
    backbone = backbone_for(ckpt.spec, weights or ckpt.weights, torch_device, ckpt.decoder_config.layers)
    decoder = ckpt.decoder()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for items in batches(ImageFiles(paths, backbone.preprocess), batch_size, workers, torch_device):
        failed(items)
        x = torch.stack([item["x"] for item in items])  # [B, 3, H', W']
        sizes = [(item["image"].height, item["image"].width) for item in items]
        for item, labels in zip(items, segment_batch(x, sizes, backbone, ckpt.spec, decoder, views)):  # [H, W]
            path, image = paths[item["n"]], item["image"]
            files = [out / f"{path.stem}_{kind}.png" for kind in ("label", "color", "overlay")]
            pred = Prediction(path, *files, replaced=any(f.exists() for f in files))
            color = colorize(labels)
            _save_png(Image.fromarray(labels, mode="L"), pred.label)
            _save_png(with_legend(color, labels, ckpt.spec.class_names), pred.color)
            _save_png(with_legend(Image.blend(image, color, 0.5), labels, ckpt.spec.class_names), pred.overlay)
            written.append(pred)
        if progress:
            progress(len(written), len(paths))
    return written
