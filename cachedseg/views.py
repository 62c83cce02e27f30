"""Views: the augmentations a store can cache. A view is a deterministic transform of the preprocessed input
tensor [3, H, W] that keeps the token grid, with an exact inverse on any grid of labels or logits, so that a
prediction made in a view maps back to the original frame pixel for pixel.

    identity   the image as it is (always view 0)
    flip       mirrored left to right; its own inverse

A store with views holds features [N, V, L, C, h, w] and the identity view's masks; a view's mask is the stored
mask transformed by the view. Views that change the grid (other scales, crops) would need arrays of their own
shape and are not stored yet.
"""

from __future__ import annotations

import numpy as np

from cachedseg.errors import CachedsegError

VIEWS = ("identity", "flip")


def apply_view(x, view: str):
    """A view of images, labels or logits [..., H, W] (numpy or torch); every view here is its own inverse."""
    if view == "identity":
        return x
    if view == "flip":
        return np.ascontiguousarray(x[..., ::-1]) if isinstance(x, np.ndarray) else x.flip(-1)
    raise CachedsegError(f"unknown view {view!r}; use {', '.join(VIEWS)}")


def check_views(views: tuple[str, ...]) -> tuple[str, ...]:
    """Views as a store records them: identity first, then known extra views, each once."""
    views = tuple(views)
    if "identity" not in views:
        views = ("identity", *views)
    unknown = [v for v in views if v not in VIEWS]
    if unknown or views[0] != "identity" or len(set(views)) != len(views):
        raise CachedsegError(f"--views {','.join(views)}: give extra views out of {', '.join(VIEWS[1:])}, each once")
    return views
