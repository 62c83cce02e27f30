"""Datasets: the one owner of a dataset's layout, sample paths, splits, classes and mask encoding.

A `Dataset` knows where each image and mask of an id lies, which ids each split lists, its classes (names,
colours, ignore label: a `ClassSet`) and how to turn a mask file into checked class indices; every other module
asks it instead of building paths or reading masks itself, as torchgeo's dataset classes own their classes, colour
map and layout. AeroScapes is the first preset, and the layout `cachedseg synth` writes:

    DATA/JPEGImages/<id>.jpg
    DATA/SegmentationClass/<id>.png   single-channel class indices, 255 = ignore
    DATA/ImageSets/trn.txt, val.txt   one id per line

Light (PIL and numpy, no torch): the CLI opens datasets to check them before the heavy imports.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from cachedseg.classes import ClassSet
from cachedseg.errors import CachedsegError
from cachedseg.paths import did_you_mean

SPLITS = ("trn", "val")  # the splits every dataset has, in this order

AEROSCAPES = ClassSet(
    names=("background", "person", "bike", "car", "drone", "boat", "animal", "obstacle", "construction",
           "vegetation", "road", "sky"),
    # Our fixed colours (AeroScapes publishes indices, not a palette): far apart, the small classes bright.
    colors=((0, 0, 0), (220, 20, 60), (119, 11, 32), (0, 0, 142), (255, 0, 255), (0, 170, 255), (255, 140, 0),
            (255, 255, 0), (140, 70, 20), (0, 160, 0), (128, 128, 128), (135, 206, 235)),
    ignore_index=255)

# Larger images would need gigabytes to decode at full resolution; refuse them with advice instead.
MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class Layout:
    """Where a dataset's files lie, as templates relative to its folder (`{id}` the image id, `{split}` a split).

    Attributes:
        images: The image of an id.
        masks: The mask of an id.
        split_files: The file listing a split's ids, one per line.
    """

    images: str = "JPEGImages/{id}.jpg"
    masks: str = "SegmentationClass/{id}.png"
    split_files: str = "ImageSets/{split}.txt"

    def folders(self) -> tuple[str, ...]:
        """The folders the templates name (`JPEGImages/`, ...), for messages and for writing a dataset."""
        return tuple(dict.fromkeys(str(Path(t).parent) + "/" for t in (self.images, self.masks, self.split_files)))


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: its id, split and files."""

    id: str
    split: str
    image: Path
    mask: Path


