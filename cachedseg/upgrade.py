"""Converting a version-1 feature store to the current format in place (its own concern: the store module reads
and writes only the current version, and refuses a version-1 store naming `cachedseg upgrade`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from cachedseg import __version__
from cachedseg.errors import CachedsegError
from cachedseg.locks import writer_lock
from cachedseg.paths import check_local
from cachedseg.store import (DONE, FEATURE_DIMS, FEATURES, FLAGS, FORMAT_VERSION, IDS, MASKS, MISSING_LABEL, PENDING,
                             SPLIT, is_store, write_index_arrays)


def upgrade(path: str | Path) -> dict:
    """Convert a version-1 store to this version in place, keeping every computed feature.

    Version 1 kept ids and splits as variable-length strings (no Zarr v3 spec: tensorstore cannot read them),
    had no checksum on `ids`, `split` and `done`, filled missing chunks with numbers that look real, and had no
    view or layer dimension. The feature and mask chunks keep their bytes (feature chunks move two folders down);
    only metadata and the three small arrays are rewritten. A kill at any moment leaves a store that a rerun of
    `upgrade` finishes.

    Args:
        path: The store folder.

    Returns:
        `images`, `done` and `reset`: done images whose chunks were missing, now pending (rerun extract).

    Raises:
        CachedsegError: If `path` is not a store, or is of an unknown version.
    """
    check_local(path, "upgrade")  # version-1 stores were local folders
    root = Path(path)
    if not is_store(root):
        raise CachedsegError(f"{path} is not a cachedseg feature store")
    with writer_lock(root, f"upgrade-{os.getpid()}"):
        group = zarr.open_group(str(root), mode="r+")
        version = group.attrs.get("format_version")
        if version == FORMAT_VERSION:
            flags = group[FLAGS][:]
            return {"images": len(flags), "done": int((flags == DONE).sum()), "reset": 0, "upgraded": False}
        if version != 1:
            raise CachedsegError(f"{path} has store format version {version}; only version 1 can be upgraded")
        staged = group.attrs.get("upgrade_staged")
        if staged is None:  # 1. the new small arrays, written beside the old ones
            ids, splits, flags = group[IDS][:].tolist(), group[SPLIT][:].tolist(), group[FLAGS][:]
            n, reset = len(ids), 0
            for i in np.flatnonzero(flags == DONE):  # v1 wrote no chunk that equalled its fill value
                if not all((root / name / "c" / str(i)).is_dir() for name in (FEATURES, MASKS)):
                    flags[i], reset = PENDING, reset + 1
            for name in (IDS, SPLIT, FLAGS):
                shutil.rmtree(root / f"{name}.v2", ignore_errors=True)
            write_index_arrays(group, ids, splits, flags, suffix=".v2")
            group.attrs["upgrade_staged"] = staged = {"reset": reset, "images": n}
        for name in (IDS, SPLIT, FLAGS):  # 2. swap them in (each step can be redone after a kill)
            if (root / f"{name}.v2").is_dir():
                _swap_in(root / f"{name}.v2", root / name)
        # 3. the big arrays keep their chunk bytes: features [N, C, h, w] become [N, 1, 1, C, h, w] (one view, one
        # layer; each chunk file moves two folders down), and new fill values make missing chunks detectable
        meta = json.loads((root / FEATURES / "zarr.json").read_text())
        if len(meta["shape"]) == 4:
            for i in range(staged["images"]):
                _deepen_chunk(root / FEATURES / "c" / str(i) / "0" / "0" / "0")
            n, c, h, w = meta["shape"]
            _rewrite_metadata(root / FEATURES, shape=[n, 1, 1, c, h, w], fill_value="NaN",
                              chunk_grid={"name": "regular", "configuration": {"chunk_shape": [1, 1, 1, c, h, w]}},
                              dimension_names=list(FEATURE_DIMS))
        _rewrite_metadata(root / MASKS, fill_value=MISSING_LABEL, dimension_names=["image", "mask_y", "mask_x"])
        group = zarr.open_group(str(root), mode="r+")
        attrs = dict(group.attrs)
        size, mask = attrs.pop("image_size"), attrs["mask_size"]
        attrs.pop("upgrade_staged", None)
        attrs.update(format_version=FORMAT_VERSION, package_version=__version__, input_size=[size, size],
                     mask_size=[mask, mask], layers=1, views=["identity"])
        group.attrs.put(attrs)  # one write: a kill leaves the old attributes or the new
        flags = group[FLAGS][:]
        return {"images": staged["images"], "done": int((flags == DONE).sum()), "reset": staged["reset"],
                "upgraded": True}


def _deepen_chunk(path: Path) -> None:
    """Move the chunk file `path` to `path/0/0` (two leading dimensions of 1 added); redone safely after a kill."""
    moving = path.with_name(path.name + ".v1")
    if path.is_file():
        os.replace(path, moving)
    if moving.is_file():
        (path / "0").mkdir(parents=True, exist_ok=True)
        os.replace(moving, path / "0" / "0")


def _swap_in(new: Path, old: Path) -> None:
    """Replace the folder `old` by `new`."""
    shutil.rmtree(old, ignore_errors=True)
    os.replace(new, old)


def _rewrite_metadata(array: Path, **changes) -> None:
    """Change fields of an array's zarr.json atomically."""
    meta_path = array / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
