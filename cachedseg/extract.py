"""Stage one: run the frozen backbone once per image and write its token grid into the feature store.

Images are written by sample index and flagged `done` only after their features and mask have landed, so the
order of work does not matter, a rerun skips finished images, and a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cachedseg.backbone import Backbone, BackboneConfig, build_backbone, weights_source
from cachedseg.data import SegmentationDataset, collate, read_dataset
from cachedseg.errors import CachedsegError
from cachedseg import distributed
from cachedseg.locks import writer_lock
from cachedseg.paths import exists, is_url
from cachedseg.store import (BAD, DONE, MISSING_LABEL, PENDING, FeatureStore, StoreSpec, check_dtype, check_spec,
                             disk_bytes, is_store, remove_partials, remove_store, spec_for)
from cachedseg.views import apply_view, check_views

FLOAT16_MAX = 65504.0


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
    """

    store: str
    images: int
    extracted: int
    skipped: int
    seconds: float
    bytes_on_disk: int
    bad: dict[str, str]

    @property
    def images_per_s(self) -> float:
        """Extraction throughput of this call."""
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_image(self) -> float:
        """Store size per image in MB (10^6 bytes)."""
        return self.bytes_on_disk / 1e6 / max(self.images, 1)


def default_store_path(data: str | Path, backbone: BackboneConfig, dtype: str,
                       views: tuple[str, ...] = ("identity",)) -> Path:
    """cache/<dataset>-<backbone>-<WxH>-<dtype>[-l<layers>][-<views>].zarr: different settings never share a store."""
    size = f"{backbone.image_size[1]}x{backbone.image_size[0]}" if backbone.image_size else "default"
    extra = (f"-l{backbone.layers}" if backbone.layers > 1 else "") + "".join(f"-{v}" for v in views[1:])
    return Path("cache") / f"{Path(data).resolve().name}-{backbone.name}-{size}-{dtype}{extra}.zarr"


