"""Stage one: run the frozen backbone once per image and write its token grid into the feature store.

Images are written by sample index and flagged `done` only after their features and mask have landed, so the
order of work does not matter, a rerun skips finished images, and a killed run resumes where it stopped.

The cache follows the data: each entry records the size, mtime and hash of the image and mask files it was computed
from. A rerun compares the stats (no file is read while they match), hashes the files whose stats differ, and
recomputes what changed (a changed mask alone is rewritten without a backbone pass); images newly listed are added
to the store, and images gone from the dataset are kept but left out.

With a `Tiling` (`extract --tile`) every image is cut into windows (`cachedseg.windows`) and each window is an
item of the store, with all of the above per window: a window without a valid pixel is flagged empty and stores
nothing, and the store records where each window lies and the grid of each image.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cachedseg.backbone import Backbone, BackboneConfig, build_backbone, weights_source
from cachedseg.data import SegmentationDataset, collate
from cachedseg.dataset import DATASET_FILE, SPLITS, Dataset, Sample, open_dataset
from cachedseg.errors import CachedsegError
from cachedseg import distributed
from cachedseg.locks import LockUnwritable, writer_lock
from cachedseg.paths import exists, is_url
from cachedseg.spec import StoreSpec, check_dtype, check_spec, spec_for
from cachedseg.store import (BAD, DONE, EMPTY, HASH_BYTES, NO_STAT, PENDING, SOURCE_FILES, FeatureStore,
                             disk_bytes, is_store, open_group, remove_partials, remove_store)
from cachedseg.tiles import RasterGrid, Tiling
from cachedseg.views import apply_view, check_views
from cachedseg.windows import image_grid, window_samples
from cachedseg.workers import default_workers

FLOAT16_MAX = 65504.0
SETTLED = (DONE, EMPTY)  # flags of entries with nothing left to compute
HASH_MEMO = 16  # files whose hash a process remembers (by path, size and mtime): a map's windows share one file


@dataclass(frozen=True)
class ExtractResult:
    """What one `extract` call did.

    Attributes:
        store: The store path or URL.
        images: Images in the store.
        extracted: Images computed by this call.
        skipped: Images already done before this call.
        seconds: Wall time of the extraction loop.
        bytes_on_disk: Size of the whole store.
        bad: Images skipped as unreadable by this call (`skip_bad`), with the reason.
        changed: Done images recomputed because their image file changed.
        masks_changed: Done images whose mask file alone changed: the mask rewritten, no backbone pass.
        touched: Done images whose files' size or mtime changed but not their content: only the record updated.
        added: Images listed in the split files since the store was built (extracted by this call).
        moved: Images that moved to the other split.
        gone: Images of the store no longer in the dataset (unlisted, or files deleted), with the reason: kept in
            the store but left out of training and evaluation.
        adopted: Done images without a record of their files (a store from before records): their current files
            were hashed and taken as the record.
        rasters: With `tiling`: the images cut into windows (`images` then counts windows).
        empty: With `tiling`: windows of the store without a valid pixel (nothing stored for them).
    """

    store: str
    images: int
    extracted: int
    skipped: int
    seconds: float
    bytes_on_disk: int
    bad: dict[str, str]
    changed: int = 0
    masks_changed: int = 0
    touched: int = 0
    added: int = 0
    moved: int = 0
    gone: dict[str, str] = field(default_factory=dict)
    adopted: int = 0
    rasters: int = 0
    empty: int = 0

    @property
    def images_per_s(self) -> float:
        """Extraction throughput of this call."""
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_image(self) -> float:
        """Store size per image in MB (10^6 bytes)."""
        return self.bytes_on_disk / 1e6 / max(self.images, 1)


def default_store_path(data: str | Path, backbone: BackboneConfig, dtype: str,
                       views: tuple[str, ...] = ("identity",), tiling: Tiling | None = None) -> Path:
    """cache/<dataset>-<backbone>-<WxH>-<dtype>[-l<layers>][-<views>][-tiles<overlap>[-gsd<m>]].zarr: different
    settings never share a store."""
    size = f"{backbone.image_size[1]}x{backbone.image_size[0]}" if backbone.image_size else "default"
    extra = (f"-l{backbone.layers}" if backbone.layers > 1 else "") + "".join(f"-{v}" for v in views[1:])
    if tiling is not None:
        extra += f"-tiles{tiling.overlap}" + (f"-gsd{tiling.gsd:g}" if tiling.gsd is not None else "")
    path = Path(data).resolve()
    name = path.parent.name if path.name == DATASET_FILE else path.stem if path.suffix == ".toml" else path.name
    return Path("cache") / f"{name}-{backbone.name}-{size}-{dtype}{extra}.zarr"


def extract(data: str | Path, store: str | Path | None = None, backbone: BackboneConfig = BackboneConfig(),
            weights: str = "auto", dtype: str = "float16", batch_size: int = 4, device: str = "auto",
            workers: int | None = None, overwrite: bool = False, skip_bad: bool = False, redo: tuple[str, ...] = (),
            views: tuple[str, ...] = ("identity",), images_per_shard: int = 1, tiling: Tiling | None = None,
            progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Extract backbone features for every image of a dataset into a Zarr store.

    Under torchrun every rank runs this: rank 0 takes the writer lock and creates (or checks) the store, then each
    rank computes a contiguous, shard-aligned block of the pending images, so no two ranks write the same file.

    On an existing store, rank 0 first brings it up to the dataset (see the module docstring): changed images go
    back to pending, changed masks alone are rewritten, newly listed ids are appended (pending), moved ids change
    split, and ids no longer in the dataset are recorded as gone (kept, left out).

    Args:
        data: The dataset folder (see `cachedseg.dataset`).
        store: Where to write the store, a local folder or a URL (s3://bucket/x.zarr); defaults to
            `cache/<dataset>-<backbone>-<size>-<dtype>.zarr`.
        backbone: Backbone name, input size, precision and how many of the last layers to store.
        weights: `auto`, a weights file, or `random` (see `build_backbone`).
        dtype: Storage dtype of the features, `float16` (half the size) or `float32`.
        batch_size: Images per backbone forward pass (per rank).
        device: `auto`, `cpu` or `cuda` (under torchrun, each rank its own GPU).
        workers: DataLoader processes that decode and resize images; defaults to min(4, CPUs), on a CPU too
            (see `default_workers`).
        overwrite: Delete an existing store built with other settings instead of refusing it.
        skip_bad: Record unreadable images in the store (flag 2, reason in the `bad` attribute) and carry on,
            instead of stopping at the first one.
        redo: Image ids to compute again (e.g. after a checksum error in their cached chunk).
        views: The views to cache (see `cachedseg.views`): the identity, plus e.g. `flip`. Each costs one more
            forward pass per image and as much storage again.
        images_per_shard: Pack this many images into each file (zarr sharding) for a new store; a shard is then
            the unit of work: a killed run recomputes its unfinished shards whole.
        tiling: Cut every image into windows of the backbone's input size (`tiling.size` must be it) sharing
            `tiling.overlap` pixels, georeferenced rasters first resampled to `tiling.gsd`; each window is an item.
        progress: Called on rank 0 as `progress(done, total)` for the whole job, at the start and after batches.

    Returns:
        What was done, what changed in the dataset, with timing and size on disk (the same on every rank).

    Raises:
        CachedsegError: For a bad dataset or image, settings that do not match an existing store, another job
            writing the same store, non-finite features, or a split left without one usable image.
    """
    check_dtype(dtype)  # before the backbone is built: fail in milliseconds, not seconds
    if batch_size < 1:
        raise CachedsegError("--batch-size must be at least 1")
    if workers is not None and workers < 0:
        raise CachedsegError(f"--workers {workers}: give 0 (decode in this process) or more")
    ctx = distributed.context(device)
    views = check_views(views)
    missing: dict[str, str] = {}  # listed ids whose files are missing: gone, if the store has them
    dataset = open_dataset(data)
    samples = dataset.samples(missing=missing)
    store = str(store) if store is not None else str(default_store_path(data, backbone, dtype, views, tiling))
    exists(store)  # a bucket that does not answer is told now, not after the backbone is built
    if missing and (overwrite or not is_store(store)):  # nothing cached to keep for them
        raise CachedsegError(next(iter(missing.values())))
    rasters = None
    if tiling is not None:
        if backbone.image_size is not None and tuple(backbone.image_size) != tuple(tiling.size):
            raise CachedsegError(f"--tile {tiling.size[1]}x{tiling.size[0]} is the backbone's input; give it alone, "
                                 "without another --image-size or --short-side")
        if dataset.vector_labels is not None:
            dataset.vector_labels.check()
        rasters = [image_grid(s, tiling.gsd) for s in samples]  # headers only
        missing = {}  # a gone image's windows are told by their ids no longer being listed
        samples = window_samples(samples, rasters, tiling, dataset)
    elif dataset.by_blocks:
        raise CachedsegError(f"{dataset.reference} splits each image by blocks ([splits] block), which needs windows: "
                             "extract with --tile SIZE, or split whole images (drop block)")
    model = build_backbone(backbone, weights, distributed.device_for(ctx, device))
    spec = spec_for(model, dtype, dataset.classes, views, tiling)
    ids = [s.id for s in samples]

    opened: dict[str, FeatureStore] = {}  # rank 0's store from setup, used on after it (each open is a round trip)
    with contextlib.ExitStack() as held:
        def setup() -> tuple[list[int], str, dict]:  # rank 0, while the other ranks wait for the store
            try:
                held.enter_context(writer_lock(store, ctx.job))
            except LockUnwritable:  # a read-only folder: fine for a finished store, which needs no writing
                if overwrite or redo or not _finished(store, spec, samples, missing, dataset.block_rule()):
                    raise
                return [], uuid.uuid4().hex, {}
            if overwrite:
                remove_store(store)
            cache, created = _open_or_create(store, spec, samples, dataset.reference, weights, images_per_shard,
                                             rasters, dataset.block_rule())
            # the flags are read once (one request per image on a bucket) and kept up to date here
            cache, changes, flags = ((cache, {}, np.full(len(cache), PENDING, dtype=np.uint8)) if created
                                     else _follow_data(cache, dataset, samples, missing, lambda ordered: _items(
                                         ordered, model.preprocess, dataset, tiling), rasters))
            for id_ in redo:
                if id_ not in ids:
                    raise CachedsegError(f"--redo {id_}: no such image id in {data}")
                cache.mark(cache.ids.index(id_), PENDING)
                flags[cache.ids.index(id_)] = PENDING
            gone = cache.gone
            # bad images are retried too; the token names this run's job-wide progress counter
            pending = [i for i in np.flatnonzero(~np.isin(flags, SETTLED)).tolist() if cache.ids[i] not in gone]
            if pending:
                cache.check_writable(len(pending))
            opened.update(store=cache, flags=flags)
            return pending, uuid.uuid4().hex, changes
        pending, token, changes = ctx.once(setup)
        cache = opened["store"] if "store" in opened else FeatureStore.open(store, mode="r+")
        by_id = {s.id: s for s in samples}
        in_store_order = [by_id.get(id_) for id_ in cache.ids]  # None: gone from the dataset
        units = _units(pending, cache.images_per_shard, len(cache))  # whole shards
        todo = sum(in_store_order[i] is not None for u in units for i in u)
        workers = default_workers(next(model.parameters()).device, "extract") if workers is None else workers
        report = progress if ctx.main and progress else (lambda done, total: None)
        key = f"extract:{token}"
        start = time.perf_counter()
        sources = _Sources(_items(in_store_order, model.preprocess, dataset, tiling))
        bad, empty = _compute(model, cache, sources, ctx.share(units), batch_size, workers, skip_bad,
                              lambda n: report(ctx.count(key, n), todo))
        bad = {k: v for part in ctx.gather(bad) for k, v in part.items()}
        empty = sum(ctx.gather(empty))
        # nothing pending anywhere: the flags are as setup left them, not read again
        flags = ctx.once(lambda: _finish(cache, bad, data, None if pending else opened.get("flags")))
        seconds = time.perf_counter() - start
    return ExtractResult(store=store, images=len(ids), extracted=todo - len(bad) - empty, skipped=len(ids) - todo,
                         seconds=seconds, bytes_on_disk=disk_bytes(store), bad=bad, gone=cache.gone, **changes,
                         rasters=len(rasters or ()), empty=int((flags == EMPTY).sum()))


