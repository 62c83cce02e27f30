"""Tiled datasets (`extract --tile`): every image cut into windows of the backbone's input, each window one item
of the store, with where it lies.

An image's grid is its own pixels, or with a GSD its raster resampled to that many metres a pixel (bilinear;
labels by nearest neighbour); `cachedseg.tiles.Grid` places the windows on it exactly as `predict` does, so a
cached window is the window a live prediction of the same map computes. A window is read with its validity
(alpha band, nodata value or internal mask: `cachedseg.maps`), and its labels from a label raster on the image's
grid, a mask file (frames), or vector labels rasterised onto the window; labels outside the map (nodata) become the
ignore label, so nodata is never trained as a class. A window without a valid pixel is `empty` (nothing stored);
one without a labelled pixel is stored but kept out of training.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cachedseg.data import Preprocess, preprocess_image, preprocess_mask
from cachedseg.dataset import Dataset, Sample, load_image, upright_size
from cachedseg.errors import CachedsegError
from cachedseg.maps import padded
from cachedseg.rasters import TIFF_SUFFIXES, FrameReader, LabelReader, MapReader
from cachedseg.tiles import RasterGrid, Tiling, window_id

OPEN_IMAGES = 2  # images (and their label readers) a process keeps open: windows come image by image


@dataclass(frozen=True)
class WindowSample(Sample):
    """One window of an image, a store item: `id` is the window's (`<image>@<row>_<col>`), `image` and `mask`
    the image's files.

    Attributes:
        image_id: The image's id in its dataset.
        raster: Index of the image's grid in the store's `rasters`.
        y0: First row of the window in that grid.
        x0: First column.
    """

    image_id: str = ""
    raster: int = 0
    y0: int = 0
    x0: int = 0


def is_raster(path: Path) -> bool:
    """Whether a file is read through rasterio (a TIFF) rather than decoded whole by PIL."""
    return path.suffix.lower() in TIFF_SUFFIXES


def open_image(path: Path, gsd: float | None = None) -> MapReader | FrameReader:
    """An image as a reader of windows: a TIFF through rasterio (resampled to `gsd`), any other image decoded.

    Raises:
        CachedsegError: For an unreadable image, or `gsd` on an image without a coordinate system.
    """
    if is_raster(path):
        return MapReader(path, gsd)
    if gsd is not None:
        raise CachedsegError(f"--gsd {gsd} resamples to metres a pixel, but {path} is not a GeoTIFF and has no "
                             "coordinate system; leave --gsd out for frames")
    return FrameReader(load_image(path, any_size=True))


def image_grid(sample: Sample, gsd: float | None = None) -> RasterGrid:
    """The grid an image's windows are cut from, read from its header (a frame is not decoded)."""
    if not is_raster(sample.image) and gsd is None:
        width, height = upright_size(sample.image)
        return RasterGrid(sample.id, height, width, native=(height, width))
    reader = open_image(sample.image, gsd)
    try:
        return reader.grid(sample.id)
    finally:
        reader.close()


def window_samples(samples: list[Sample], rasters: list[RasterGrid], tiling: Tiling,
                   dataset: Dataset | None = None) -> list[WindowSample]:
    """Every window of every image (`rasters[k]` the grid of `samples[k]`), image by image, row by row; in a split
    by blocks (`dataset.by_blocks`) each in the split of the block at its centre."""
    windows = []
    (h, w) = tiling.size
    for k, (sample, raster) in enumerate(zip(samples, rasters)):
        grid = raster.grid(tiling)
        splits = {}
        if dataset is not None and dataset.by_blocks:
            sy, sx = grid_scale(raster)
            val = dataset.in_val(sample.id, (np.array(grid.rows) + h / 2) * sy, (np.array(grid.cols) + w / 2) * sx)
            splits = {(y, x): "val" if val[i, j] else "trn" for i, y in enumerate(grid.rows)
                      for j, x in enumerate(grid.cols)}
        windows += [WindowSample(window_id(sample.id, y, x), splits.get((y, x), sample.split), sample.image,
                                 sample.mask, sample.id, k, y, x) for y in grid.rows for x in grid.cols]
    if dataset is not None and dataset.by_blocks and windows:
        lay = dataset.layout
        for split in ("trn", "val"):
            if not any(w.split == split for w in windows):
                raise CachedsegError(f"[splits] val_fraction = {lay.val_fraction} with block = {lay.block} puts no "
                                     f"window of the {len(samples)} image(s) of {dataset.reference} in {split}; take "
                                     "smaller blocks, another seed or another val_fraction")
    return windows


