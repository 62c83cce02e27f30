"""Datasets in the AeroScapes layout and the one preprocessing function every stage shares.

Layout, as published:
    DATA/JPEGImages/<id>.jpg
    DATA/SegmentationClass/<id>.png   single-channel class indices, 255 = ignore
    DATA/ImageSets/trn.txt, val.txt   one id per line
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from cachedseg.classes import CLASS_NAMES, IGNORE_INDEX
from cachedseg.errors import CachedsegError

SPLITS = ("trn", "val")
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a backbone input; read from the model's timm `pretrained_cfg`.

    Attributes:
        image_size: Side of the square backbone input in pixels (a multiple of the patch size).
        mean: Per-channel normalisation mean, RGB in [0, 1].
        std: Per-channel normalisation std.
        interpolation: PIL resampling filter for images (masks always use nearest).
        mask_size: Side of the square label grid the decoder is trained against.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    mask_size: int


def mask_size_for(image_size: int) -> int:
    """Training mask side: the input size rounded down to a multiple of 16 (518 -> 512, the seed's crop)."""
    return image_size // 16 * 16


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file to upright RGB (EXIF orientation applied)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def load_mask(path: str | Path) -> Image.Image:
    """Decode a label PNG of class indices."""
    with Image.open(path) as img:
        img.load()
        return img


def preprocess_image(img: Image.Image, pp: Preprocess) -> torch.Tensor:
    """RGB image -> normalised float32 tensor [3, S, S]; shared by extract, live training and predict."""
    img = img.convert("RGB").resize((pp.image_size, pp.image_size), _RESAMPLE[pp.interpolation])
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # [S, S, 3]
    mean = torch.tensor(pp.mean, dtype=torch.float32)
    std = torch.tensor(pp.std, dtype=torch.float32)
    return ((x - mean) / std).permute(2, 0, 1).contiguous()  # [3, S, S]


def preprocess_mask(mask: Image.Image, size: int) -> torch.Tensor:
    """Label image -> uint8 tensor [M, M] by nearest-neighbour resize."""
    mask = mask.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.array(mask, dtype=np.uint8))  # [M, M]


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: its id, split and files."""

    id: str
    split: str
    image: Path
    mask: Path


def read_dataset(root: str | Path, splits: tuple[str, ...] = SPLITS) -> list[Sample]:
    """List the samples of an AeroScapes-layout folder, trn before val, checking that every file exists.

    Args:
        root: The dataset folder.
        splits: Which split files under `ImageSets/` to read.

    Returns:
        The samples in split-file order.

    Raises:
        CachedsegError: If the layout is wrong, a split is empty, an id repeats, or a file is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise CachedsegError(f"dataset folder {root} does not exist; make one with `cachedseg synth {root}`")
    samples: list[Sample] = []
    seen: set[str] = set()
    for split in splits:
        listing = root / "ImageSets" / f"{split}.txt"
        if not listing.is_file():
            raise CachedsegError(f"{listing} is missing: an AeroScapes-layout dataset lists its ids in "
                                 f"ImageSets/{'.txt, '.join(SPLITS)}.txt")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not ids:
            raise CachedsegError(f"{listing} lists no images; add ids to it, one per line")
        for id_ in ids:
            if id_ in seen:
                raise CachedsegError(f"image id {id_!r} is listed twice ({listing}); each id may appear once")
            seen.add(id_)
            sample = Sample(id_, split, root / "JPEGImages" / f"{id_}.jpg", root / "SegmentationClass" / f"{id_}.png")
            for path in (sample.image, sample.mask):
                if not path.is_file():
                    raise CachedsegError(f"{path} is missing, but id {id_!r} is listed in {listing}; "
                                         "add the file or remove the id")
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
             "index": torch.tensor([it["index"] for it in good], dtype=torch.long)}
    for key in ("image", "features", "mask"):
        if good and key in good[0]:
            batch[key] = torch.stack([it[key] for it in good])
    return batch


class SegmentationDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses images and masks (in DataLoader workers), returning them by sample index."""

    def __init__(self, samples: list[Sample], pp: Preprocess, with_masks: bool = True):
        self.samples, self.pp, self.with_masks = samples, pp, with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        try:
            return self._load(index)
        except CachedsegError as exc:  # reported by the main process, which knows what to do with it
            return {"index": index, "error": str(exc)}
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's ways of saying "not a readable image"
            return {"index": index, "error": f"cannot read {self.samples[index].image.name} or its mask: {exc}"}

    def _load(self, index: int) -> dict:
        """Decode and preprocess one sample."""
        sample = self.samples[index]
        item = {"index": index, "image": preprocess_image(load_image(sample.image), self.pp)}  # [3, S, S]
        if self.with_masks:
            mask = load_mask(sample.mask)
            if mask.mode not in ("L", "P", "I;16", "I"):
                raise CachedsegError(f"{sample.mask} is a {mask.mode} image; a mask must be single-channel "
                                     "class indices")
            check_labels(np.asarray(mask), sample.mask)
            item["mask"] = preprocess_mask(mask, self.pp.mask_size)  # [M, M]
        return item
