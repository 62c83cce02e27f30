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
import fnmatch
import functools
import hashlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from cachedseg.classes import ClassSet, Color
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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")  # what an `images` glob picks up
MASK_ENCODINGS = ("index", "rgb")
DATASET_FILE = "dataset.toml"  # a folder holding one is described by it
_WILDCARDS = "*?["
_UNKNOWN = 0xFFFF  # a colour that is no class, in the rgb lookup table


@dataclass(frozen=True)
class Layout:
    """Where a dataset's files lie, relative to its folder.

    Attributes:
        images: A template with `{id}` (`JPEGImages/{id}.jpg`: ids come from the split files), or a glob
            (`images/*.jpg`, `seq*/Images/*.png`): the id of a file found is its path relative to the glob's fixed
            leading folder, without its suffix.
        masks: A template with `{id}`, `{stem}` (the id's last part) and `{dir}` (the image's folder relative to
            the dataset's), e.g. `masks/{stem}.png` or `{dir}/../Labels/{stem}.png`.
        split_files: (split, file) pairs: each file lists a split's ids, one per line (a value with wildcards is a
            pattern the split's ids match instead, e.g. `train/*` for a dataset split by folder); or None, for
            `val_fraction`.
        val_fraction: Without split files: the share of ids put in val, by a hash of the id (and `seed`), so adding
            images never moves existing ones.
        seed: Seeds that hash.
        block: With `val_fraction`, a split of every image's area instead of whole images (for one or a few
            orthomosaics; `extract --tile` only): square blocks of this many pixels of the image file, each put in
            val by a hash of (image, block row, block column); a window goes to the split of the block at its
            centre and keeps only the labels of its own split's blocks, so no val label is ever trained on.
    """

    images: str = "JPEGImages/{id}.jpg"
    masks: str = "SegmentationClass/{id}.png"
    split_files: tuple[tuple[str, str], ...] | None = (("trn", "ImageSets/trn.txt"), ("val", "ImageSets/val.txt"))
    val_fraction: float | None = None
    seed: int = 0
    block: int | None = None

    @property
    def globbed(self) -> bool:
        """Whether the images are found by a glob (else named by a template with `{id}`)."""
        return "{id}" not in self.images

    @property
    def fixed(self) -> str:
        """The glob's leading folder without wildcards (ids are relative to it)."""
        parts = Path(self.images).parts
        lead = next((i for i, p in enumerate(parts) if any(c in p for c in _WILDCARDS)), len(parts) - 1)
        return str(Path(*parts[:lead])) if lead else ""

    def folders(self) -> tuple[str, ...]:
        """The folders the layout names (`JPEGImages/`, ...), for messages."""
        files = [self.images, self.masks] + [f for _, f in self.split_files or ()]
        return tuple(dict.fromkeys(str(Path(t).parent) + "/" for t in files))


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: its id, split and files."""

    id: str
    split: str
    image: Path
    mask: Path


@dataclass(frozen=True)
class Dataset:
    """A dataset on disk: its folder, layout, classes and how its masks encode them.

    Attributes:
        root: The dataset folder (paths in the layout are relative to it).
        classes: Its classes (names, colours, ignore label).
        layout: Where its images, masks and split files lie.
        name: A name for messages (`AeroScapes`).
        mask_encoding: `index` (single-channel class indices) or `rgb` (each class in its colour).
        ignore_colors: For rgb masks: colours that mean unlabelled (become the ignore label).
        remap: For index masks: (value in the file, class index or the ignore label) pairs, applied first, to merge
            or drop classes.
        file: The dataset file that describes it, if any.
        labels: Instead of masks: one vector file (GeoPackage, GeoJSON) of class polygons, rasterised onto each
            image's grid (`cachedseg.vector_labels`).
        label_field: The vector file's attribute that holds each polygon's class (index or name).
    """

    root: Path
    classes: ClassSet = AEROSCAPES
    layout: Layout = field(default_factory=Layout)
    name: str = "AeroScapes"
    mask_encoding: str = "index"
    ignore_colors: tuple[Color, ...] = ()
    remap: tuple[tuple[int, int], ...] = ()
    file: Path | None = None
    labels: Path | None = None
    label_field: str = "class"

    @property
    def reference(self) -> str:
        """What a store or run records to open this dataset again: the dataset file, or the folder (absolute)."""
        return str((self.file or self.root).resolve())

    @cached_property
    def _images(self) -> dict[str, Path]:
        """id -> image file, for a globbed layout (found once)."""
        fixed, found = self.root / self.layout.fixed, {}
        for path in sorted(self.root.glob(self.layout.images)):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            id_ = path.relative_to(fixed).with_suffix("").as_posix()
            if id_ in found:
                raise CachedsegError(f"{found[id_]} and {path} both give the image id {id_!r} (ids drop the suffix); "
                                     "keep one of them, or narrow `images` in the dataset file")
            found[id_] = path
        return found

    def image_path(self, id_: str) -> Path:
        """The image file of an id (for an id a glob did not find: where it would be)."""
        if not self.layout.globbed:
            return self.root / self.layout.images.format(id=id_)
        found = self._images.get(id_)
        return found if found is not None else self.root / self.layout.fixed / (id_ + self._suffix())

    def _suffix(self) -> str:
        """The image suffix the glob names (`.jpg` if it names none), for files written or looked for."""
        suffix = Path(self.layout.images).suffix
        return suffix if suffix and not any(c in suffix for c in _WILDCARDS) else ".jpg"

    def mask_path(self, id_: str) -> Path:
        """The mask file of an id (the vector file, for vector labels)."""
        if self.labels is not None:
            return self.labels
        image = (Path(self.layout.fixed) / id_) if self.layout.globbed else Path(self.layout.images.format(id=id_))
        folder = image.parent.as_posix()
        return Path(os.path.normpath(self.root / self.layout.masks.format(id=id_, stem=Path(id_).name, dir=folder)))

    def split_file(self, split: str) -> Path | None:
        """The file listing a split's ids (None for a split by hash or by id pattern)."""
        value = dict(self.layout.split_files or ()).get(split)
        return None if value is None or is_id_pattern(value) else self.root / value

    def _split_pattern(self, split: str) -> str | None:
        """The pattern a split's ids match, if the split is given by one."""
        value = dict(self.layout.split_files or ()).get(split)
        return value if value is not None and is_id_pattern(value) else None

    def describe(self) -> str:
        """The layout in a few words, for messages."""
        if self.file is not None:
            return f"the layout {self.file} describes (images = {self.layout.images!r})"
        folders = self.layout.folders()
        return f"{', '.join(folders[:-1])} and {folders[-1]} in the {self.name} layout"

    def split_of(self, id_: str) -> str:
        """The split of an id in a split by hash: stable, whatever else is added."""
        digest = hashlib.blake2b(f"{self.layout.seed}\0{id_}".encode(), digest_size=8).digest()
        return "val" if int.from_bytes(digest, "little") / 2 ** 64 < self.layout.val_fraction else "trn"

    @property
    def by_blocks(self) -> bool:
        """Whether the split is of blocks of each image's area (`Layout.block`) rather than of whole images."""
        return self.layout.block is not None

    def block_rule(self) -> dict | None:
        """The split by blocks as a store records it (None for a split of whole images)."""
        lay = self.layout
        return None if lay.block is None else {"block": lay.block, "val_fraction": lay.val_fraction, "seed": lay.seed}

    def in_val(self, image_id: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """In a split by blocks: whether each pixel lies in a val block, [len(rows), len(cols)] bool, for pixel
        centres at `rows` x `cols` in the image file's pixel coordinates (fractional where a grid is resampled)."""
        by, bx = (np.asarray(rows) // self.layout.block).astype(np.int64), (np.asarray(cols) // self.layout.block
                                                                            ).astype(np.int64)
        (ub, ib), (ux, ix) = np.unique(by, return_inverse=True), np.unique(bx, return_inverse=True)
        table = np.array([[self.split_of(f"{image_id}\0{a}\0{b}") == "val" for b in ux] for a in ub], dtype=bool)
        return table.reshape(len(ub), len(ux))[ib.reshape(-1)][:, ix.reshape(-1)]

    def region(self, split: str, image_id: str, y0: int, x0: int, height: int, width: int,
               scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
        """In a split by blocks: which pixels of a window [height, width] of an image's grid lie in `split`'s blocks;
        `scale` is the image file's pixels per grid pixel (rows, columns), above 1 for a grid resampled coarser."""
        rows = (np.arange(y0, y0 + height) + 0.5) * scale[0]
        cols = (np.arange(x0, x0 + width) + 0.5) * scale[1]
        val = self.in_val(image_id, rows, cols)
        return val if split == "val" else ~val

    def ids(self, split: str) -> list[str]:
        """The ids of a split, in file order (or, for a split by hash, in path order).

        Raises:
            CachedsegError: If the split file is missing or lists no id, or a split by hash is empty.
        """
        listing, pattern = self.split_file(split), self._split_pattern(split)
        if self.by_blocks:  # every image is split by its blocks: each listed once (as trn), its windows take theirs
            return list(self._images) if split == "trn" else []
        if pattern is not None:
            ids = [i for i in self._images if fnmatch.fnmatchcase(i, pattern)]
            if not ids:
                raise CachedsegError(f"the {split} split of {self.reference} is empty: no id of the {len(self._images)} "
                                     f"images matching images = {self.layout.images!r} matches {split} = {pattern!r}")
            return ids
        if listing is None:
            ids = [i for i in self._images if self.split_of(i) == split]
            if not ids:
                raise CachedsegError(f"the {split} split of {self.reference} is empty: {len(self._images)} images "
                                     f"match images = {self.layout.images!r}, val_fraction "
                                     f"{self.layout.val_fraction} puts none there; add images or change val_fraction")
            return ids
        if not listing.is_file():
            names = ", ".join(str(self.split_file(s).relative_to(self.root)) for s in SPLITS)
            raise CachedsegError(f"{listing} is {'a folder' if listing.is_dir() else 'missing'}: a dataset in the "
                                 f"{self.name} layout lists its ids in {names}")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not ids:
            raise CachedsegError(f"{listing} lists no images; add ids to it, one per line")
        return ids

    def unlisted_reason(self) -> str:
        """Why an id a store holds is no longer in the dataset, in words."""
        if self.layout.split_files is None or any(is_id_pattern(f) for _, f in self.layout.split_files):
            return f"no image matches images = {self.layout.images!r} and its split for it any more"
        return f"no longer listed in {' or '.join(f for _, f in self.layout.split_files)}"

    def samples(self, splits: tuple[str, ...] = SPLITS, missing: dict[str, str] | None = None) -> list[Sample]:
        """The samples of the splits, trn before val, checking that every file exists.

        Args:
            splits: Which splits to list.
            missing: If given, listed ids whose files are missing are left out and put here with the error they
                would have raised (extract keeps their cached entries), instead of raising it.

        Returns:
            The samples in split order.

        Raises:
            CachedsegError: If a split file is missing or empty, an id repeats, or a file is missing.
        """
        samples: list[Sample] = []
        seen: set[str] = set()
        for split in splits:
            listing = self.split_file(split)
            where = f"listed in {listing}" if listing is not None else f"found by images = {self.layout.images!r}"
            for id_ in self.ids(split):
                if id_ in seen:
                    raise CachedsegError(f"image id {id_!r} is listed twice ({listing}); each id may appear once")
                seen.add(id_)
                sample = Sample(id_, split, self.image_path(id_), self.mask_path(id_))
                absent = [p for p in (sample.image, sample.mask) if not p.is_file()]
                if absent:
                    error = (f"{absent[0]} is {'a folder' if absent[0].is_dir() else 'missing'}, but id {id_!r} is "
                             f"{where}; add the file or remove the id")
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
            raise CachedsegError(f"{what} has other classes than the dataset {self.reference} ({'; '.join(diffs)}, "
                                 f"{what} first); use the dataset it was built from, or extract and train on this one")

    @cached_property
    def vector_labels(self):
        """The vector labels (`cachedseg.vector_labels.VectorLabels`), or None for mask files."""
        if self.labels is None:
            return None
        from cachedseg.vector_labels import VectorLabels
        return VectorLabels(self.labels, self.label_field, self.classes)

    def sample_labels(self, sample: Sample) -> np.ndarray:
        """A sample's class indices [H, W] uint8 on its image's grid: its mask file decoded, or the vector labels
        rasterised; checked."""
        if self.vector_labels is not None:
            return self.vector_labels.labels_of(sample.image)
        return self.read_labels(sample.mask)

    def read_labels(self, path: str | Path) -> np.ndarray:
        """A mask file as class indices [H, W] uint8 (and the ignore label), decoded and checked."""
        if self.mask_encoding == "rgb":
            img = _open(path, "mask")
            return self.decode_labels(np.asarray(img if img.mode == "RGB" else img.convert("RGB")), path)
        return self.decode_labels(np.array(load_mask(path)), path)  # writable; wider than uint8 for 16-bit masks

    def decode_labels(self, raw: np.ndarray, where: str | Path, known: np.ndarray | None = None) -> np.ndarray:
        """Mask values as read from a file (index: [H, W]; rgb: [H, W, 3]) -> class indices [H, W] uint8, checked
        (errors name `where`); pixels not `known` (nodata) become the ignore label unchecked."""
        ignore = self.classes.ignore_index
        if self.mask_encoding == "rgb":
            labels = _decode_rgb(raw, self.classes, self.ignore_colors, self.reference, where, known)
        else:
            labels = raw
            if self.remap:
                table = _remap_table(self.remap)
                inside = (labels >= 0) & (labels < len(table))
                labels = np.where(inside, table[np.where(inside, labels, 0)], labels)
            if known is not None:
                labels = np.where(known, labels, ignore)
            self.classes.check(labels, where)
            labels = labels.astype(np.uint8, copy=False)  # checked: every value fits (1 byte a pixel, not 8)
        return labels

    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the first image, read from its header (for --short-side)."""
        path = self.samples()[0].image
        return upright_size(path, any_size=False)

    def new_id(self, sequence: int, frame: int, split: str) -> str:
        """An id for a generated image of `split` that this layout finds (`synth`): a folder wildcard gets what the
        split's id pattern puts there, else the sequence number; the file name's wildcard `<sequence>_<frame>`."""
        if not self.layout.globbed:
            return f"{sequence:06d}_{frame:03d}"
        if any(c in self.layout.images for c in "?[") or "**" in self.layout.images:
            raise CachedsegError(f"images = {self.layout.images!r}: generated data can only be written into a layout "
                                 "whose glob uses plain * wildcards")
        rel = Path(self.layout.images).relative_to(self.layout.fixed) if self.layout.fixed else Path(self.layout.images)
        pattern = (self._split_pattern(split) or "").split("/")
        parts = []
        for i, part in enumerate(rel.parts[:-1]):
            given = pattern[i] if i < len(pattern) else ""
            parts.append(given if given and not is_id_pattern(given) and fnmatch.fnmatchcase(given, part)
                         else part.replace("*", f"{sequence:02d}"))
        name = rel.parts[-1]
        stem = name[:-len(self._suffix())] if name.endswith(self._suffix()) else name
        id_ = "/".join([*parts, stem.replace("*", f"{sequence:06d}_{frame:03d}")])
        if self._split_pattern(split) and not fnmatch.fnmatchcase(id_, self._split_pattern(split)):
            raise CachedsegError(f"cannot generate ids for {split} = {self._split_pattern(split)!r} from images = "
                                 f"{self.layout.images!r}")
        return id_

    def write_sample(self, id_: str, image: Image.Image, labels: np.ndarray, jpeg_quality: int = 90) -> None:
        """Write one image and its mask [H, W] uint8 (class indices; in their colours for rgb masks) where the
        layout puts them (for generated datasets)."""
        self.classes.check(labels, self.mask_path(id_))
        image_path = self.image_path(id_)
        for path in (image_path, self.mask_path(id_)):
            path.parent.mkdir(parents=True, exist_ok=True)
        image.save(image_path, quality=jpeg_quality)
        mask = Image.fromarray(self.classes.palette()[labels] if self.mask_encoding == "rgb" else labels)
        mask.save(self.mask_path(id_), format="PNG")
        if self.layout.globbed:
            self._images[id_] = image_path

    def write_splits(self, splits: dict[str, list[str]]) -> None:
        """Write the split files, one id per line (nothing for a split by hash)."""
        for split, ids in splits.items():
            path = self.split_file(split)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(f"{i}\n" for i in ids), newline="\n")


def is_id_pattern(value: str) -> bool:
    """Whether a [splits] value is an id pattern (has wildcards) rather than a file."""
    return any(c in value for c in _WILDCARDS)


def _decode_rgb(rgb: np.ndarray, classes: ClassSet, ignore_colors: tuple[Color, ...], where: str,
                path: str | Path, known: np.ndarray | None = None) -> np.ndarray:
    """A colour mask [H, W, 3] -> class indices [H, W] uint8, refusing colours that are no class and not ignored
    (pixels not `known`: the ignore label)."""
    key = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    labels = _rgb_table(classes.colors, ignore_colors, classes.ignore_index)[key]  # [H, W] uint16
    if known is not None:
        labels[~known] = classes.ignore_index
    unknown = labels == _UNKNOWN
    if unknown.any():
        colors, counts = np.unique(key[unknown], return_counts=True)
        top = int(colors[counts.argmax()])
        more = f" (and {len(colors) - 1} more colours)" if len(colors) > 1 else ""
        raise CachedsegError(f"{path} has the colour {[top >> 16, (top >> 8) & 255, top & 255]} on {counts.max()} "
                             f"pixels{more}, which is no class of {where} and not in ignore_colors; add it to "
                             "[[classes]] or to ignore_colors")
    return labels.astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _rgb_table(colors: tuple[Color, ...], ignore_colors: tuple[Color, ...], ignore_index: int) -> np.ndarray:
    """uint16 [2^24]: the class of each 24-bit colour (the ignore label for ignored ones, _UNKNOWN for the rest)."""
    table = np.full(1 << 24, _UNKNOWN, dtype=np.uint16)
    for value, colour_list in ((ignore_index, ignore_colors), *((i, (c,)) for i, c in enumerate(colors))):
        for r, g, b in colour_list:
            table[(r << 16) | (g << 8) | b] = value
    return table


@functools.lru_cache(maxsize=4)
def _remap_table(remap: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The lookup table of a remap: every value to itself, except those remapped."""
    table = np.arange(max(256, max(k for k, _ in remap) + 1), dtype=np.int64)
    for k, v in remap:
        table[k] = v
    return table


def open_dataset(path: str | Path) -> Dataset:
    """The dataset at `path`: a dataset file (`.toml`), a folder with a `dataset.toml`, or a folder in the
    AeroScapes layout.

    Raises:
        CachedsegError: If there is nothing there (with near misses), or a file that is no dataset file.
    """
    path = Path(path)
    if not path.exists():
        raise CachedsegError(f"no dataset folder at {path} (expected {Dataset(path).describe()}, or a "
                             f"{DATASET_FILE}){did_you_mean(path)}")
    from cachedseg.dataset_file import load_dataset_file  # its own module: the dataset file's format

    if path.is_file():
        if path.suffix != ".toml":
            raise CachedsegError(f"{path} is a file, but a dataset is a folder with {Dataset(path).describe()}, or a "
                                 ".toml dataset file; give that folder or file")
        return load_dataset_file(path)
    if (path / DATASET_FILE).is_file():
        return load_dataset_file(path / DATASET_FILE)
    return Dataset(path)


@contextlib.contextmanager
def own_pixel_limit() -> Iterator[None]:
    """PIL's own bomb check off (a raw warning at 89 MP, an error at 179 MP): MAX_PIXELS, checked from the header
    before decoding, is the one rule."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(width: int, height: int, path: str | Path, any_size: bool = False) -> None:
    """Refuse an image over MAX_PIXELS (read now: tests lower it), unless `any_size`."""
    if not any_size and width * height > MAX_PIXELS:
        raise CachedsegError(f"{path} is {width}x{height}, over {MAX_PIXELS // 10**6} megapixels; "
                             "downscale it before use")


def upright_size(path: str | Path, any_size: bool = True) -> tuple[int, int]:
    """(width, height) of an image as it is shown (EXIF rotation applied), from its header alone (exif_transpose
    would decode the whole frame: only the orientation tag is needed to swap the sides); over MAX_PIXELS refused
    unless `any_size`, before anything past the header is read."""
    try:
        with own_pixel_limit(), Image.open(path) as img:
            _check_pixels(img.width, img.height, path, any_size)
            (width, height), orientation = img.size, img.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError) as exc:
        raise CachedsegError(f"{path} is not a readable image ({exc}); replace or remove it") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # the tags that rotate by 90°


def _open(path: str | Path, what: str, any_size: bool = False) -> Image.Image:
    """Open and fully decode an image file, turning every decoder failure into one clear error."""
    try:
        with own_pixel_limit():
            img = Image.open(path)  # reads the header only
            _check_pixels(img.width, img.height, path, any_size)
            img.load()
        return img
    except CachedsegError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's "not a readable image"
        raise CachedsegError(f"{path} is not a readable {what} ({exc}); replace or remove it") from None


def load_image(path: str | Path, any_size: bool = False) -> Image.Image:
    """Decode an image file to upright 8-bit RGB (EXIF orientation applied; 16-bit and float images rescaled),
    refusing one over MAX_PIXELS unless `any_size` (tiled prediction, which never resizes a frame whole)."""
    img = _open(path, "image", any_size)
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
                             f"(0..K-1 and the ignore label); for colour masks describe the classes' colours in a "
                             f"{DATASET_FILE} with mask_encoding = \"rgb\"")
    return mask


def choose_dataset(data: str | Path | None, file: str | Path | None) -> Path:
    """The dataset a command was given: DATA (a folder or a .toml file), or `--dataset FILE` (DATA may then be
    only the file's own folder, since the file's paths are relative to it).

    Raises:
        CachedsegError: If neither is given, FILE is not a .toml file, or the two disagree.
    """
    if file is None:
        if data is None:
            raise CachedsegError("give a dataset: a folder (DATA), or --dataset FILE.toml")
        return Path(data)
    file = Path(file)
    if not file.is_file() or file.suffix != ".toml":
        raise CachedsegError(f"--dataset {file}: {'no such file' if not file.exists() else 'not a .toml file'}"
                             f"{did_you_mean(file) if not file.exists() else ''}; give a dataset file (TOML)")
    if data is not None and Path(data).resolve() not in (file.resolve(), file.resolve().parent):
        raise CachedsegError(f"{data} and --dataset {file}: the file's paths are relative to its own folder "
                             f"({file.parent}); give --dataset alone, or put the file into {data} as {DATASET_FILE}")
    return file


def is_dataset(path: str | Path) -> bool:
    """Whether a local path is a dataset: a dataset file, or a folder with one or with the AeroScapes split files."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".toml"
    return path.is_dir() and ((path / DATASET_FILE).is_file()
                              or all(Dataset(path).split_file(s).is_file() for s in SPLITS))
