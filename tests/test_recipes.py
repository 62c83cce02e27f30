"""The accuracy recipes a store carries: aspect-kept input, several layers, cached views and test-time
augmentation, each with cached and live agreeing (the identity rule)."""

import json

import numpy as np
import pytest
import torch
import zarr

from cachedseg import checkpoint
from cachedseg.backbone import BackboneConfig, build_backbone
from cachedseg.data import preprocess_image
from cachedseg.dataset import load_image, open_dataset
from cachedseg.store import FeatureStore
from cachedseg.train import epoch_batches
from tests.conftest import MIN_AGREEMENT, TRAIN, assert_features_close, one_line_error, run_cli

RECIPE = ["--backbone", "vit_small_patch14_dinov2", "--short-side", "112", "--weights", "random"]


@pytest.fixture(scope="session")
def rich_store(dataset, tmp_path_factory):
    """A store of aspect-kept inputs (160x120 frames -> 154x112), the last 2 layers, and the flipped view."""
    path = tmp_path_factory.mktemp("stores") / "rich.zarr"
    run_cli("extract", dataset, "--store", path, *RECIPE, "--layers", "2", "--views", "flip", "--dtype", "float32",
            "--workers", "0")
    return path


def test_the_store_keeps_the_aspect_ratio_layers_and_views(dataset, rich_store):
    cache = FeatureStore.open(rich_store)
    assert cache.spec.input_size == (112, 154) and cache.spec.grid == (8, 11) and cache.spec.mask_size == (128, 176)
    assert cache.spec.layers == 2 and cache.spec.views == ("identity", "flip")
    assert zarr.open_group(str(rich_store))["features"].shape == (8, 2, 2, 384, 8, 11)
    # each view is the backbone on the transformed input, as the live path computes it
    model = build_backbone(BackboneConfig("vit_small_patch14_dinov2", (112, 154), layers=2), "random")
    sample = open_dataset(dataset).samples()[0]
    x = preprocess_image(load_image(sample.image), model.preprocess)[None]
    flipped, mask_flipped = cache.read(0, 1)
    assert_features_close(flipped, model(x.flip(-1))[0])
    assert np.array_equal(mask_flipped, cache.read(0, 0)[1][:, ::-1])


def test_each_epoch_draws_one_view_per_image_the_same_for_cached_and_live():
    a = epoch_batches(list(range(40)), 4, torch.Generator().manual_seed(0), views=2)
    b = epoch_batches(list(range(40)), 4, torch.Generator().manual_seed(0), views=2)
    assert a == b
    pairs = [p for batch in a for p in batch]
    assert sorted(i for i, _ in pairs) == list(range(40))  # every image once
    assert {v for _, v in pairs} == {0, 1}  # in either view


def test_a_head_on_views_and_layers_agrees_cached_and_live_with_tta(dataset, rich_store, tmp_path):
    run = tmp_path / "conv"
    run_cli("train", rich_store, "--run", run, "--decoder", "conv", *TRAIN)
    assert checkpoint.load_run(run).decoder_config.layers == 2  # all the store holds, by default
    run_cli("evaluate", run, "--store", rich_store, "--tta", "--compare-live", "--json", tmp_path / "tta.json")
    run_cli("evaluate", run, "--store", rich_store, "--json", tmp_path / "plain.json")
    tta, plain = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("tta", "plain"))
    assert tta["agreement"]["differ"] <= (1 - MIN_AGREEMENT) * tta["agreement"]["pixels"]
    assert tta["confusion"] != plain["confusion"]  # the flipped view changed some predictions
    out = tmp_path / "pred"
    run_cli("predict", dataset / "JPEGImages", "--run", run, "--out", out, "--tta")
    assert len(list(out.glob("*_label.png"))) == 8


def test_a_head_reading_fewer_layers_uses_the_last_ones_and_more_is_refused(dataset, rich_store, tmp_path):
    run = tmp_path / "lin1"
    run_cli("train", rich_store, "--run", run, "--decoder", "linear", "--layers", "1", *TRAIN)
    ckpt = checkpoint.load_run(run)
    assert ckpt.decoder_config.layers == 1 and ckpt.decoder().classifier.in_channels == 384
    run_cli("evaluate", run, "--store", rich_store, "--compare-live", "--json", tmp_path / "e.json")
    agreement = json.loads((tmp_path / "e.json").read_text())["agreement"]
    assert agreement["differ"] <= (1 - MIN_AGREEMENT) * agreement["pixels"]  # live builds a 1-layer backbone
    one_line_error(run_cli("train", rich_store, "--run", tmp_path / "l3", "--layers", "3", *TRAIN, ok=False),
                   "--layers 3")
    two = tmp_path / "lin2"
    run_cli("train", rich_store, "--run", two, "--decoder", "linear", *TRAIN)
    one_layer = tmp_path / "one.zarr"
    run_cli("extract", dataset, "--store", one_layer, *RECIPE, "--dtype", "float32", "--workers", "0")
    one_line_error(run_cli("evaluate", two, "--store", one_layer, ok=False), "layers")


def test_live_training_computes_the_same_views_as_the_cache(dataset, rich_store, tmp_path):
    cached, live = tmp_path / "cached", tmp_path / "live"
    run_cli("train", rich_store, "--run", cached, "--decoder", "linear", "--layers", "2", *TRAIN)
    run_cli("train", "--live", dataset, "--run", live, *RECIPE, "--views", "flip", "--layers", "2",
            "--dtype", "float32", "--decoder", "linear", *TRAIN)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (cached, live))
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-4)


def test_tta_needs_cached_views(store32, run32):
    one_line_error(run_cli("evaluate", run32, "--store", store32, "--tta", ok=False), "--views flip")