def extract(data: str | Path, store: str | Path | None = None, backbone: BackboneConfig = BackboneConfig(),
            weights: str = "auto", dtype: str = "float16", batch_size: int = 4, device: str = "auto",
            workers: int | None = None, overwrite: bool = False, skip_bad: bool = False, redo: tuple[str, ...] = (),
            views: tuple[str, ...] = ("identity",), images_per_shard: int = 1,
            progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Extract backbone features for every image of an AeroScapes-layout dataset into a Zarr store.

    Under torchrun every rank runs this: rank 0 takes the writer lock and creates (or checks) the store, then each
    rank computes a contiguous, shard-aligned block of the pending images, so no two ranks write the same file.

    Args:
        data: The dataset folder (JPEGImages/, SegmentationClass/, ImageSets/).
        store: Where to write the store, a local folder or a URL (s3://bucket/x.zarr); defaults to
            `cache/<dataset>-<backbone>-<size>-<dtype>.zarr`.
        backbone: Backbone name, input size, precision and how many of the last layers to store.
        weights: `auto`, a weights file, or `random` (see `build_backbone`).
        dtype: Storage dtype of the features, `float16` (half the size) or `float32`.
        batch_size: Images per backbone forward pass (per rank).
        device: `auto`, `cpu` or `cuda` (under torchrun, each rank its own GPU).
        workers: DataLoader processes that decode and resize images; defaults to min(4, CPUs).
        overwrite: Delete an existing store built with other settings instead of refusing it.
        skip_bad: Record unreadable images in the store (flag 2, reason in the `bad` attribute) and carry on,
            instead of stopping at the first one.
        redo: Image ids to compute again (e.g. after a checksum error in their cached chunk).
        views: The views to cache (see `cachedseg.views`): the identity, plus e.g. `flip`. Each costs one more
            forward pass per image and as much storage again.
        images_per_shard: Pack this many images into each file (zarr sharding) for a new store; a shard is then
            the unit of work: a killed run recomputes its unfinished shards whole.
        progress: Called on rank 0 as `progress(done, total)` for the whole job, at the start and after batches.

    Returns:
        What was done, with timing and size on disk (the same on every rank).

    Raises:
        CachedsegError: For a bad dataset or image, settings that do not match an existing store, another job
            writing the same store, or non-finite features.
    """
    check_dtype(dtype)  # before the backbone is built: fail in milliseconds, not seconds
    if batch_size < 1:
        raise CachedsegError("--batch-size must be at least 1")
    ctx = distributed.context(device)
    views = check_views(views)
    samples = read_dataset(data)
    store = str(store) if store is not None else str(default_store_path(data, backbone, dtype, views))
    exists(store)  # a bucket that does not answer is told now, not after the backbone is built
    model = build_backbone(backbone, weights, distributed.device_for(ctx, device))
    spec = spec_for(model, dtype, views)
    ids, splits = [s.id for s in samples], [s.split for s in samples]

    with contextlib.ExitStack() as held:
        def setup() -> list[int]:  # rank 0, while the other ranks wait for the store
            held.enter_context(writer_lock(store, ctx.job))
            if overwrite:
                remove_store(store)
            fs = _open_or_create(store, spec, ids, splits, data, weights, images_per_shard)
            for id_ in redo:
                if id_ not in ids:
                    raise CachedsegError(f"--redo {id_}: no such image id in {data}")
                fs.mark(ids.index(id_), PENDING)
            # bad images are retried too; the token names this run's job-wide progress counter
            return np.flatnonzero(fs.flags(repair=True) != DONE).tolist(), uuid.uuid4().hex
        pending, token = ctx.once(setup)
        fs = FeatureStore.open(store, mode="r+")
        units = _units(pending, fs.images_per_shard, len(ids))  # whole shards
        todo = sum(len(u) for u in units)
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        report = progress if ctx.main and progress else (lambda done, total: None)
        key = f"extract:{token}"
        start = time.perf_counter()
        bad = _compute(model, fs, SegmentationDataset(samples, model.preprocess), ctx.share(units), batch_size,
                       workers, skip_bad, lambda n: report(ctx.count(key, n), todo))
        bad = {k: v for part in ctx.gather(bad) for k, v in part.items()}
        ctx.once(lambda: fs.set_bad(bad))
        seconds = time.perf_counter() - start
    return ExtractResult(store=store, images=len(ids), extracted=todo - len(bad), skipped=len(ids) - todo,
                         seconds=seconds, bytes_on_disk=disk_bytes(store), bad=bad)


def _units(pending: list[int], per: int, n: int) -> list[list[int]]:
    """The units of work covering `pending`: single images, or in a sharded store every image of each shard
    (a shard is written whole)."""
    if per == 1:
        return [[i] for i in pending]
    return [list(range(k * per, min((k + 1) * per, n))) for k in sorted({i // per for i in pending})]


def _compute(model: Backbone, fs: FeatureStore, dataset: SegmentationDataset, units: list[list[int]],
             batch_size: int, workers: int, skip_bad: bool, progress: Callable[[int], None]) -> dict[str, str]:
    """Run the backbone over the images of `units` and write each unit whole once its images are done; returns
    the images skipped as unreadable. `progress(n)` is told each batch's image count."""
    device = next(model.parameters()).device
    indices = [i for unit in units for i in unit]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda")
    owner = {i: k for k, unit in enumerate(units) for i in unit}
    blocks: dict[int, _Block] = {}
    bad: dict[str, str] = {}
    progress(0)
    writes: deque[Future] = deque()
    # One writer thread overlaps the Zarr writes with the next forward pass; each unit's order (features, masks,
    # then the done flags) is what makes a kill at any moment safe.
    with ThreadPoolExecutor(max_workers=1) as writer:
        def put(index: int, feats: np.ndarray | None, mask: np.ndarray | None, flag: int) -> None:
            k = owner[index]
            block = blocks.setdefault(k, _Block(fs, units[k]))
            if block.put(index, feats, mask, flag):
                writes.append(writer.submit(block.write))
                del blocks[k]
        for batch in loader:
            for index, reason in batch["errors"]:
                if not skip_bad:
                    raise CachedsegError(f"{reason} (image {fs.ids[index]!r}); or pass --skip-bad to record it in "
                                         "the store and carry on")
                bad[fs.ids[index]] = reason
                put(index, None, None, BAD)
            if len(batch["index"]):
                x = batch["image"].to(device, non_blocking=True)  # [B, 3, H, W]
                feats = torch.stack([model(apply_view(x, v)) for v in fs.spec.views], 1)  # [B, V, L, C, h, w]
                _check_finite(feats, [fs.ids[i] for i in batch["index"].tolist()], fs.spec.dtype)
                feats = feats.to(getattr(torch, fs.spec.dtype)).cpu().numpy()
                for index, f, m in zip(batch["index"].tolist(), feats, batch["mask"].numpy()):
                    put(index, f, m, DONE)
            while len(writes) > 2:  # bounded: never more than two units in flight
                writes.popleft().result()
            progress(len(batch["index"]) + len(batch["errors"]))
        while writes:
            writes.popleft().result()
    return bad


class _Block:
    """One unit of work being filled image by image, written whole when complete."""

    def __init__(self, fs: FeatureStore, indices: list[int]):
        self.fs, self.start, self.n, self.filled = fs, indices[0], len(indices), 0
        self.features: np.ndarray | None = None
        self.masks: np.ndarray | None = None
        self.flags = np.zeros(self.n, dtype=np.uint8)

    def put(self, index: int, feats: np.ndarray | None, mask: np.ndarray | None, flag: int) -> bool:
        """Place one image (None for a skipped one); returns whether the block is complete."""
        if feats is not None:
            if self.features is None:  # NaN and the missing label: a skipped image's chunks stay unwritten
                self.features = np.full((self.n, *feats.shape), np.nan, dtype=feats.dtype)
                self.masks = np.full((self.n, *mask.shape), MISSING_LABEL, dtype=np.uint8)
            self.features[index - self.start], self.masks[index - self.start] = feats, mask
        self.flags[index - self.start] = flag
        self.filled += 1
        return self.filled == self.n

    def write(self) -> None:
        """Write the block: data first, flags last."""
        if self.features is None:  # every image of the block unreadable: only the flags
            for i, flag in enumerate(self.flags):
                self.fs.mark(self.start + i, int(flag))
            return
        self.fs.write_block(self.start, self.features, self.masks, self.flags)


def _open_or_create(store: str, spec: StoreSpec, ids: list[str], splits: list[str], data: str | Path,
                    weights: str, images_per_shard: int) -> FeatureStore:
    """Open a store to finish it (refusing other settings or other images), or create it."""
    if exists(store) and not (Path(store).is_dir() and not any(Path(store).iterdir())):  # an empty folder is fine
        if not is_store(store):
            raise CachedsegError(f"{store} exists and is not a cachedseg feature store; pick another --store")
        fs = FeatureStore.open(store, mode="r+")
        check_spec(store, fs.spec, spec)
        if fs.ids != ids or fs.splits != splits:
            raise CachedsegError(f"the store {store} holds another list of images than {data}; pass --overwrite "
                                 "to rebuild it, or --store to write a new one elsewhere")
        remove_partials(store)  # a killed writer's temporary chunk files
        return fs
    if not is_url(store):
        Path(store).parent.mkdir(parents=True, exist_ok=True)
    return FeatureStore.create(store, spec, ids, splits, dataset=str(Path(data).resolve()),
                               weights=weights_source(weights), images_per_shard=images_per_shard)


def _check_finite(feats: torch.Tensor, ids: list[str], dtype: str) -> None:
    """Refuse NaN/inf features, and values float16 cannot hold."""
    bad = ~torch.isfinite(feats).flatten(1).all(1)
    if dtype == "float16":
        bad |= feats.abs().flatten(1).amax(1) >= FLOAT16_MAX
    if bad.any():
        which = [i for i, b in zip(ids, bad.tolist()) if b]
        raise CachedsegError(f"the backbone gave non-finite or out-of-range features for {which}; check the "
                             "weights, or use --dtype float32 if the values exceed float16's range")
