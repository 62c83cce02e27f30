"""The feature contract: what decides the numbers a backbone hands a decoder, whether cached or live.

Small and light (no zarr): a checkpoint, a live source and prediction all need the spec, none the store.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from cachedseg.classes import CLASS_NAMES
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

    @classmethod
    def from_attrs(cls, attrs: dict) -> StoreSpec:
        """Rebuild the spec from Zarr attributes or a checkpoint (JSON lists back to tuples)."""
        values = {f.name: attrs[f.name] for f in fields(cls) if f.name in attrs}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def serves(self, wanted: StoreSpec) -> bool:
        """Whether these features can feed a decoder trained on `wanted`: the same in all that decides the
        numbers, with at least as many layers (a decoder takes the last ones it needs); views may differ."""
        return (self.layers >= wanted.layers
                and replace(self, layers=wanted.layers, views=wanted.views) == wanted)


def check_dtype(dtype: str) -> None:
    """Refuse a storage dtype the store format does not have."""
    if dtype not in DTYPES:
        raise CachedsegError(f"unknown --dtype {dtype!r}; use float16 or float32")


def spec_for(backbone, dtype: str, views: tuple[str, ...] = ("identity",)) -> StoreSpec:
    """The spec of features made by `backbone` (a `cachedseg.backbone.Backbone`), stored as `dtype`, for `views`."""
    check_dtype(dtype)
    views = check_views(views)
    pp = backbone.preprocess
    return StoreSpec(backbone=backbone.config.name, fingerprint=backbone.fingerprint, input_size=pp.image_size,
                     mask_size=pp.mask_size, mean=pp.mean, std=pp.std, interpolation=pp.interpolation,
                     precision=backbone.config.precision, dtype=dtype, channels=backbone.channels,
                     grid=backbone.grid, class_names=CLASS_NAMES, layers=backbone.config.layers, views=views)


def check_spec(path: str | Path, stored: StoreSpec, wanted: StoreSpec,
               hint: str = "pass --overwrite to rebuild it, or --store to write a new one elsewhere") -> None:
    """Refuse a store whose spec differs from the one asked for, naming each difference and what to do."""
    diffs = [f"{f.name}: store has {getattr(stored, f.name)!r}, asked for {getattr(wanted, f.name)!r}"
             for f in fields(StoreSpec) if getattr(stored, f.name) != getattr(wanted, f.name)]
    if diffs:
        raise CachedsegError(f"the store {path} was built with other settings ({'; '.join(diffs)}); {hint}")
