"""The feature contract: what decides the numbers a backbone hands a decoder, whether cached or live.

Small and light (no zarr): a checkpoint, a live source and prediction all need the spec, none the store.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from cachedseg.classes import ClassSet, spread_colors
from cachedseg.errors import CachedsegError
from cachedseg.views import check_views

DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class StoreSpec:
    """Everything that decides the numbers in a store; a store is reused only if its spec matches exactly."""

    backbone: str
    fingerprint: str
    input_size: tuple[int, int]
    mask_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    precision: str
    dtype: str
    channels: int
    grid: tuple[int, int]
    class_names: tuple[str, ...]
    layers: int = 1
    views: tuple[str, ...] = ("identity",)
    class_colors: tuple[tuple[int, int, int], ...] = ()
    ignore_index: int = 255
    tile_overlap: int | None = None
    gsd: float | None = None

    def __post_init__(self) -> None:
        if not self.class_colors:  # a store or checkpoint from before colours were recorded
            object.__setattr__(self, "class_colors", default_colors(self.class_names))

    @property
    def tiled(self) -> bool:
        """Whether the features are of windows cut from the images (`extract --tile`), not of whole resized frames;
        the windows then have the input size and share `tile_overlap` pixels, in a grid of `gsd` metres a pixel
        (None: the images' own pixels)."""
        return self.tile_overlap is not None

    @property
    def classes(self) -> ClassSet:
        """The class set the masks and the decoder's outputs index."""
        return ClassSet(self.class_names, self.class_colors, self.ignore_index)

    @classmethod
    def from_attrs(cls, attrs: dict) -> StoreSpec:
        """Rebuild the spec from Zarr attributes or a checkpoint (JSON lists back to tuples)."""
        values = {f.name: attrs[f.name] for f in fields(cls) if f.name in attrs}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        if "class_colors" in values:
            values["class_colors"] = tuple(tuple(c) for c in values["class_colors"])
        return cls(**values)

    def serves(self, wanted: StoreSpec) -> bool:
        """Whether these features can feed a decoder trained on `wanted`: the same in all that decides the
        numbers, with at least as many layers (a decoder takes the last ones it needs); views may differ."""
        return (self.layers >= wanted.layers
                and replace(self, layers=wanted.layers, views=wanted.views) == wanted)


def check_dtype(dtype: str) -> None:
    """Refuse a storage dtype the store format does not have."""
    if dtype not in DTYPES:
        raise CachedsegError(f"unknown --dtype {dtype!r}; use float16 or float32")


def default_colors(names: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    """The colours of classes recorded without any: AeroScapes' for its classes (every store before colours were
    recorded), spread hues otherwise."""
    from cachedseg.dataset import AEROSCAPES
    return AEROSCAPES.colors if tuple(names) == AEROSCAPES.names else spread_colors(len(names))


def spec_for(backbone, dtype: str, classes: ClassSet, views: tuple[str, ...] = ("identity",),
             tiling=None) -> StoreSpec:
    """The spec of features made by `backbone` (a `cachedseg.backbone.Backbone`), stored as `dtype`, for a dataset
    of `classes`, in `views`, of windows cut by `tiling` (a `cachedseg.tiles.Tiling`; None: whole frames)."""
    check_dtype(dtype)
    views = check_views(views)
    pp = backbone.preprocess
    return StoreSpec(backbone=backbone.config.name, fingerprint=backbone.fingerprint, input_size=pp.image_size,
                     mask_size=pp.mask_size, mean=pp.mean, std=pp.std, interpolation=pp.interpolation,
                     precision=backbone.config.precision, dtype=dtype, channels=backbone.channels,
                     grid=backbone.grid, class_names=classes.names, layers=backbone.config.layers, views=views,
                     class_colors=classes.colors, ignore_index=classes.ignore_index,
                     tile_overlap=None if tiling is None else tiling.overlap, gsd=None if tiling is None else tiling.gsd)


def check_spec(path: str | Path, stored: StoreSpec, wanted: StoreSpec,
               hint: str = "pass --overwrite to rebuild it, or --store to write a new one elsewhere") -> None:
    """Refuse a store whose spec differs from the one asked for, naming each difference and what to do."""
    classes = ("class_names", "class_colors", "ignore_index")  # named together, in a user's words
    diffs = [f"{f.name}: store has {getattr(stored, f.name)!r}, asked for {getattr(wanted, f.name)!r}"
             for f in fields(StoreSpec) if f.name not in classes and getattr(stored, f.name) != getattr(wanted, f.name)]
    diffs += [f"classes: store has {d}" for d in stored.classes.differences(wanted.classes)]
    if diffs:
        raise CachedsegError(f"the store {path} was built with other settings ({'; '.join(diffs)}); {hint}")
