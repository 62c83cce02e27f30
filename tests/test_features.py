"""Module-level checks of the decoder's inputs (cachedseg.features): a cached source streamed or in memory, a live
source, and what each does with an image it cannot read, on the session fixtures instead of through `train`."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cachedseg.backbone import backbone_for
from cachedseg.errors import CachedsegError
from cachedseg.features import StoreDataset, cached_source, live_source
from cachedseg.store import FeatureStore
from tests.conftest import assert_features_close, chunk_file


def test_a_cached_source_is_the_store_streamed_or_in_memory_bit_for_bit(dataset, store32):
    store = FeatureStore.open(store32)
    streamed, loaded = cached_source(store32), cached_source(store32, in_memory=True)
    assert streamed.ids == loaded.ids == store.ids and streamed.splits == loaded.splits == store.splits
    assert streamed.spec == store.spec and streamed.backbone is None and streamed.weights == "random"
    assert streamed.location == str(Path(store32).resolve()) and streamed.data_root == Path(store.dataset)
    assert not streamed.dataset.in_memory and loaded.dataset.in_memory and not loaded.dataset.on_device
    for i in range(len(store)):
        features, mask = store.read(i)  # [L, C, h, w], [Mh, Mw]
        for source in (streamed, loaded):
            item = source.item(i)
            assert item["index"] == i and item["view"] == 0
            assert np.array_equal(item["features"].numpy(), features) and np.array_equal(item["mask"].numpy(), mask)
            batch = source.features({"features": item["features"][None]}, torch.device("cpu"))
            assert batch.dtype == torch.float32 and np.array_equal(batch[0].numpy(), features)
    assert cached_source(store32, data=dataset / "elsewhere").data_root == dataset / "elsewhere"  # --data overrides


def test_an_unreadable_chunk_is_an_error_naming_the_image_not_numbers(store32, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(store32, path)
    store = FeatureStore.open(path)
    victim = 3
    chunk_file(path, "features", victim).unlink()
    item = StoreDataset(path)[victim]  # a DataLoader worker hands the error to the main process
    assert set(item) == {"index", "view", "error"} and store.ids[victim] in item["error"]
    source = cached_source(path)
    with pytest.raises(CachedsegError, match=store.ids[victim]):
        source.item(victim)
    with pytest.raises(CachedsegError, match=store.ids[victim]):
        source.check({"errors": [(victim, item["error"])]})
    source.check({"errors": []})
    assert np.array_equal(source.item(victim - 1)["features"].numpy(), store.read(victim - 1)[0])  # the others read


def test_an_unfinished_store_is_refused_by_name(store32, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(store32, path)
    zarr.open_group(str(path), mode="r+")["done"][2] = 0  # pending
    with pytest.raises(CachedsegError, match=f"{path}.*cachedseg extract"):
        cached_source(path)


def test_a_live_source_computes_the_caches_features(dataset, store32):
    store = FeatureStore.open(store32)
    live = live_source(dataset, backbone_for(store.spec, "random", "cpu"), store.spec.dtype, "random")
    assert live.ids == store.ids and live.splits == store.splits and live.spec == store.spec
    assert live.location == f"live:{dataset.resolve()}" and live.backbone is not None
    for i in (0, len(store) - 1):
        item = live.item(i)
        assert np.array_equal(item["mask"].numpy(), store.read(i)[1])  # the same mask, bit for bit
        with torch.no_grad():
            features = live.features({"image": item["image"][None]}, torch.device("cpu"))[0]
        assert_features_close(features.numpy(), store.read(i)[0])  # alone here, in a batch of 4 in the store
