"""Where the decoder's input comes from: the Zarr cache, or the backbone run live on the images.

Both sources hand the decoder the same numbers: live features are cast to the cache dtype first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import zarr

from cachedseg.backbone import Backbone, BackboneConfig, build_backbone, weights_source
from cachedseg.data import SegmentationDataset, read_dataset
from cachedseg.errors import CachedsegError
from cachedseg.store import DONE, PENDING, StoreSpec, open_store, spec_for


class StoreDataset(torch.utils.data.Dataset):
    """Cached features and masks by image index; opens the store lazily, once per DataLoader worker.

    A chunk that fails its checksum comes back as an error naming the image, never as wrong numbers.
    """

    def __init__(self, path: str | Path, in_memory: bool = False):
        self.path = str(path)
        self._group = None
        self._memory = None
        if in_memory:
            group = zarr.open_group(self.path, mode="r")
            need = group["features"].nbytes + group["masks"].nbytes
            if need > 0.8 * _available_ram():
                raise CachedsegError(f"--in-memory needs {need / 1e9:.1f} GB but only {_available_ram() / 1e9:.1f} GB "
                                     "of RAM is free; train without --in-memory to stream from disk")
            try:
                self._memory = {"features": torch.from_numpy(group["features"][:]),
                                "masks": torch.from_numpy(group["masks"][:])}
            except (ValueError, OSError):  # find and name the corrupt image
                for i in range(group["done"].shape[0]):
                    if "error" in (item := self[i]):
                        raise CachedsegError(item["error"]) from None
                raise

    @property
    def in_memory(self) -> bool:
        """Whether the whole cache was loaded into RAM."""
        return self._memory is not None

    def __len__(self) -> int:
        return zarr.open_group(self.path, mode="r")["done"].shape[0]

    def __getitem__(self, index: int) -> dict:
        if self._memory is not None:
            return {"index": index, "features": self._memory["features"][index], "mask": self._memory["masks"][index]}
        if self._group is None:  # array handles looked up once: a group lookup costs as much as a read
            group = zarr.open_group(self.path, mode="r")
            self._group = {name: group[name] for name in ("features", "masks", "ids")}
        try:
            features = self._group["features"][index]  # [C, h, w], cache dtype
            mask = self._group["masks"][index]  # [M, M] uint8
        except (ValueError, OSError) as exc:  # crc32c mismatch, truncated chunk, unreadable file
            id_ = self._group["ids"][index]
            return {"index": index, "error": f"the cached data of image {id_!r} in {self.path} is corrupt ({exc}); "
                                             f"recompute it with `cachedseg extract DATA --store {self.path} --redo {id_}`"}
        return {"index": index, "features": torch.from_numpy(features), "mask": torch.from_numpy(mask)}


def _available_ram() -> int:
    """Bytes of RAM available now."""
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
        splits: "trn" or "val", by index.
        dataset: Torch dataset returning `features` (cached) or `image` (live) plus `mask`, by index.
        data_root: The image dataset's folder (for native-resolution labels).
        weights: Where the backbone's weights came from (`auto`, `random` or a file), for later live use.
        backbone: The live backbone, or None for a cache.
    """

    spec: StoreSpec
    ids: list[str]
    splits: list[str]
    dataset: torch.utils.data.Dataset
    data_root: Path
    weights: str
    backbone: Backbone | None = None

    def indices(self, split: str) -> list[int]:
        """Image indices of one split, in store order."""
        return [i for i, s in enumerate(self.splits) if s == split]

    def features(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The decoder input [B, C, h, w] float32 for a collated batch: cached, or live and cast like the cache."""
        if self.backbone is None:
            return batch["features"].to(device, non_blocking=True).float()
        feats = self.backbone(batch["image"].to(device, non_blocking=True))  # [B, C, h, w] float32
        return feats.to(getattr(torch, self.spec.dtype)).float()


def cached_source(store: str | Path, in_memory: bool = False, data: str | Path | None = None) -> FeatureSource:
    """A source reading a finished feature store; `data` overrides the dataset folder the store records."""
    group, spec = open_store(store)
    done = group["done"][:]
    if (done == PENDING).any():
        raise CachedsegError(f"the store {store} is unfinished ({int((done != PENDING).sum())} of {len(done)} images); "
                             "rerun the same `cachedseg extract` command to finish it")
    # images skipped as unreadable (`extract --skip-bad`) belong to no split
    splits = [s if d == DONE else "skipped" for s, d in zip(group["split"][:].tolist(), done)]
    return FeatureSource(spec=spec, ids=group["ids"][:].tolist(), splits=splits,
                         dataset=StoreDataset(store, in_memory), data_root=Path(data or group.attrs["dataset"]),
                         weights=group.attrs.get("weights", "auto"))


def live_source(data: str | Path, backbone: Backbone, dtype: str, weights: str) -> FeatureSource:
    """A source running `backbone` (built from `weights`) on the images of an AeroScapes-layout folder."""
    samples = read_dataset(data)
    return FeatureSource(spec=spec_for(backbone, dtype), ids=[s.id for s in samples], splits=[s.split for s in samples],
                         dataset=SegmentationDataset(samples, backbone.preprocess), data_root=Path(data),
                         weights=weights_source(weights), backbone=backbone)


def backbone_for(spec: StoreSpec, weights: str, device: str | torch.device) -> Backbone:
    """Rebuild the backbone that made `spec`'s features, refusing one with another fingerprint."""
    model = build_backbone(BackboneConfig(spec.backbone, spec.image_size, spec.precision), weights, device)
    if model.fingerprint != spec.fingerprint:
        raise CachedsegError(f"the {spec.backbone} built with --weights {weights} has fingerprint {model.fingerprint}, "
                             f"but the decoder was trained on features with fingerprint {spec.fingerprint}; "
                             "pass the --weights the features were extracted with")
    return model
