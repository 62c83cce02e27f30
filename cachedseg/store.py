"""The feature store: a plain Zarr v3 group that any tool can read (layout documented in the README).

    <store>.zarr/           attributes: format, format_version, the StoreSpec fields, dataset, package_version
        features  [N, C, h, w] float16|float32, one image per chunk, crc32c-checked
        masks     [N, M, M]    uint8 class indices (255 = ignore), one image per chunk, zstd + crc32c
        ids       [N]          str, the dataset's image ids
        split     [N]          str, "trn" or "val"
        done      [N]          uint8 per image: 0 pending, 1 features and mask written, 2 skipped as unreadable
                               (`extract --skip-bad`; the reason is in the `bad` attribute); one chunk per image
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from cachedseg import __version__
from cachedseg.classes import CLASS_NAMES
from cachedseg.errors import CachedsegError

FORMAT = "cachedseg-features"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
PENDING, DONE, BAD = 0, 1, 2  # values of the `done` flags


@dataclass(frozen=True)
class StoreSpec:
    """Everything that decides the numbers in a store; a store is reused only if its spec matches exactly."""

    backbone: str
    fingerprint: str
    image_size: int
    mask_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    precision: str
    dtype: str
    channels: int
    grid: tuple[int, int]
    class_names: tuple[str, ...]

    @classmethod
    def from_attrs(cls, attrs: dict) -> StoreSpec:
        """Rebuild the spec from Zarr attributes (JSON lists back to tuples)."""
        values = {f.name: attrs[f.name] for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def check_dtype(dtype: str) -> None:
    """Refuse a storage dtype the store format does not have."""
    if dtype not in DTYPES:
        raise CachedsegError(f"unknown --dtype {dtype!r}; use float16 or float32")


def spec_for(backbone, dtype: str) -> StoreSpec:
    """The spec of features made by `backbone` (a `cachedseg.backbone.Backbone`) and stored as `dtype`."""
    check_dtype(dtype)
    pp = backbone.preprocess
    return StoreSpec(backbone=backbone.config.name, fingerprint=backbone.fingerprint, image_size=pp.image_size,
                     mask_size=pp.mask_size, mean=pp.mean, std=pp.std, interpolation=pp.interpolation,
                     precision=backbone.config.precision, dtype=dtype, channels=backbone.channels,
                     grid=backbone.grid, class_names=CLASS_NAMES)


def is_store(path: str | Path) -> bool:
    """Whether `path` holds a cachedseg feature store."""
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == FORMAT
    except (FileNotFoundError, ValueError, OSError, zarr.errors.BaseZarrError):
        return False


def open_store(path: str | Path, mode: str = "r") -> tuple[zarr.Group, StoreSpec]:
    """Open a feature store and check its format.

    Args:
        path: The store folder.
        mode: `r` to read, `r+` to finish writing it.

    Returns:
        The Zarr group and its spec.

    Raises:
        CachedsegError: If there is no store there or it has another format version.
    """
    if not Path(path).exists():
        raise CachedsegError(f"no feature store at {path}; build one with `cachedseg extract DATA --store {path}`")
    if not is_store(path):
        raise CachedsegError(f"{path} is not a cachedseg feature store")
    group = zarr.open_group(str(path), mode=mode)
    version = group.attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise CachedsegError(f"{path} has store format version {version}, this cachedseg ({__version__}) reads "
                             f"version {FORMAT_VERSION}; rebuild it with `cachedseg extract ... --overwrite`")
    return group, StoreSpec.from_attrs(dict(group.attrs))


def create_store(path: str | Path, spec: StoreSpec, ids: list[str], splits: list[str], dataset: str,
                 weights: str) -> zarr.Group:
    """Create an empty store for `ids`, with every `done` flag at 0; `weights` records where the weights came from."""
    n, (h, w), m = len(ids), spec.grid, spec.mask_size
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(spec), "ignore_index": 255,
             "num_images": n, "dataset": dataset, "weights": weights, "package_version": __version__, "bad": {}}
    group = zarr.open_group(str(path), mode="w", attributes=attrs)
    # One image per chunk keeps shuffled training reads fast; float features barely compress, so only a
    # checksum: a corrupted chunk must fail loudly, never decode to wrong numbers.
    group.create_array("features", shape=(n, spec.channels, h, w), chunks=(1, spec.channels, h, w),
                       dtype=spec.dtype, compressors=[Crc32cCodec()], fill_value=0,
                       dimension_names=("image", "channel", "y", "x"))
    group.create_array("masks", shape=(n, m, m), chunks=(1, m, m), dtype="uint8",
                       compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=255,
                       dimension_names=("image", "y", "x"))
    for name, values in (("ids", ids), ("split", splits)):  # dtype=str: vlen-utf8, a stable zarr v3 type
        group.create_array(name, shape=(n,), chunks=(n,), dtype=str)[:] = np.array(values, dtype=object)
    # One chunk per flag: writers never rewrite each other's flags, and a flag lands only after its data.
    group.create_array("done", shape=(n,), chunks=(1,), dtype="uint8", fill_value=0)
    return group


def check_spec(path: str | Path, stored: StoreSpec, wanted: StoreSpec,
               hint: str = "pass --overwrite to rebuild it, or --store to write a new one elsewhere") -> None:
    """Refuse a store whose spec differs from the one asked for, naming each difference and what to do."""
    diffs = [f"{f.name}: store has {getattr(stored, f.name)!r}, asked for {getattr(wanted, f.name)!r}"
             for f in fields(StoreSpec) if getattr(stored, f.name) != getattr(wanted, f.name)]
    if diffs:
        raise CachedsegError(f"the store {path} was built with other settings ({'; '.join(diffs)}); {hint}")


def remove_store(path: str | Path) -> None:
    """Delete a store, refusing anything that is not one (so --overwrite never deletes user data)."""
    path = Path(path)
    if path.exists():
        if not is_store(path):
            raise CachedsegError(f"{path} exists and is not a cachedseg feature store; refusing to overwrite it")
        shutil.rmtree(path)


def remove_partials(path: str | Path) -> int:
    """Delete the temporary chunk files a killed writer leaves behind; returns how many."""
    orphans = list(Path(path).rglob("*.partial"))
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return len(orphans)


@contextlib.contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Hold `<store>.lock` while writing a store; a second writer is refused with the holder's pid and host.

    An flock dies with its process, so a killed writer never leaves a stale lock behind.
    """
    lock_path = Path(f"{Path(path).resolve()}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CachedsegError(f"the store {path} is being written by {holder}; wait for it to finish (or stop "
                                 "it), then rerun to continue") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def describe(path: str | Path) -> dict:
    """A summary of a store: its attributes plus image counts by split and state, and its size on disk.

    Args:
        path: The store folder.

    Returns:
        The store's attributes, with `images`, `trn`, `val`, `done`, `pending`, `bad` counts and `bytes_on_disk`.

    Raises:
        CachedsegError: If there is no readable store at `path`.
    """
    group, _ = open_store(path)
    done, split = group["done"][:], group["split"][:]
    return {**dict(group.attrs), "images": len(done), "trn": int((split == "trn").sum()),
            "val": int((split == "val").sum()), "done": int((done == DONE).sum()),
            "pending": int((done == PENDING).sum()), "skipped_bad": int((done == BAD).sum()),
            "bytes_on_disk": disk_bytes(path)}


def disk_bytes(path: str | Path) -> int:
    """Bytes used by the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
