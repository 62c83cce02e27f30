"""Where the decoder's input comes from: the Zarr cache, or the backbone run live on the images.

Both sources hand the decoder the same numbers up to float32 rounding (see the README's identity guarantee):
live features are cast to the cache dtype first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from cachedseg.backbone import Backbone, weights_source
from cachedseg.data import SegmentationDataset
from cachedseg.dataset import open_dataset
from cachedseg.errors import CachedsegError
from cachedseg.paths import is_url
from cachedseg.spec import StoreSpec, spec_for
from cachedseg.store import FeatureStore
from cachedseg.views import apply_view


class StoreDataset(torch.utils.data.Dataset):
    """Cached features and masks by image index; opens the store lazily, once per DataLoader worker.

    A chunk that is corrupt or missing comes back as an error naming the image, never as wrong numbers.
    """

    def __init__(self, path: str | Path, in_memory: bool = False, device: str | torch.device = "cpu"):
        self.path = str(path)
        self._store: FeatureStore | None = None
        self._memory = None
        self.where = "streamed from the store"
        if in_memory:
            store = FeatureStore.open(self.path)
            ram = free_memory(torch.device("cpu"))
            if store.nbytes > 0.8 * ram:
                raise CachedsegError(f"--in-memory needs {store.nbytes / 1e9:.1f} GB but only {ram / 1e9:.1f} GB of "
                                     "RAM is free; train without --in-memory to stream from disk")
            features, masks = store.read_all()  # [N, V, L, C, h, w], [N, Mh, Mw]
            self._memory = {"features": torch.from_numpy(features), "masks": torch.from_numpy(masks),
                            "views": store.spec.views}
            self.where = f"in RAM ({store.nbytes / 1e9:.2f} GB)"
            device = torch.device(device)
            if device.type == "cuda":  # on the GPU when it fits beside training, so a step reads no host memory
                free = free_memory(device)
                if store.nbytes < 0.5 * free:
                    self._memory.update(features=self._memory["features"].to(device),
                                        masks=self._memory["masks"].to(device))
                    self.where = f"on {device} ({store.nbytes / 1e9:.2f} GB)"
                else:
                    self.where += f", as it needs more than half of the {free / 1e9:.1f} GB free on {device}"

    @property
    def on_device(self) -> bool:
        """Whether the in-memory cache lives on a GPU (then batches need no copy, and no pinning)."""
        return self._memory is not None and self._memory["features"].device.type != "cpu"

    @property
    def in_memory(self) -> bool:
        """Whether the whole cache was loaded into RAM."""
        return self._memory is not None

    def __len__(self) -> int:
        return len(self._open())

    def class_pixels(self, indices: list[int], k: int) -> np.ndarray:
        """Pixels of each of the `k` classes [k] int64 in the masks of `indices` (see `FeatureStore.class_pixels`)."""
        if self._memory is not None:
            masks = self._memory["masks"][torch.as_tensor(indices, dtype=torch.long, device=self._memory["masks"].device)]
            return torch.bincount(masks.flatten().long(), minlength=256)[:k].cpu().numpy()
        return self._open().class_pixels(indices)

    def _open(self) -> FeatureStore:
        """The store, opened once per process (array handles cached: a lookup costs as much as a read)."""
        if self._store is None:
            self._store = FeatureStore.open(self.path)
        return self._store

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, view = key if isinstance(key, tuple) else (key, 0)
        if self._memory is not None:
            mask = apply_view(self._memory["masks"][index], self._memory["views"][view])
            return {"index": index, "view": view, "features": self._memory["features"][index, view], "mask": mask}
        try:
            features, mask = self._open().read(index, view)  # [L, C, h, w] cache dtype, [Mh, Mw] uint8
        except CachedsegError as exc:  # reported by the main process, which knows what to do with it
            return {"index": index, "view": view, "error": str(exc)}
        return {"index": index, "view": view, "features": torch.from_numpy(features), "mask": torch.from_numpy(mask)}


def free_memory(device: torch.device) -> int:
    """Bytes free now on the device (RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def worker_init(_: int) -> None:
    """Keep each DataLoader worker to one zarr thread: a process otherwise starts about CPUs+4."""
    zarr.config.set({"threading.max_workers": 1})


@dataclass
class FeatureSource:
    """A dataset of decoder inputs by image index, cached or live.

    Attributes:
        spec: The feature spec (backbone, fingerprint, sizes, dtype, classes).
        ids: Image ids, by index.
        splits: "trn" or "val" (or "skipped" for images `extract --skip-bad` left out and windows without a
            valid pixel, "gone" for images no longer in the dataset, "unlabelled" for windows without a labelled
            pixel), by index.
        dataset: Torch dataset returning `features` (cached) or `image` (live) plus `mask`, by index.
        data_root: The dataset's folder (for native-resolution labels: `cachedseg.dataset.open_dataset`).
        weights: Where the backbone's weights came from (`auto`, `random` or a file), for later live use.
        backbone: The live backbone, or None for a cache.
        location: The store's path or URL, or `live:DATA`.
    """

    spec: StoreSpec
    ids: list[str]
    splits: list[str]
    dataset: torch.utils.data.Dataset
    data_root: Path
    weights: str
    backbone: Backbone | None = None
    location: str = ""

    def indices(self, split: str) -> list[int]:
        """Image indices of one split, in store order."""
        return [i for i, s in enumerate(self.splits) if s == split]

    def features(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The decoder input [B, L, C, h, w] float32 for a collated batch: cached, or live and cast like the cache.

        Live images arrive already in their view (the dataset applied it), as extraction computed them.
        """
        if self.backbone is None:
            return batch["features"].to(device, non_blocking=True).float()
        feats = self.backbone(batch["image"].to(device, non_blocking=True))  # [B, L, C, h, w] float32
        return feats.to(getattr(torch, self.spec.dtype)).float()

    def class_pixels(self, split: str = "trn") -> np.ndarray:
        """Labelled pixels of each class [K] int64 in one split's masks, at the mask size training uses (the ignore
        label left out): the same counts for a store and for the dataset it was extracted from."""
        return self.dataset.class_pixels(self.indices(split), len(self.spec.class_names))

    def item(self, key: int | tuple[int, int]) -> dict:
        """One sample by index (or (index, view)), raising the error that names its image if it cannot be read."""
        item = self.dataset[key]
        if "error" in item:
            raise CachedsegError(item["error"] if self.backbone is None else
                                 f"image {self.ids[item['index']]!r}: {item['error']}")
        return item

    def check(self, batch: dict) -> None:
        """Turn a sample a worker could not read into an error naming its image."""
        if batch["errors"]:
            index, reason = batch["errors"][0]
            raise CachedsegError(reason if self.backbone is None else f"image {self.ids[index]!r}: {reason}")


def cached_source(store: str | Path, in_memory: bool = False, data: str | Path | None = None,
                  device: str | torch.device = "cpu") -> FeatureSource:
    """A source reading a finished feature store; `data` overrides the dataset folder the store records; with
    `in_memory` the whole cache is loaded first, onto `device` when it is a GPU with room for it."""
    cache = FeatureStore.open(store)
    states, gone = cache.states(), cache.gone
    listed = [id_ not in gone for id_ in cache.ids]
    if any(s == "pending" and keep for s, keep in zip(states, listed)):
        finished = sum(s != "pending" for s in states)
        raise CachedsegError(f"the store {store} is unfinished ({finished} of {len(states)} images); "
                             "rerun the same `cachedseg extract` command to finish it")
    # images skipped as unreadable (`extract --skip-bad`), empty windows, images gone from the dataset and windows
    # without labels belong to no split
    labelled = cache.labelled()
    splits = ["gone" if not keep else "skipped" if f != "done" else s if has_labels else "unlabelled"
              for s, f, keep, has_labels in zip(cache.splits, states, listed, labelled)]
    return FeatureSource(spec=cache.spec, ids=cache.ids, splits=splits, dataset=StoreDataset(store, in_memory, device),
                         data_root=Path(data or cache.dataset), weights=cache.weights,
                         # absolute: the run records it, and evaluate/report default to it from any folder
                         location=str(store) if is_url(store) else str(Path(store).resolve()))


def live_source(data: str | Path, backbone: Backbone, dtype: str, weights: str,
                views: tuple[str, ...] = ("identity",)) -> FeatureSource:
    """A source running `backbone` (built from `weights`) on the images of a dataset folder, in the same `views` a
    store would cache."""
    dataset = open_dataset(data)
    if dataset.by_blocks:
        raise CachedsegError(f"{dataset.reference} splits each image by blocks ([splits] block): train from a store "
                             "extracted with --tile, not --live")
    samples = dataset.samples()
    spec = spec_for(backbone, dtype, dataset.classes, views)
    return FeatureSource(spec=spec, ids=[s.id for s in samples], splits=[s.split for s in samples],
                         dataset=SegmentationDataset(samples, backbone.preprocess, dataset.sample_labels, views=spec.views),
                         data_root=Path(data), weights=weights_source(weights), backbone=backbone,
                         location=f"live:{dataset.reference}")
