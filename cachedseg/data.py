"""Datasets in the AeroScapes layout and the one preprocessing function every stage shares.

Layout, as published:
    DATA/JPEGImages/<id>.jpg
    DATA/SegmentationClass/<id>.png   single-channel class indices, 255 = ignore
    DATA/ImageSets/trn.txt, val.txt   one id per line
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from cachedseg.classes import CLASS_NAMES, IGNORE_INDEX, SPLITS
from cachedseg.errors import CachedsegError
from cachedseg.paths import check_dataset
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


def mask_size_for(grid: tuple[int, int]) -> tuple[int, int]:
    """Training masks: 16 pixels per token, the output grid of the transposed-conv decoders (37x37 -> 592x592).

    Masks and images both cover the whole frame, so mask pixel j sits under the decoder's output pixel j.
    """
    return grid[0] * 16, grid[1] * 16


# Larger images would need gigabytes to decode at full resolution; refuse them with advice instead.
MAX_PIXELS = 100_000_000


@contextlib.contextmanager
def own_pixel_limit() -> Iterator[None]:
    """PIL's own bomb check off (a raw warning at 89 MP, an error at 179 MP): MAX_PIXELS, checked from the header
    before decoding, is the one rule."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _refuse_huge(img: Image.Image, path: str | Path) -> Image.Image:
    """The image (only its header read so far), if it is within MAX_PIXELS."""
    if img.width * img.height > MAX_PIXELS:
        raise CachedsegError(f"{path} is {img.width}x{img.height}, over {MAX_PIXELS // 10**6} megapixels; "
                             "downscale it before use")
    return img


def _open(path: str | Path, what: str) -> Image.Image:
    """Open and fully decode an image file, turning every decoder failure into one clear error."""
    try:
        with own_pixel_limit():
            img = _refuse_huge(Image.open(path), path)  # reads the header only
            img.load()
        return img
    except CachedsegError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's "not a readable image"
        raise CachedsegError(f"{path} is not a readable {what} ({exc}); replace or remove it") from None


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file to upright 8-bit RGB (EXIF orientation applied; 16-bit and float images rescaled)."""
    img = _open(path, "image")
    ImageOps.exif_transpose(img, in_place=True)  # a copy would double the memory of a large frame
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # convert("RGB") would clip these at 255; scale the 16-bit range down to 8 bits instead.
        a = np.asarray(img, dtype=np.float32)
        a = a / 257.0 if a.max() > 255 else a
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() copies even an RGB image


def load_mask(path: str | Path) -> Image.Image:
    """Decode a label PNG of class indices, refusing colour masks."""
    mask = _open(path, "mask")
    if mask.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise CachedsegError(f"{path} is a {mask.mode} image, but a mask must be single-channel class indices "
                             "(0-11, 255 = ignore); convert colour masks to indices first")
    return mask


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


def preprocess_mask(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Label image -> uint8 tensor [Mh, Mw] by nearest-neighbour resize to `size` (height, width)."""
    mask = mask.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(np.array(mask, dtype=np.uint8))  # [Mh, Mw]


def frame_size(root: str | Path) -> tuple[int, int]:
    """(width, height) of a dataset's first image, read from its header (for --short-side)."""
    sample = read_dataset(root)[0]
    try:  # exif_transpose would decode the whole frame: only the orientation tag is needed to swap the sides
        with own_pixel_limit(), Image.open(sample.image) as img:
            (width, height), orientation = _refuse_huge(img, sample.image).size, img.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError) as exc:
        raise CachedsegError(f"{sample.image} is not a readable image ({exc}); replace or remove it") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # the tags that rotate by 90 degrees


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: its id, split and files."""

    id: str
    split: str
    image: Path
    mask: Path


def read_dataset(root: str | Path, splits: tuple[str, ...] = SPLITS,
                 missing: dict[str, str] | None = None) -> list[Sample]:
    """List the samples of an AeroScapes-layout folder, trn before val, checking that every file exists.

    Args:
        root: The dataset folder.
        splits: Which split files under `ImageSets/` to read.
        missing: If given, listed ids whose files are missing are left out and put here with the error they
            would have raised (extract keeps their cached entries), instead of raising it.

    Returns:
        The samples in split-file order.

    Raises:
        CachedsegError: If the layout is wrong, a split is empty, an id repeats, or a file is missing.
    """
    root = check_dataset(root)
    samples: list[Sample] = []
    seen: set[str] = set()
    for split in splits:
        listing = root / "ImageSets" / f"{split}.txt"
        if not listing.is_file():
            raise CachedsegError(f"{listing} is {'a folder' if listing.is_dir() else 'missing'}: an AeroScapes-layout "
                                 f"dataset lists its ids in ImageSets/{'.txt, '.join(SPLITS)}.txt")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not ids:
            raise CachedsegError(f"{listing} lists no images; add ids to it, one per line")
        for id_ in ids:
            if id_ in seen:
                raise CachedsegError(f"image id {id_!r} is listed twice ({listing}); each id may appear once")
            seen.add(id_)
            sample = Sample(id_, split, root / "JPEGImages" / f"{id_}.jpg", root / "SegmentationClass" / f"{id_}.png")
            absent = [p for p in (sample.image, sample.mask) if not p.is_file()]
            if absent:
                error = (f"{absent[0]} is {'a folder' if absent[0].is_dir() else 'missing'}, but id {id_!r} is listed "
                         f"in {listing}; add the file or remove the id")
                if missing is None:
                    raise CachedsegError(error)
                missing[id_] = error
                continue
            samples.append(sample)
    return samples


def check_labels(labels: np.ndarray, path: Path, num_classes: int = len(CLASS_NAMES)) -> None:
    """Refuse label values outside 0..num_classes-1 other than the ignore label."""
    bad = (labels >= num_classes) & (labels != IGNORE_INDEX)
    if bad.any():
        values = sorted(set(np.unique(labels[bad]).tolist()))[:5]
        raise CachedsegError(f"{path} has label values {values} outside 0..{num_classes - 1} (and not the "
                             f"ignore label {IGNORE_INDEX}); fix the mask")


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
    (index, view) in one of `views` (see `cachedseg.views`)."""

    def __init__(self, samples: list[Sample], pp: Preprocess, with_masks: bool = True,
                 views: tuple[str, ...] = ("identity",)):
        self.samples, self.pp, self.with_masks, self.views = samples, pp, with_masks, views

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

    def _load(self, index: int) -> dict:
        """Decode, check and preprocess one sample."""
        sample = self.samples[index]
        image = load_image(sample.image)
        item = {"index": index, "image": preprocess_image(image, self.pp)}  # [3, H, W]
        if self.with_masks:
            mask = load_mask(sample.mask)
            if mask.size != image.size:
                raise CachedsegError(f"{sample.mask} is {mask.width}x{mask.height} but its image is "
                                     f"{image.width}x{image.height}; a mask must have its image's size")
            check_labels(np.asarray(mask), sample.mask)
            item["mask"] = preprocess_mask(mask, self.pp.mask_size)  # [Mh, Mw]
        return item