@dataclass(frozen=True)
class Dataset:
    """A dataset on disk: its folder, layout and classes.

    Attributes:
        root: The dataset folder.
        classes: Its classes (names, colours, ignore label).
        layout: Where its images, masks and split files lie.
        name: The layout's name, for messages (`AeroScapes`).
    """

    root: Path
    classes: ClassSet = AEROSCAPES
    layout: Layout = field(default_factory=Layout)
    name: str = "AeroScapes"

    def image_path(self, id_: str) -> Path:
        """The image file of an id."""
        return self.root / self.layout.images.format(id=id_)

    def mask_path(self, id_: str) -> Path:
        """The mask file of an id."""
        return self.root / self.layout.masks.format(id=id_)

    def split_file(self, split: str) -> Path:
        """The file listing a split's ids."""
        return self.root / self.layout.split_files.format(split=split)

    def describe(self) -> str:
        """The layout in a few words, for messages: `JPEGImages/, SegmentationClass/ and ImageSets/ (AeroScapes)`."""
        folders = self.layout.folders()
        return f"{', '.join(folders[:-1])} and {folders[-1]} in the {self.name} layout"

    def ids(self, split: str) -> list[str]:
        """The ids a split lists, in file order.

        Raises:
            CachedsegError: If the split file is missing or lists no id.
        """
        listing = self.split_file(split)
        if not listing.is_file():
            raise CachedsegError(f"{listing} is {'a folder' if listing.is_dir() else 'missing'}: a dataset in the "
                                 f"{self.name} layout lists its ids in "
                                 f"{', '.join(self.layout.split_files.format(split=s) for s in SPLITS)}")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not ids:
            raise CachedsegError(f"{listing} lists no images; add ids to it, one per line")
        return ids

    def unlisted_reason(self) -> str:
        """Why an id a store holds is no longer in the dataset, in words."""
        return f"no longer listed in {' or '.join(self.layout.split_files.format(split=s) for s in SPLITS)}"

    def samples(self, splits: tuple[str, ...] = SPLITS, missing: dict[str, str] | None = None) -> list[Sample]:
        """The samples of the splits, trn before val, checking that every file exists.

        Args:
            splits: Which splits to list.
            missing: If given, listed ids whose files are missing are left out and put here with the error they
                would have raised (extract keeps their cached entries), instead of raising it.

        Returns:
            The samples in split-file order.

        Raises:
            CachedsegError: If a split file is missing or empty, an id repeats, or a file is missing.
        """
        samples: list[Sample] = []
        seen: set[str] = set()
        for split in splits:
            listing = self.split_file(split)
            for id_ in self.ids(split):
                if id_ in seen:
                    raise CachedsegError(f"image id {id_!r} is listed twice ({listing}); each id may appear once")
                seen.add(id_)
                sample = Sample(id_, split, self.image_path(id_), self.mask_path(id_))
                absent = [p for p in (sample.image, sample.mask) if not p.is_file()]
                if absent:
                    error = (f"{absent[0]} is {'a folder' if absent[0].is_dir() else 'missing'}, but id {id_!r} is "
                             f"listed in {listing}; add the file or remove the id")
                    if missing is None:
                        raise CachedsegError(error)
                    missing[id_] = error
                    continue
                samples.append(sample)
        return samples

    def check_classes(self, classes: ClassSet, what: str) -> None:
        """Refuse to score or label this dataset for `what` (a store, a run) whose classes are not its own."""
        diffs = classes.differences(self.classes)
        if diffs:
            raise CachedsegError(f"{what} has other classes than the dataset {self.root} ({'; '.join(diffs)}, "
                                 f"{what} first); use the dataset it was built from, or extract and train on this one")

    def read_labels(self, path: str | Path) -> np.ndarray:
        """A mask file as class indices [H, W] uint8 (and the ignore label), checked against the classes."""
        labels = np.array(load_mask(path))  # writable; uint8 for L/P masks, wider for 16/32-bit ones
        self.classes.check(labels, path)
        return labels.astype(np.uint8, copy=False)  # checked: every value fits (1 byte a pixel, not 8)

    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the first image, read from its header (for --short-side)."""
        path = self.samples()[0].image
        try:  # exif_transpose would decode the whole frame: only the orientation tag is needed to swap the sides
            with own_pixel_limit(), Image.open(path) as img:
                (width, height), orientation = _refuse_huge(img, path).size, img.getexif().get(0x0112, 1)
        except (OSError, ValueError, SyntaxError) as exc:
            raise CachedsegError(f"{path} is not a readable image ({exc}); replace or remove it") from None
        return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # the tags that rotate by 90°

    def write_sample(self, id_: str, image: Image.Image, labels: np.ndarray, jpeg_quality: int = 90) -> None:
        """Write one image and its mask [H, W] uint8 where the layout puts them (for generated datasets)."""
        for path in (self.image_path(id_), self.mask_path(id_)):
            path.parent.mkdir(parents=True, exist_ok=True)
        self.classes.check(labels, self.mask_path(id_))
        image.save(self.image_path(id_), quality=jpeg_quality)
        Image.fromarray(labels).save(self.mask_path(id_), format="PNG")

    def write_splits(self, splits: dict[str, list[str]]) -> None:
        """Write the split files, one id per line."""
        for split, ids in splits.items():
            path = self.split_file(split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{i}\n" for i in ids), newline="\n")


def open_dataset(root: str | Path) -> Dataset:
    """The dataset in a folder (the AeroScapes layout and classes).

    Raises:
        CachedsegError: If there is no folder there (with near misses), or a file is given.
    """
    dataset = Dataset(Path(root))
    if not dataset.root.exists():
        raise CachedsegError(f"no dataset folder at {dataset.root} (expected {dataset.describe()})"
                             f"{did_you_mean(dataset.root)}")
    if not dataset.root.is_dir():
        raise CachedsegError(f"{dataset.root} is a file, but a dataset is a folder with {dataset.describe()}; give "
                             "that folder")
    return dataset


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
    """Decode a mask file of class indices, refusing colour masks."""
    mask = _open(path, "mask")
    if mask.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise CachedsegError(f"{path} is a {mask.mode} image, but a mask must be single-channel class indices "
                             "(0..K-1 and the ignore label); convert colour masks to indices first")
    return mask
