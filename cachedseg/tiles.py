"""Sliding windows over a raster: where the windows lie and how their overlapping predictions are weighted.

Pure numpy (no raster I/O, no torch): `cachedseg.maps` reads and writes, and runs the windows in strips.

Windows have the backbone's input size and step by `size - overlap`; the last row and column are shifted inward so
that every window lies inside the raster (only a raster smaller than one window is padded). Where two windows
overlap, a raised-cosine transition of `overlap` pixels (at the end of their overlap) hands one over to the other:
their weights sum to one there, so the blend has no seam, and every weight is positive, so every pixel of a window
counts. Edges on the
raster's border are not ramped (no other window is there to take over). In the weight-1 centre of a window, at
least `overlap` pixels from any neighbour's edge, the blend is that window's prediction alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cachedseg.errors import CachedsegError

FLOOR = 1e-6  # the least weight of a window pixel: > 0, so a window counts everywhere it lies, however little


def default_overlap(size: tuple[int, int], patch: int) -> int:
    """An eighth of the window's shorter side, rounded to whole patches (at least one): 14 px at 112, 70 at 518."""
    return patch * max(1, round(min(size) / 8 / patch))


def check_overlap(overlap: int, size: tuple[int, int]) -> None:
    """Refuse an overlap below 0 or above half the window (transitions from both sides would cross)."""
    if not 0 <= overlap <= min(size) // 2:
        raise CachedsegError(f"--tile-overlap {overlap}: give 0 to {min(size) // 2} pixels (at most half the "
                             f"{size[1]}x{size[0]} window)")


def window_starts(length: int, size: int, overlap: int) -> tuple[int, ...]:
    """First pixel of each window along one axis of `length` pixels: every `size - overlap`, the last one shifted
    inward to end at the raster's end; one window at 0 when the raster is no longer than a window."""
    if length <= size:
        return (0,)
    return tuple(range(0, length - size, size - overlap)) + (length - size,)


def _handover(start: int, prev_end: int, overlap: int) -> tuple[int, int]:
    """The raster pixels (first, count) where the window starting at `start` takes over from the one before it,
    which ends at `prev_end`: the last `overlap` pixels of their overlap (all of it for regular steps). Where the
    last window is shifted inward, the one before it thus keeps its usual falling edge, which never meets its
    rising one (overlap <= size / 2), and covers the shifted window's first pixels alone."""
    width = min(overlap, prev_end - start)
    return prev_end - width, width


def _ramp(n: int) -> np.ndarray:
    """Raised cosine rising over n pixels, sampled at pixel centres: in (0, 1), and ramp + reversed ramp = 1."""
    return 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)


def axis_weights(starts: tuple[int, ...], size: int, overlap: int) -> tuple[np.ndarray, ...]:
    """Weight profile [size] float32 of each window along one axis: 0 -> 1 over its hand-over from the window before
    it, 1 -> 0 over its hand-over to the one after, 1 elsewhere, never below FLOOR."""
    profiles = []
    for i, start in enumerate(starts):
        weight = np.ones(size, dtype=np.float64)
        if i > 0:  # rising from the previous window
            first, width = _handover(start, starts[i - 1] + size, overlap)
            lo = first - start
            weight[:lo] = 0.0
            weight[lo:lo + width] *= _ramp(width)
        if i + 1 < len(starts):  # falling into the next one: the complement of its rise, pixel for pixel
            first, width = _handover(starts[i + 1], start + size, overlap)
            lo = first - start
            weight[lo:lo + width] *= 1.0 - _ramp(width)
            weight[lo + width:] = 0.0
        profiles.append(np.maximum(weight, FLOOR).astype(np.float32))
    return tuple(profiles)


@dataclass(frozen=True)
class Grid:
    """The windows over a `height` x `width` raster.

    Attributes:
        height: Raster rows.
        width: Raster columns.
        size: Window (height, width): the backbone's input.
        overlap: Pixels shared by neighbouring windows (more where the last row or column is shifted inward).
    """

    height: int
    width: int
    size: tuple[int, int]
    overlap: int

    def __post_init__(self) -> None:
        check_overlap(self.overlap, self.size)

    @cached_property
    def rows(self) -> tuple[int, ...]:
        """First raster row of each row of windows."""
        return window_starts(self.height, self.size[0], self.overlap)

    @cached_property
    def cols(self) -> tuple[int, ...]:
        """First raster column of each column of windows."""
        return window_starts(self.width, self.size[1], self.overlap)

    @cached_property
    def row_weights(self) -> tuple[np.ndarray, ...]:
        """Weight profile [size[0]] of each row of windows."""
        return axis_weights(self.rows, self.size[0], self.overlap)

    @cached_property
    def col_weights(self) -> tuple[np.ndarray, ...]:
        """Weight profile [size[1]] of each column of windows."""
        return axis_weights(self.cols, self.size[1], self.overlap)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def weight(self, r: int, c: int) -> np.ndarray:
        """Weights [h, w] of window (r, c): the outer product of its row and column profiles."""
        return self.row_weights[r][:, None] * self.col_weights[c][None, :]

    def final_after(self, r: int) -> int:
        """The raster rows before this one are final once window row r is done: no later window touches them."""
        return self.rows[r + 1] if r + 1 < len(self.rows) else self.height


@dataclass(frozen=True)
class Tiling:
    """How `extract --tile` cuts images into windows: what a tiled store and its runs record.

    Attributes:
        size: Window (height, width) in pixels of the grid the windows are cut from: the backbone's input.
        overlap: Pixels shared by neighbouring windows.
        gsd: Ground sample distance in metres a pixel that georeferenced images are resampled to first; None: the
            images' own pixels.
    """

    size: tuple[int, int]
    overlap: int
    gsd: float | None = None

    def __post_init__(self) -> None:
        check_overlap(self.overlap, self.size)
        if self.gsd is not None and not self.gsd > 0:
            raise CachedsegError(f"--gsd {self.gsd}: give the ground sample distance in metres a pixel, above 0")


@dataclass(frozen=True)
class RasterGrid:
    """The pixel grid an image's windows are cut from: its own, or resampled to a GSD.

    Attributes:
        image: The image's id in its dataset.
        height: Rows of the grid.
        width: Columns of the grid.
        crs: The coordinate system as WKT, or None.
        transform: The grid's affine pixel -> CRS transform (a, b, c, d, e, f), or None without georeference.
        native: (height, width) of the image file itself (the same as the grid's without a GSD).
    """

    image: str
    height: int
    width: int
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    native: tuple[int, int] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> RasterGrid:
        """Read one back from JSON (lists to tuples)."""
        return cls(d["image"], int(d["height"]), int(d["width"]), d.get("crs"),
                   None if d.get("transform") is None else tuple(d["transform"]),
                   None if d.get("native") is None else tuple(d["native"]))

    def to_dict(self) -> dict:
        """Plain JSON types."""
        return {"image": self.image, "height": self.height, "width": self.width, "crs": self.crs,
                "transform": None if self.transform is None else list(self.transform),
                "native": None if self.native is None else list(self.native)}

    def grid(self, tiling: Tiling) -> Grid:
        """The windows over this grid."""
        return Grid(self.height, self.width, tiling.size, tiling.overlap)


def window_id(image: str, y0: int, x0: int) -> str:
    """The id of the window at (y0, x0) of an image's grid, as a store lists it: `<image>@<y0>_<x0>`."""
    return f"{image}@{y0}_{x0}"
