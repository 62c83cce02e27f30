"""What a dataset holds, checked before hours of extraction: images per split, image sizes, masks found and missing,
each class's share of the labelled pixels (the imbalance), and every problem found.

Images are not decoded: their sizes come from the file headers. Masks are decoded (they hold the class counts),
several at a time on threads (PIL's decoders release the GIL), so a few thousand masks take seconds. The labels of a
GeoTIFF map (a label raster or vector labels) are counted a band of rows at a time, so a map of any size is surveyed
in bounded memory.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from cachedseg.dataset import SPLITS, Dataset, Sample, upright_size
from cachedseg.errors import CachedsegError

BAND_PIXELS = 1 << 24  # labels of a map counted this many pixels at a time (16 MP: ~100 MB with four threads)


@dataclass(frozen=True)
class Survey:
    """A dataset's contents and problems.

    Attributes:
        dataset: What was surveyed (the dataset file or folder).
        layout: The layout in words.
        images: Images per split (those whose files exist).
        sizes: How many images have each (width, height).
        masks_missing: Ids listed whose image or mask is missing, with the error.
        class_pixels: Labelled pixels per class, over the masks read, per split [K] each.
        ignored_pixels: Pixels with the ignore label, per split.
        problems: Each problem found (an unreadable file, a size mismatch, a value or colour that is no class),
            one line each, naming the file.
        classes: The class names, by index.
        by_blocks: Whether the split is of each image's blocks: `images` then counts the images with pixels in
            each split, so an image may count in both.
        total: Images listed whose files exist.
    """

    dataset: str
    layout: str
    images: dict[str, int]
    sizes: dict[tuple[int, int], int]
    masks_missing: dict[str, str]
    class_pixels: dict[str, list[int]]
    ignored_pixels: dict[str, int]
    problems: list[str] = field(default_factory=list)
    classes: tuple[str, ...] = ()
    by_blocks: bool = False
    total: int = 0

    def shares(self, split: str = "trn") -> list[float]:
        """Each class's share of a split's labelled pixels (0 for an empty split)."""
        counts = self.class_pixels.get(split, [])
        total = sum(counts)
        return [c / total if total else 0.0 for c in counts]

    def to_json(self) -> dict:
        """Everything, as plain JSON types."""
        return {"dataset": self.dataset, "layout": self.layout, "images": self.images,
                "sizes": {f"{w}x{h}": n for (w, h), n in self.sizes.items()},
                "masks_missing": self.masks_missing, "classes": list(self.classes),
                "class_pixels": self.class_pixels, "ignored_pixels": self.ignored_pixels,
                "trn_shares": dict(zip(self.classes, self.shares("trn"))), "problems": self.problems,
                "by_blocks": self.by_blocks, "total": self.total}


def survey(dataset: Dataset, threads: int = 4, progress: Callable[[int, int], None] | None = None) -> Survey:
    """Survey a dataset: list its samples, read each image's header and decode each mask.

    Args:
        dataset: The dataset (`cachedseg.dataset.open_dataset`).
        threads: Masks decoded at a time.
        progress: Called as `progress(done, total)` after each mask.

    Returns:
        What the dataset holds and the problems found (a problem never stops the survey).

    Raises:
        CachedsegError: If the dataset cannot be listed at all (no split file, an id twice, a bad dataset file).
    """
    missing: dict[str, str] = {}
    samples = dataset.samples(missing=missing)
    k = len(dataset.classes)
    pixels = {s: np.zeros(k, dtype=np.int64) for s in SPLITS}
    ignored = dict.fromkeys(SPLITS, 0)
    blocks = dict.fromkeys(SPLITS, 0)  # images with pixels in each split, for a split by blocks
    sizes: Counter = Counter()
    problems: list[str] = []
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for sample, (size, counts, problem) in zip(samples, pool.map(lambda s: _one(dataset, s), samples)):
            if size is not None:
                sizes[size] += 1
            for split, c in (counts or {}).items():  # a map split by blocks has both
                pixels[split] += c[:k]
                ignored[split] += int(c[dataset.classes.ignore_index])
                blocks[split] += bool(c.any())
            if problem:
                problems.append(problem)
            done += 1
            if progress:
                progress(done, len(samples))
    return Survey(dataset=dataset.reference, layout=dataset.describe(),
                  images=blocks if dataset.by_blocks else {s: sum(x.split == s for x in samples) for s in SPLITS}, sizes=dict(sizes.most_common()),
                  masks_missing=missing, class_pixels={s: v.tolist() for s, v in pixels.items()},
                  ignored_pixels=ignored, problems=problems, classes=dataset.classes.names,
                  by_blocks=dataset.by_blocks, total=len(samples))


def _one(dataset: Dataset, sample: Sample) -> tuple[tuple[int, int] | None, dict[str, np.ndarray] | None, str]:
    """(image size from its header, label counts [256] of its mask by split, a problem or '') of one sample."""
    from cachedseg.windows import is_raster
    if is_raster(sample.image):
        return _one_map(dataset, sample)
    try:
        size = upright_size(sample.image)  # upright, as training sees it
    except CachedsegError as exc:
        return None, None, str(exc)
    try:
        labels = dataset.sample_labels(sample)
    except CachedsegError as exc:
        return size, None, str(exc)
    if (labels.shape[1], labels.shape[0]) != size:
        return size, None, (f"{sample.mask} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                            f"{size[0]}x{size[1]}")
    # PIL's C loop: 20x np.bincount
    return size, {sample.split: np.array(Image.fromarray(labels).histogram(), dtype=np.int64)}, ""


def _one_map(dataset: Dataset, sample: Sample) -> tuple[tuple[int, int] | None, dict[str, np.ndarray] | None, str]:
    """`_one` for a GeoTIFF: its labels read on its grid a band of rows at a time (a label raster checked as
    extraction checks it, or vector labels rasterised), never the whole raster at once."""
    from cachedseg.rasters import gdal_env
    with gdal_env():
        return _count_map(dataset, sample)


def _count_map(dataset: Dataset, sample: Sample) -> tuple[tuple[int, int] | None, dict[str, np.ndarray] | None, str]:
    """`_one_map` inside GDAL's settings."""
    from cachedseg.rasters import LabelReader, MapReader
    try:
        image = MapReader(sample.image)
    except CachedsegError as exc:
        return None, None, str(exc)
    size = (image.width, image.height)
    counts = {split: np.zeros(256, dtype=np.int64) for split in (SPLITS if dataset.by_blocks else (sample.split,))}
    try:
        labels = None
        if dataset.vector_labels is None:
            bands = 3 if dataset.mask_encoding == "rgb" else 1
            labels = LabelReader(sample.mask, image, lambda raw, known: dataset.decode_labels(raw, sample.mask, known),
                                 bands)
        rows = max(1, BAND_PIXELS // image.width)
        for y0 in range(0, image.height, rows):
            n = min(rows, image.height - y0)
            if labels is None:
                band = dataset.vector_labels.labels_of(sample.image, (y0, 0, n, image.width))
            else:
                band = labels.window(y0, 0, n, image.width, np.ones((n, image.width), dtype=bool))
            if dataset.by_blocks:  # each block's pixels to its split
                val = dataset.region("val", sample.id, y0, 0, n, image.width)
                img = Image.fromarray(band)
                counts["val"] += img.histogram(Image.fromarray(val.view(np.uint8) * np.uint8(255)))
                counts["trn"] += img.histogram(Image.fromarray((~val).view(np.uint8) * np.uint8(255)))
            else:
                counts[sample.split] += Image.fromarray(band).histogram()
        return size, counts, ""
    except CachedsegError as exc:
        return size, None, str(exc)
    finally:
        if labels is not None:
            labels.close()
        image.close()