def _items(samples: list, pp, dataset: Dataset, tiling: Tiling | None):
    """What reads the samples (None: gone) with their labels: whole frames, or the windows of a tiled dataset."""
    if tiling is None:
        return SegmentationDataset(samples, pp, dataset.sample_labels)
    from cachedseg.windows import WindowDataset
    return WindowDataset(samples, pp, dataset, tiling)


def file_stats(paths: tuple[Path, ...]) -> np.ndarray:
    """Size and mtime (ns) of each file, int64 [len(paths), 2]: the fast check that a file is unchanged."""
    stats = [os.stat(p) for p in paths]
    return np.array([(st.st_size, st.st_mtime_ns) for st in stats], dtype=np.int64)


_hashed: dict[tuple[str, int, int], np.ndarray] = {}  # (path, size, mtime_ns) -> hash, the last HASH_MEMO files


def file_hashes(paths: tuple[Path, ...]) -> np.ndarray:
    """blake2b-128 of each file's bytes, uint8 [len(paths), 16], read in 1 MiB blocks; a file whose size and mtime
    are those of one hashed lately is not read again (the windows of a map all come from one file)."""
    digests = []
    for path in paths:
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _hashed:
            h = hashlib.blake2b(digest_size=HASH_BYTES)
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            while len(_hashed) >= HASH_MEMO:
                del _hashed[next(iter(_hashed))]
            _hashed[key] = np.frombuffer(h.digest(), dtype=np.uint8)
        digests.append(_hashed[key])
    return np.stack(digests)


