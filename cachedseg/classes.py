"""A class set: the names of a dataset's classes in index order, their colours and the label of unlabelled pixels.

A dataset defines it (`cachedseg.dataset`); the store and every checkpoint record it (in the feature spec), so
`train`, `evaluate`, `predict`, `report` and `info` use the run's own classes. Light (numpy only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cachedseg.errors import CachedsegError

Color = tuple[int, int, int]


@dataclass(frozen=True)
class ClassSet:
    """The classes of a dataset.

    Attributes:
        names: Class names, by class index (0..K-1).
        colors: One RGB colour per class: the palette of every picture (and, for colour masks, the colour in the
            mask).
        ignore_index: The label of unlabelled pixels: left out of training and of the scores (K..255).
    """

    names: tuple[str, ...]
    colors: tuple[Color, ...]
    ignore_index: int = 255

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "colors", tuple(tuple(int(v) for v in c) for c in self.colors))
        if not 1 <= len(self.names) <= 255:
            raise CachedsegError(f"a class set has 1 to 255 classes (masks are 8-bit), not {len(self.names)}")
        if len(set(self.names)) != len(self.names):
            twice = sorted({n for n in self.names if self.names.count(n) > 1})
            raise CachedsegError(f"class names {twice} appear twice; each class needs its own name")
        if len(self.colors) != len(self.names):
            raise CachedsegError(f"{len(self.names)} classes but {len(self.colors)} colours; give one colour each")
        for name, color in zip(self.names, self.colors):
            if len(color) != 3 or not all(0 <= v <= 255 for v in color):
                raise CachedsegError(f"class {name!r} has colour {list(color)}; give [r, g, b], each 0-255")
        if not len(self.names) <= self.ignore_index <= 255:
            raise CachedsegError(f"ignore_index {self.ignore_index} must lie outside the class indices "
                                 f"0..{len(self.names) - 1} and fit a mask byte (at most 255)")

    def __len__(self) -> int:
        return len(self.names)

    def palette(self) -> np.ndarray:
        """uint8 [256, 3]: the colour of each label value (the ignore label and values beyond the classes black)."""
        table = np.zeros((256, 3), dtype=np.uint8)
        table[:len(self)] = np.array(self.colors, dtype=np.uint8).reshape(len(self), 3)
        return table

    def check(self, labels: np.ndarray, path: str | Path) -> None:
        """Refuse label values outside 0..K-1 other than the ignore label, naming the file and the values."""
        bad = (labels >= len(self)) & (labels != self.ignore_index)
        if bad.any():
            values = sorted(set(np.unique(labels[bad]).tolist()))[:5]
            raise CachedsegError(f"{path} has label values {values} outside 0..{len(self) - 1} (and not the "
                                 f"ignore label {self.ignore_index}); fix the mask")

    def differences(self, other: ClassSet) -> list[str]:
        """What differs between two class sets, in words a user can act on (empty when equal)."""
        diffs = []
        if self.names != other.names:
            diffs.append(f"class names {list(self.names)} vs {list(other.names)}")
        elif self.colors != other.colors:
            changed = [n for n, a, b in zip(self.names, self.colors, other.colors) if a != b]
            diffs.append(f"colours of {changed}")
        if self.ignore_index != other.ignore_index:
            diffs.append(f"ignore_index {self.ignore_index} vs {other.ignore_index}")
        return diffs


def spread_colors(n: int) -> tuple[Color, ...]:
    """`n` distinct colours for classes that come without any (black first: class 0 is usually background)."""
    colors: list[Color] = [(0, 0, 0)]
    golden = 0.618033988749895
    for i in range(1, n):  # hues spaced by the golden ratio, alternating lightness: neighbours stay apart
        h, light = (i * golden) % 1.0, (0.55, 0.8)[i % 2]
        rgb = [min(1.0, max(0.0, abs((h * 6 + k) % 6 - 3) - 1)) for k in (0, 4, 2)]
        colors.append(tuple(int(round(255 * light * c + (1 - light) * 40)) for c in rgb))
    return tuple(colors[:n])