def grid_scale(raster: RasterGrid) -> tuple[float, float]:
    """The image file's pixels per pixel of its grid (rows, columns): 1 without a GSD."""
    native = raster.native or (raster.height, raster.width)
    return native[0] / raster.height, native[1] / raster.width


class WindowDataset(torch.utils.data.Dataset):
    """Windows read with their labels and preprocessed (in DataLoader workers), by sample index: `image` [3, h, w],
    `mask` [Mh, Mw] and `labelled`; or `empty` for a window without a valid pixel; or an `error` naming the file."""

    def __init__(self, samples: list[WindowSample | None], pp: Preprocess, dataset: Dataset, tiling: Tiling):
        self.samples, self.pp, self.dataset, self.tiling = samples, pp, dataset, tiling
        self._open: OrderedDict[Path, tuple] = OrderedDict()  # opened lazily, in each worker

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        try:
            return self._load(index)
        except CachedsegError as exc:
            return {"index": index, "view": 0, "error": str(exc)}

    def _readers(self, sample: WindowSample) -> tuple:
        """The image's reader and what gives its labels, opened once per process (the last few kept)."""
        if sample.image in self._open:
            self._open.move_to_end(sample.image)
            return self._open[sample.image]
        while len(self._open) >= OPEN_IMAGES:
            for reader in self._open.popitem(last=False)[1]:
                if hasattr(reader, "close"):
                    reader.close()
        image = open_image(sample.image, self.tiling.gsd)
        try:
            labels = self._labels_reader(sample, image)
        except BaseException:
            image.close()
            raise
        self._open[sample.image] = (image, labels)
        return image, labels

    def _labels_reader(self, sample: WindowSample, image):
        """A label raster's reader on the image's grid, the frame's whole labels, or None for vector labels."""
        if self.dataset.vector_labels is not None:
            return None
        if isinstance(image, MapReader) and is_raster(sample.mask):
            bands = 3 if self.dataset.mask_encoding == "rgb" else 1
            return LabelReader(sample.mask, image, lambda raw, known: self.dataset.decode_labels(raw, sample.mask,
                                                                                                known), bands)
        if image.gsd is not None:
            raise CachedsegError(f"{sample.mask}: with --gsd, labels must be a label raster (GeoTIFF) on the image's "
                                 "grid or vector labels")
        labels = self.dataset.read_labels(sample.mask)
        if labels.shape != (image.height, image.width):
            raise CachedsegError(f"{sample.mask} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                                 f"{image.width}x{image.height}; a mask must have its image's size")
        return labels

    def _load(self, index: int) -> dict:
        """Read, check and preprocess one window."""
        sample = self.samples[index]
        image, labels_source = self._readers(sample)
        (h, w), ignore = self.tiling.size, self.dataset.classes.ignore_index
        rgb, valid = image.window(sample.y0, sample.x0, h, w)  # clipped to the raster
        if not valid.any():
            return {"index": index, "view": 0, "empty": True}
        n, m = valid.shape
        if labels_source is None:
            labels = self.dataset.vector_labels.rasterize(_window_transform(image, sample), (n, m), image.crs
                                                           if getattr(image, "georeferenced", False) else None)
        elif isinstance(labels_source, np.ndarray):
            labels = labels_source[sample.y0:sample.y0 + n, sample.x0:sample.x0 + m].copy()
        else:
            labels = labels_source.window(sample.y0, sample.x0, h, w, valid)
        labels[~valid] = ignore  # outside the map: never a class
        if self.dataset.by_blocks:  # the other split's blocks: never seen by this window's split
            scale = (image.src.height / image.height, image.src.width / image.width) if isinstance(
                image, MapReader) else (1.0, 1.0)
            labels[~self.dataset.region(sample.split, sample.image_id, sample.y0, sample.x0, n, m, scale)] = ignore
        full = np.full((h, w), ignore, dtype=np.uint8)  # a raster smaller than a window: unlabelled beyond it
        full[:n, :m] = labels
        mask = preprocess_mask(full, self.pp.mask_size)
        return {"index": index, "view": 0, "image": preprocess_image(Image.fromarray(padded(rgb, (h, w))), self.pp),
                "mask": mask, "labelled": bool((mask != ignore).any())}

    def close(self) -> None:
        """Close the open images."""
        while self._open:
            for reader in self._open.popitem()[1]:
                if hasattr(reader, "close"):
                    reader.close()


def _window_transform(image, sample: WindowSample):
    """The affine transform of a window's pixels: the grid's, shifted to the window (pixel coordinates for an image
    without georeference)."""
    from affine import Affine
    base = image.transform if getattr(image, "georeferenced", False) else Affine.identity()
    return base @ Affine.translation(sample.x0, sample.y0)