def _sources(sample: Sample) -> tuple[Path, Path]:
    """A sample's files, in the order of the store's `source_file` dimension (image, mask)."""
    return sample.image, sample.mask


def _follow_data(cache: FeatureStore, dataset: Dataset, samples: list[Sample], missing: dict[str, str],
                 items: Callable[[list], torch.utils.data.Dataset],
                 rasters: list[RasterGrid] | None = None) -> tuple[FeatureStore, dict, np.ndarray]:
    """Bring an existing store up to the dataset: add newly listed images, update moved splits, record gone ones,
    and check each done image against its record (stats, then hashes): a changed image goes back to pending, a
    changed mask alone is rewritten (read by `items(samples in store order)`), equal content only updates the stats.
    Returns the store, the counts and the flags as they are now."""
    listed = {s.id: s for s in samples}
    have = set(cache.ids)
    for id_, error in missing.items():
        if id_ not in have:  # a new image without its files: nothing cached to fall back on
            raise CachedsegError(error)
    new = [s for s in samples if s.id not in have]
    splits = [listed[id_].split if id_ in listed else split for id_, split in zip(cache.ids, cache.splits)]
    moved = sum(split != old for split, old in zip(splits, cache.splits))
    if new or moved:
        tiles, grids = _grown_tiles(cache, new, rasters) if cache.tiled else (None, None)
        cache = cache.set_index(cache.ids + [s.id for s in new], splits + [s.split for s in new], tiles, grids)
    elif cache.tiled:
        _grown_tiles(cache, [], rasters)  # refuses an image whose grid changed
    cache.set_gone({id_: missing.get(id_, dataset.unlisted_reason())
                 for id_ in cache.ids if id_ not in listed})
    cache.add_records()  # a store from before records: every record unknown, adopted below
    counts = {"changed": 0, "masks_changed": 0, "touched": 0, "added": len(new), "moved": moved, "adopted": 0}
    stats, hashes = cache.records()
    masks = items([listed.get(id_) for id_ in cache.ids])
    flags = cache.flags(repair=True)
    for i in np.flatnonzero(np.isin(flags, SETTLED)):
        sample = listed.get(cache.ids[i])
        if sample is None:  # gone: kept as it is
            continue
        paths = _sources(sample)
        now = file_stats(paths)
        if np.array_equal(now, stats[i]):
            continue  # the fast path: no file is read
        current = file_hashes(paths)
        if stats[i, 0, 0] == NO_STAT:  # no record to compare with: take the files as they are now
            cache.set_record(i, now, current)
            counts["adopted"] += 1
            continue
        same = (current == hashes[i]).all(axis=1)  # [image, mask]
        if same.all():
            cache.set_record(i, now, current)
            counts["touched"] += 1
        elif same[0] and flags[i] == EMPTY:  # no valid pixel, so no labels to store: only the record
            cache.set_record(i, now, current)
            counts["masks_changed"] += 1
        elif same[0]:
            item = masks[i]  # decoded and checked exactly as extraction does
            if "error" not in item and "empty" not in item and np.array_equal(file_stats(paths), now):
                cache.write_mask(i, item["mask"].numpy(), now, current)
                counts["masks_changed"] += 1
            else:  # unreadable, or changing as we read: the full path decides (and --skip-bad applies)
                cache.mark(i, PENDING)
                flags[i] = PENDING
                counts["changed"] += 1
        else:
            cache.mark(i, PENDING)
            flags[i] = PENDING
            counts["changed"] += 1
    if cache.tiled and cache.attrs.split_blocks != dataset.block_rule():
        counts["masks_changed"] += _resplit(cache, masks, flags, [listed.get(id_) for id_ in cache.ids])
        cache.set_split_blocks(dataset.block_rule())
    return cache, counts, flags


