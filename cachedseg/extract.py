"""Stage one: run the frozen backbone once per image and write its token grid into the feature store.

Images are written by sample index and flagged `done` only after their features and mask have landed, so the
order of work does not matter, a rerun skips finished images, and a killed run resumes where it stopped.
"""

from __future__ import annotations

import os
import time
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
from cachedseg.paths import check_local
from cachedseg.store import (BAD, DONE, PENDING, FeatureStore, StoreSpec, check_dtype, check_spec, disk_bytes, is_store,
                             remove_partials, remove_store, spec_for, writer_lock)
from cachedseg.views import apply_view, check_views

FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class ExtractResult:
    """What one `extract` call did.

    Attributes:
        store: The store path.
        images: Images in the store.
        extracted: Images computed by this call.
        skipped: Images already done before this call.
        seconds: Wall time of the extraction loop.
        bytes_on_disk: Size of the whole store.
        bad: Images skipped as unreadable by this call (`skip_bad`), with the reason.
    """

    store: Path
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
            views: tuple[str, ...] = ("identity",),
            progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Extract backbone features for every image of an AeroScapes-layout dataset into a Zarr store.

    Args:
        data: The dataset folder (JPEGImages/, SegmentationClass/, ImageSets/).
        store: Where to write the store; defaults to `cache/<dataset>-<backbone>-<size>-<dtype>.zarr`.
        backbone: Backbone name, input size, precision and how many of the last layers to store.
        weights: `auto`, a weights file, or `random` (see `build_backbone`).
        dtype: Storage dtype of the features, `float16` (half the size) or `float32`.
        batch_size: Images per backbone forward pass.
        device: `auto`, `cpu` or `cuda`.
        workers: DataLoader processes that decode and resize images; defaults to min(4, CPUs).
        overwrite: Delete an existing store built with other settings instead of refusing it.
        skip_bad: Record unreadable images in the store (flag 2, reason in the `bad` attribute) and carry on,
            instead of stopping at the first one.
        redo: Image ids to compute again (e.g. after a checksum error in their cached chunk).
        views: The views to cache (see `cachedseg.views`): the identity, plus e.g. `flip`. Each costs one more
            forward pass per image and as much storage again.
        progress: Called as `progress(done, total)` at the start and after every batch of this call.

    Returns:
        What was done, with timing and size on disk.

    Raises:
        CachedsegError: For a bad dataset or image, settings that do not match an existing store, another process
            writing the same store, or non-finite features.
    """
    check_dtype(dtype)  # before the backbone is built: fail in milliseconds, not seconds
    if batch_size < 1:
        raise CachedsegError("--batch-size must be at least 1")
    if store is not None:
        check_local(store)
    views = check_views(views)
    samples = read_dataset(data)
    store = Path(store) if store is not None else default_store_path(data, backbone, dtype, views)
    model = build_backbone(backbone, weights, device)
    spec = spec_for(model, dtype, views)
    ids, splits = [s.id for s in samples], [s.split for s in samples]

    with writer_lock(store):
        if overwrite:
            remove_store(store)
        fs = _open_or_create(store, spec, ids, splits, data, weights)
        for id_ in redo:
            if id_ not in ids:
                raise CachedsegError(f"--redo {id_}: no such image id in {data}")
            fs.mark(ids.index(id_), PENDING)
        pending = np.flatnonzero(fs.flags(repair=True) != DONE).tolist()  # bad images from earlier runs are retried too
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        start = time.perf_counter()
        bad = _compute(model, fs, SegmentationDataset(samples, model.preprocess), pending, batch_size, workers,
                       skip_bad, progress or (lambda done, total: None))
        fs.set_bad(bad)
        seconds = time.perf_counter() - start
    return ExtractResult(store=store, images=len(ids), extracted=len(pending) - len(bad),
                         skipped=len(ids) - len(pending), seconds=seconds, bytes_on_disk=disk_bytes(store), bad=bad)


def _compute(model: Backbone, fs: FeatureStore, dataset: SegmentationDataset, pending: list[int], batch_size: int,
             workers: int, skip_bad: bool, progress: Callable[[int, int], None]) -> dict[str, str]:
    """Run the backbone over the pending images and write them; returns the images skipped as unreadable."""
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, pending), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda")
    bad: dict[str, str] = {}
    progress(0, len(pending))
    count = 0
    writes: deque[Future] = deque()
    # One writer thread overlaps the Zarr writes with the next forward pass; its order per image
    # (features, mask, then the done flag) is what makes a kill at any moment safe.
    with ThreadPoolExecutor(max_workers=1) as writer:
        for batch in loader:
            for index, reason in batch["errors"]:
                if not skip_bad:
                    raise CachedsegError(f"{reason} (image {fs.ids[index]!r}); or pass --skip-bad to record it in "
                                         "the store and carry on")
                bad[fs.ids[index]] = reason
                writes.append(writer.submit(fs.mark, index, BAD))
            if len(batch["index"]):
                x = batch["image"].to(device, non_blocking=True)  # [B, 3, H, W]
                feats = torch.stack([model(apply_view(x, v)) for v in fs.spec.views], 1)  # [B, V, L, C, h, w]
                _check_finite(feats, [fs.ids[i] for i in batch["index"].tolist()], fs.spec.dtype)
                feats = feats.to(getattr(torch, fs.spec.dtype)).cpu().numpy()
                writes.append(writer.submit(_write_batch, fs, batch["index"].tolist(), feats, batch["mask"].numpy()))
            while len(writes) > 2:  # bounded: never more than two batches in flight
                writes.popleft().result()
            count += len(batch["index"]) + len(batch["errors"])
            progress(count, len(pending))
        while writes:
            writes.popleft().result()
    return bad


def _open_or_create(store: Path, spec: StoreSpec, ids: list[str], splits: list[str], data: str | Path,
                    weights: str) -> FeatureStore:
    """Open a store to finish it (refusing other settings or other images), or create it."""
    if store.exists() and not (store.is_dir() and not any(store.iterdir())):  # an empty folder is fine
        if not is_store(store):
            raise CachedsegError(f"{store} exists and is not a cachedseg feature store; pick another --store")
        fs = FeatureStore.open(store, mode="r+")
        check_spec(store, fs.spec, spec)
        if fs.ids != ids or fs.splits != splits:
            raise CachedsegError(f"the store {store} holds another list of images than {data}; pass --overwrite "
                                 "to rebuild it, or --store to write a new one elsewhere")
        remove_partials(store)  # a killed writer's temporary chunk files
        return fs
    store.parent.mkdir(parents=True, exist_ok=True)
    return FeatureStore.create(store, spec, ids, splits, dataset=str(Path(data).resolve()),
                               weights=weights_source(weights))


def _write_batch(fs: FeatureStore, indices: list[int], feats: np.ndarray, masks: np.ndarray) -> None:
    """Write one batch, image by image, each flagged done only after its data."""
    for i, f, m in zip(indices, feats, masks):
        fs.write(i, f, m)


def _check_finite(feats: torch.Tensor, ids: list[str], dtype: str) -> None:
    """Refuse NaN/inf features, and values float16 cannot hold."""
    bad = ~torch.isfinite(feats).flatten(1).all(1)
    if dtype == "float16":
        bad |= feats.abs().flatten(1).amax(1) >= FLOAT16_MAX
    if bad.any():
        which = [i for i, b in zip(ids, bad.tolist()) if b]
        raise CachedsegError(f"the backbone gave non-finite or out-of-range features for {which}; check the "
                             "weights, or use --dtype float32 if the values exceed float16's range")