def _resplit(cache: FeatureStore, masks: torch.utils.data.Dataset, flags: np.ndarray, samples: list) -> int:
    """Rewrite the masks of a tiled store's done windows for a changed split by blocks (each keeps only its own
    split's labels), without the backbone; a window unreadable now goes back to pending. Returns how many."""
    stats, hashes = cache.records()
    rewritten = 0
    for i in np.flatnonzero(flags == DONE):
        if samples[i] is None:
            continue
        item = masks[i]
        if "error" in item or "empty" in item:
            cache.mark(i, PENDING)
            flags[i] = PENDING
            continue
        cache.write_mask(i, item["mask"].numpy(), stats[i], hashes[i])
        rewritten += 1
    return rewritten


def _grown_tiles(cache: FeatureStore, new: list, rasters: list[RasterGrid]) -> tuple[np.ndarray, list[RasterGrid]]:
    """A tiled store's `tiles` and `rasters` with the windows `new` added (their images' grids appended where the
    store has none), refusing an image whose grid changed since the store was built."""
    grids = cache.rasters
    number = {g.image: k for k, g in enumerate(grids)}
    current = {g.image: g for g in rasters}
    for grid in grids:
        now = current.get(grid.image)
        if now is not None and now != grid:
            raise CachedsegError(f"the grid of image {grid.image!r} changed since the store {cache.path} was built "
                                 f"({grid.width}x{grid.height} then, {now.width}x{now.height} now, or its "
                                 "georeference); rebuild the store with --overwrite")
    rows = []
    for window in new:
        if window.image_id not in number:
            number[window.image_id] = len(grids)
            grids.append(current[window.image_id])
        rows.append((number[window.image_id], window.y0, window.x0))
    return np.concatenate([cache.tiles(), np.array(rows, dtype=np.int64).reshape(-1, 3)]), grids


def _finish(cache: FeatureStore, bad: dict[str, str], data: str | Path, flags: np.ndarray | None = None) -> np.ndarray:
    """Record the unreadable images, and refuse a split left without a usable image (training needs both);
    `flags`: the flags if known to be current, else they are read. Returns the flags."""
    cache.set_bad(bad)
    flags, gone = cache.flags() if flags is None else flags, cache.gone
    for split in SPLITS:
        members = [id_ for id_, s in zip(cache.ids, cache.splits) if s == split]
        if members and not any(f == DONE and id_ not in gone and s == split
                               for id_, s, f in zip(cache.ids, cache.splits, flags)):
            first = next((id_ for id_ in members if id_ in bad), None) or next((id_ for id_ in members if id_ in gone),
                                                                               None)
            if first is None:
                raise CachedsegError(f"no usable image in the {split} split of {data}: all of its {len(members)} "
                                     "windows are outside the map (nodata); check the images' alpha band or nodata "
                                     "value, and the split")
            raise CachedsegError(f"no usable image in the {split} split of {data}: none of its {len(members)} images "
                                 f"can be used, the first ({first!r}) because {bad.get(first) or gone[first]}; fix "
                                 f"or replace them and rerun (the store {cache.path} records them as bad)")
    return flags


def _units(pending: list[int], per: int, n: int) -> list[list[int]]:
    """The units of work covering `pending`: single images, or in a sharded store every image of each shard
    (a shard is written whole)."""
    if per == 1:
        return [[i] for i in pending]
    return [list(range(k * per, min((k + 1) * per, n))) for k in sorted({i // per for i in pending})]


class _Sources(torch.utils.data.Dataset):
    """The images (or windows) to extract, as `items` reads them (by store index; None for one gone from the
    dataset), each with the record of the files it was computed from."""

    def __init__(self, items: torch.utils.data.Dataset):
        self.items, self.samples = items, items.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        paths = _sources(self.samples[index])
        try:
            before = file_stats(paths)
        except OSError as exc:
            return {"index": index, "view": 0, "error": f"{exc.filename} cannot be read ({exc.strerror})"}
        item = self.items[index]
        if "error" not in item:
            hashes = file_hashes(paths)
            # a file that changed while it was read gets a hash that matches nothing: the next rerun recomputes it
            item.update(stats=before, hashes=hashes if np.array_equal(file_stats(paths), before) else np.zeros_like(hashes))
        return item


def _collate(items: list[dict]) -> dict:
    """`collate`, plus the records of the images that loaded, whether each holds labels, and the windows found
    empty with their records."""
    batch = collate([it for it in items if "empty" not in it])
    good = [it for it in items if "error" not in it and "empty" not in it]
    batch["records"] = [(it["stats"], it["hashes"]) for it in good]
    batch["labelled"] = [it.get("labelled", True) for it in good]
    batch["empty"] = [(it["index"], (it["stats"], it["hashes"])) for it in items if "empty" in it]
    return batch


def _compute(model: Backbone, cache: FeatureStore, dataset: _Sources, units: list[list[int]], batch_size: int,
             workers: int, skip_bad: bool, progress: Callable[[int], None]) -> tuple[dict[str, str], int]:
    """Run the backbone over the images of `units` and write each unit whole once its images are done; returns
    the images skipped as unreadable, and how many windows were found empty. `progress(n)` is told each batch's
    image count. Images of a unit that are gone from the dataset keep what the store holds for them."""
    device = next(model.parameters()).device
    indices = [i for unit in units for i in unit if dataset.samples[i] is not None]
    kept = [i for unit in units for i in unit if dataset.samples[i] is None]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    owner = {i: k for k, unit in enumerate(units) for i in unit}
    blocks: dict[int, _Block] = {}
    bad: dict[str, str] = {}
    empty = 0
    progress(0)
    writes: deque[Future] = deque()
    # One writer thread overlaps the Zarr writes with the next forward pass; each unit's order (features, masks,
    # records, then the done flags) is what makes a kill at any moment safe.
    with ThreadPoolExecutor(max_workers=1) as writer:
        def put(index: int, feats: np.ndarray | None, mask: np.ndarray | None, flag: int, record=None,
                labelled: bool = True) -> None:
            k = owner[index]
            block = blocks.setdefault(k, _Block(cache, units[k]))
            if block.put(index, feats, mask, flag, record, labelled):
                writes.append(writer.submit(block.write))
                del blocks[k]
        for index in kept:
            features, mask, flag, stats, hashes, labelled = cache.raw(index)
            put(index, features if flag == DONE else None, mask if flag == DONE else None, flag, (stats, hashes),
                bool(labelled))
        for batch in loader:
            for index, record in batch["empty"]:
                put(index, None, None, EMPTY, record)
            empty += len(batch["empty"])
            for index, reason in batch["errors"]:
                if not skip_bad:
                    raise CachedsegError(f"{reason} (image {cache.ids[index]!r}); or pass --skip-bad to record it in "
                                         "the store and carry on")
                bad[cache.ids[index]] = reason
                put(index, None, None, BAD)
            if len(batch["index"]):
                x = batch["image"].to(device, non_blocking=True)  # [B, 3, H, W]
                feats = torch.stack([model(apply_view(x, v)) for v in cache.spec.views], 1)  # [B, V, L, C, h, w]
                _check_finite(feats, [cache.ids[i] for i in batch["index"].tolist()], cache.spec.dtype)
                feats = feats.to(getattr(torch, cache.spec.dtype)).cpu().numpy()
                for index, f, m, record, labelled in zip(batch["index"].tolist(), feats, batch["mask"].numpy(),
                                                         batch["records"], batch["labelled"]):
                    put(index, f, m, DONE, record, labelled)
            while len(writes) > 2:  # bounded: never more than two units in flight
                writes.popleft().result()
            progress(len(batch["index"]) + len(batch["errors"]) + len(batch["empty"]))
        while writes:
            writes.popleft().result()
    return bad, empty


class _Block:
    """One unit of work being filled image by image, written whole when complete."""

    def __init__(self, cache: FeatureStore, indices: list[int]):
        self.cache, self.start, self.n, self.filled = cache, indices[0], len(indices), 0
        self.features: np.ndarray | None = None
        self.masks: np.ndarray | None = None
        self.flags = np.zeros(self.n, dtype=np.uint8)
        self.stats = np.full((self.n, len(SOURCE_FILES), 2), NO_STAT, dtype=np.int64)
        self.hashes = np.zeros((self.n, len(SOURCE_FILES), HASH_BYTES), dtype=np.uint8)
        self.labelled = np.zeros(self.n, dtype=np.uint8)

    def put(self, index: int, feats: np.ndarray | None, mask: np.ndarray | None, flag: int,
            record: tuple[np.ndarray, np.ndarray] | None = None, labelled: bool = True) -> bool:
        """Place one image (None for a skipped one), the record of its files and whether it holds labels; returns
        whether the block is complete."""
        if feats is not None:
            if self.features is None:  # a skipped image's chunks stay unwritten (they read as missing)
                self.features, self.masks = self.cache.empty_block(self.n)
            self.features[index - self.start], self.masks[index - self.start] = feats, mask
        if record is not None:
            self.stats[index - self.start], self.hashes[index - self.start] = record
        self.flags[index - self.start] = flag
        self.labelled[index - self.start] = feats is not None and labelled
        self.filled += 1
        return self.filled == self.n

    def write(self) -> None:
        """Write the block: data and records first, flags last."""
        if self.features is None:  # no image of the block has data (unreadable, or empty windows): records, flags
            for i, flag in enumerate(self.flags):
                if self.stats[i, 0, 0] != NO_STAT and self.cache.has_records:
                    self.cache.set_record(self.start + i, self.stats[i], self.hashes[i])
                self.cache.mark(self.start + i, int(flag))
            return
        self.cache.write_block(self.start, self.features, self.masks, self.flags, self.stats, self.hashes,
                               self.labelled)


def _open_or_create(store: str, spec: StoreSpec, samples: list[Sample], data: str, weights: str,
                    images_per_shard: int, rasters: list[RasterGrid] | None = None,
                    split_blocks: dict | None = None) -> tuple[FeatureStore, bool]:
    """Open a store to finish or update it (refusing other settings), or create it (of `samples`, windows of
    `rasters` for a tiled spec, split by `split_blocks`); says whether it was created."""
    group = open_group(store, mode="r+")  # opened once and handed on: on a bucket each open is a round trip
    if is_store(store, group):
        cache = FeatureStore.open(store, mode="r+", group=group)
        check_spec(store, cache.spec, spec)
        remove_partials(store)  # a killed writer's temporary chunk files
        return cache, False
    # an empty folder is fine
    if group is not None or (exists(store) and not (Path(store).is_dir() and not any(Path(store).iterdir()))):
        raise CachedsegError(f"{store} exists and is not a cachedseg feature store; pick another --store")
    if not is_url(store):
        Path(store).parent.mkdir(parents=True, exist_ok=True)
    tiles = (np.array([(s.raster, s.y0, s.x0) for s in samples], dtype=np.int64).reshape(-1, 3)
             if rasters is not None else None)
    return FeatureStore.create(store, spec, [s.id for s in samples], [s.split for s in samples], dataset=data,
                               weights=weights_source(weights), images_per_shard=images_per_shard, tiles=tiles,
                               rasters=rasters, split_blocks=split_blocks), True


def _finished(store: str, spec: StoreSpec, samples: list[Sample], missing: dict[str, str],
              split_blocks: dict | None = None) -> bool:
    """Whether a store holds every image of the dataset with these settings, done, from files unchanged since (by
    size and mtime): then nothing needs writing, so no lock either (read only)."""
    group = None if missing else open_group(store)
    if group is None or not is_store(store, group):
        return False
    cache = FeatureStore.open(store, group=group)
    if (cache.spec != spec or (cache.ids, cache.splits) != ([s.id for s in samples], [s.split for s in samples])
            or cache.gone or not np.isin(cache.flags(), SETTLED).all()
            or (cache.tiled and cache.attrs.split_blocks != split_blocks)):
        return False
    stats, _ = cache.records()
    return all(np.array_equal(file_stats(_sources(s)), stats[i]) for i, s in enumerate(samples))


def _check_finite(feats: torch.Tensor, ids: list[str], dtype: str) -> None:
    """Refuse NaN/inf features, and values float16 cannot hold."""
    bad = ~torch.isfinite(feats).flatten(1).all(1)
    if dtype == "float16":
        bad |= feats.abs().flatten(1).amax(1) >= FLOAT16_MAX
    if bad.any():
        which = [i for i, b in zip(ids, bad.tolist()) if b]
        raise CachedsegError(f"the backbone gave non-finite or out-of-range features for {which}; check the "
                             "weights, or use --dtype float32 if the values exceed float16's range")


def stale_labels(store: str | Path, split: str, data: str | Path | None = None) -> list[str]:
    """The ids of a split whose label file (under `data`, by default the store's dataset) is not the one their
    cached mask was computed from: its stats differ from the record and so does its hash. Images without a record
    (a store from before records) and missing files (scoring names those) are not counted."""
    cache = FeatureStore.open(store)
    stats, hashes = cache.records()
    dataset, gone, flags, k = open_dataset(data or cache.dataset), cache.gone, cache.flags(), SOURCE_FILES.index("mask")
    # a tiled store's entries are windows: each image (and its label file) is checked once, by its first window
    names = ([cache.rasters[int(r)].image for r in cache.tiles()[:, 0]] if cache.tiled else cache.ids)
    stale, seen = [], set()
    for i, (id_, s) in enumerate(zip(cache.ids, cache.splits)):
        path = dataset.mask_path(names[i])
        if s != split or id_ in gone or flags[i] != DONE or stats[i, k, 0] == NO_STAT or not path.is_file() \
                or names[i] in seen:
            continue
        seen.add(names[i])
        id_ = names[i]
        if not np.array_equal(file_stats((path,))[0], stats[i, k]) and \
                not np.array_equal(file_hashes((path,))[0], hashes[i, k]):
            stale.append(id_)
    return stale
