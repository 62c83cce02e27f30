"""The cache follows the data: changed, touched, added, moved and removed images on a rerun of `extract`, stale
labels at `evaluate`, stores without records, and a dataset with no usable image."""

import json
import os
import shutil

import numpy as np
import pytest
import zarr
from PIL import Image

from cachedseg import extract as extract_module
from cachedseg.backbone import BackboneConfig
from cachedseg.data import preprocess_mask
from cachedseg.dataset import open_dataset
from cachedseg.errors import CachedsegError
from cachedseg.extract import extract
from cachedseg.features import cached_source
from cachedseg.store import DONE, FeatureStore
from tests.conftest import SMALL, TRAIN, one_line_error, run_cli

BACKBONE = BackboneConfig("vit_small_patch14_dinov2", 112)


def run(data, store, **options):
    """`extract` as every store here is built: float32, one image per batch (the same computation each time)."""
    return extract(data, store, BACKBONE, weights="random", dtype="float32", batch_size=1, workers=0, **options)


def listed(data, split):
    """The ids of a split file."""
    return (data / "ImageSets" / f"{split}.txt").read_text().split()


def relist(data, split, ids):
    """Rewrite a split file."""
    (data / "ImageSets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def by_id(store):
    """Features, masks and flags of a store, keyed by image id (store order may differ between stores)."""
    g, cache = zarr.open_group(str(store)), FeatureStore.open(store)
    features, masks, flags = g["features"][:], g["masks"][:], g["done"][:]
    return {id_: (features[i], masks[i], flags[i], split)
            for i, (id_, split) in enumerate(zip(cache.ids, cache.splits))}


def assert_same_as_fresh(data, store, tmp_path):
    """Every image the dataset lists is in `store` exactly as a fresh extraction of `data` has it: the same
    computation (batch size 1), so bit for bit."""
    fresh = tmp_path / "fresh.zarr"
    run(data, fresh)
    ours, ref = by_id(store), by_id(fresh)
    for id_, (features, mask, flag, split) in ref.items():
        assert np.array_equal(ours[id_][0], features), id_
        assert np.array_equal(ours[id_][1], mask) and ours[id_][2:] == (flag, split), id_


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory):
    """Stores of a private copy of the dataset by images per shard (built on first use): 1, or 3 (8 images: the
    last shard is partly filled)."""
    root = tmp_path_factory.mktemp("fresh")
    data, stores = root / "data", {}
    shutil.copytree(dataset, data)

    def get(per: int):
        if per not in stores:
            stores[per] = root / f"s{per}.zarr"
            run(data, stores[per], images_per_shard=per)
        return data, stores[per]
    return get


@pytest.fixture
def per():
    """Images per shard of the store under test (tests that grow or rewrite shards parametrize it)."""
    return 1


@pytest.fixture
def copy(built, per, tmp_path):
    """A copy of the built dataset and store to change (copytree keeps sizes and mtimes: the records still match)."""
    data, store = tmp_path / "data", tmp_path / "s.zarr"
    shutil.copytree(built(per)[0], data)
    shutil.copytree(built(per)[1], store)
    return data, store


def test_a_changed_mask_is_rewritten_without_a_backbone_pass(copy, tmp_path, monkeypatch):
    data, store = copy
    id_ = listed(data, "trn")[0]
    path = data / "SegmentationClass" / f"{id_}.png"
    labels = np.array(Image.open(path))
    labels[:40] = 3
    Image.fromarray(labels).save(path)
    before = by_id(store)
    result = run(data, store)
    assert (result.masks_changed, result.changed, result.extracted) == (1, 0, 0)
    after = by_id(store)
    assert np.array_equal(after[id_][0], before[id_][0])  # the features were not touched
    assert np.array_equal(after[id_][1], preprocess_mask(open_dataset(data).read_labels(path), (128, 128)).numpy())
    assert not np.array_equal(after[id_][1], before[id_][1])
    assert_same_as_fresh(data, store, tmp_path)


@pytest.mark.parametrize("per", [1, 3])
def test_a_replaced_image_is_recomputed_as_a_fresh_store_has_it(copy, tmp_path):
    data, store = copy
    victim, donor = listed(data, "trn")[:2]
    flipped = Image.open(data / "JPEGImages" / f"{donor}.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(data / "JPEGImages" / f"{victim}.jpg")
    before = by_id(store)
    result = run(data, store)
    assert (result.changed, result.masks_changed, result.touched) == (1, 0, 0)
    assert result.extracted >= 1  # in a sharded store, the whole shard
    assert not np.array_equal(by_id(store)[victim][0], before[victim][0])
    assert_same_as_fresh(data, store, tmp_path)


def test_touched_but_equal_files_are_not_recomputed_and_a_no_op_rerun_reads_no_file(copy, monkeypatch):
    data, store = copy
    trn = listed(data, "trn")
    os.utime(data / "JPEGImages" / f"{trn[0]}.jpg", ns=(1, 10**18))  # a new mtime, the same bytes
    mask = data / "SegmentationClass" / f"{trn[1]}.png"
    mask.write_bytes(mask.read_bytes())  # rewritten with the same bytes
    before = by_id(store)
    result = run(data, store)
    assert (result.touched, result.changed, result.masks_changed, result.extracted) == (2, 0, 0, 0)
    for id_, (features, labels, flag, split) in by_id(store).items():
        assert np.array_equal(features, before[id_][0]) and np.array_equal(labels, before[id_][1])

    def no_hashing(paths):
        raise AssertionError(f"hashed {paths} although its size and mtime match the record")
    monkeypatch.setattr(extract_module, "file_hashes", no_hashing)
    files = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    result = run(data, store)  # the records now hold the new stats: nothing to hash, nothing to write
    assert (result.touched, result.extracted, result.skipped) == (0, 0, result.images)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("per", [1, 3])
def test_an_added_id_is_extracted_and_a_moved_id_changes_split(copy, tmp_path):
    data, store = copy
    trn, val = listed(data, "trn"), listed(data, "val")
    new = "added_later_with_a_longer_id"  # wider than every id so far: the ids array is rewritten wider
    shutil.copy(data / "JPEGImages" / f"{trn[0]}.jpg", data / "JPEGImages" / f"{new}.jpg")
    shutil.copy(data / "SegmentationClass" / f"{trn[0]}.png", data / "SegmentationClass" / f"{new}.png")
    relist(data, "trn", trn[1:])
    relist(data, "val", [trn[0], *val, new])  # trn[0] moves to val; the new id lands after the stored ones
    before = by_id(store)
    result = run(data, store)
    assert (result.added, result.moved, result.gone) == (1, 1, {})
    cache = FeatureStore.open(store)
    assert cache.ids[-1] == new and len(cache) == len(before) + 1
    assert dict(zip(cache.ids, cache.splits))[trn[0]] == "val"
    assert np.array_equal(by_id(store)[trn[0]][0], before[trn[0]][0])  # moved, not recomputed
    source = cached_source(store)
    assert sorted(source.ids[i] for i in source.indices("val")) == sorted([trn[0], *val, new])
    assert_same_as_fresh(data, store, tmp_path)


@pytest.mark.parametrize("per", [1, 3])
def test_a_removed_id_is_kept_in_the_store_but_left_out_of_training(copy, tmp_path):
    data, store = copy
    trn, val = listed(data, "trn"), listed(data, "val")
    removed, deleted = trn[0], val[-1]
    relist(data, "trn", trn[1:])
    (data / "JPEGImages" / f"{deleted}.jpg").unlink()  # still listed, but its image is gone
    result = run(data, store)
    assert set(result.gone) == {removed, deleted} and deleted in result.gone[deleted]
    assert result.extracted == 0 and result.images == len(trn) + len(val) - 2
    assert by_id(store)[removed][2] == DONE  # its data stays: it may come back
    source = cached_source(store)
    assert removed not in [source.ids[i] for i in source.indices("trn")]
    assert deleted not in [source.ids[i] for i in source.indices("val")]
    kept = zarr.open_group(str(store), mode="r+")["features"]
    index = FeatureStore.open(store).ids.index(removed)
    features = kept[index]
    kept[index] = np.nan  # the fill value: reading it would be an error naming the image
    run_cli("train", store, "--run", tmp_path / "r", *TRAIN)
    kept[index] = features
    relist(data, "trn", trn)  # listed again: back in the store's trn split, nothing recomputed
    result = run(data, store)
    assert set(result.gone) == {deleted} and result.extracted == 0
    source = cached_source(store)
    assert removed in [source.ids[i] for i in source.indices("trn")]


def test_info_and_the_summary_name_what_changed(copy, tmp_path):
    data, store = copy
    trn = listed(data, "trn")
    relist(data, "trn", trn[1:])
    out = run_cli("extract", data, "--store", store, *SMALL, "--dtype", "float32", "--workers", "0")
    assert trn[0] in out.stderr
    assert FeatureStore.open(store).describe()["gone"] == 1  # what info prints
    assert trn[0] in FeatureStore.open(store).gone
    run_cli("info", store)


def test_evaluate_warns_when_the_labels_are_not_those_the_store_was_built_from(dataset, store32, run32, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)  # the same files (sizes and mtimes kept): nothing to warn about
    out = tmp_path / "same.json"
    result = run_cli("evaluate", run32, "--store", store32, "--data", data, "--json", out)
    assert json.loads(out.read_text())["stale_labels"] == [] and not result.stderr.strip()
    victim = listed(data, "val")[0]
    path = data / "SegmentationClass" / f"{victim}.png"
    labels = np.array(Image.open(path))
    labels[:10] = 1
    Image.fromarray(labels).save(path)
    touched = data / "SegmentationClass" / f"{listed(data, 'val')[1]}.png"
    os.utime(touched, ns=(1, 10**18))  # other stats, the same bytes: not stale
    result = run_cli("evaluate", run32, "--store", store32, "--data", data, "--json", out)
    assert json.loads(out.read_text())["stale_labels"] == [victim]
    assert victim in result.stderr and result.exit_code == 0


def test_evaluate_of_a_run_alone_warns_about_its_own_stores_labels(copy, tmp_path):
    from cachedseg.evaluate import evaluate
    data, store = copy
    zarr.open_group(str(store), mode="r+").attrs["dataset"] = str(data)  # the copy is this store's dataset
    run_cli("train", store, "--run", tmp_path / "r", *TRAIN)
    victim = listed(data, "val")[0]
    path = data / "SegmentationClass" / f"{victim}.png"
    labels = np.array(Image.open(path))
    labels[:10] = 1
    Image.fromarray(labels).save(path)
    # neither store nor data: the library scores the run's own store, and checks its labels as with --store
    assert evaluate(tmp_path / "r", device="cpu").stale_labels == (victim,)


def test_a_store_without_records_still_works_and_adopts_its_files_on_extract(copy, tmp_path):
    data, store = copy
    shutil.rmtree(store / "sources")  # as cachedseg wrote stores before records existed
    run_cli("info", store)
    assert FeatureStore.open(store).describe()["done"] == 8
    run_cli("train", store, "--run", tmp_path / "r", *TRAIN)
    run_cli("evaluate", tmp_path / "r", "--store", store, "--data", data)
    result = run(data, store)
    assert (result.adopted, result.extracted, result.changed) == (8, 0, 0)
    id_ = listed(data, "trn")[0]
    path = data / "SegmentationClass" / f"{id_}.png"
    labels = np.array(Image.open(path))
    labels[:40] = 3
    Image.fromarray(labels).save(path)
    assert run(data, store).masks_changed == 1  # from now on the store follows the data


def test_a_store_left_half_way_through_growing_is_finished_by_the_next_extract(copy, tmp_path, monkeypatch):
    data, store = copy
    trn = listed(data, "trn")
    shutil.copy(data / "JPEGImages" / f"{trn[0]}.jpg", data / "JPEGImages" / "late.jpg")
    shutil.copy(data / "SegmentationClass" / f"{trn[0]}.png", data / "SegmentationClass" / "late.png")
    relist(data, "trn", [*trn, "late"])
    from cachedseg import store as store_module
    real = store_module._write_ids_and_splits

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stopped after the arrays grew, before the ids were rewritten
    monkeypatch.setattr(store_module, "_write_ids_and_splits", killed)
    with pytest.raises(KeyboardInterrupt):
        run(data, store)
    monkeypatch.setattr(store_module, "_write_ids_and_splits", real)
    with pytest.raises(CachedsegError, match="cachedseg extract"):
        cached_source(store)
    result = run(data, store)
    assert result.extracted >= 1 and FeatureStore.open(store).ids[-1] == "late"
    assert_same_as_fresh(data, store, tmp_path)


def test_a_dataset_without_one_usable_image_is_an_error_at_extract(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    for image in (data / "JPEGImages").glob("*.jpg"):
        image.write_text("not a jpeg")
    first = listed(data, "trn")[0]
    result = run_cli("extract", data, "--store", tmp_path / "s.zarr", *SMALL, "--skip-bad", "--workers", "0", ok=False)
    one_line_error(result, f"{first}.jpg")
    assert (zarr.open_group(str(tmp_path / "s.zarr"))["done"][:] == 2).all()  # the bad flags stay recorded


def test_a_split_without_one_usable_image_is_an_error_at_extract(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    for id_ in listed(data, "val"):
        (data / "JPEGImages" / f"{id_}.jpg").write_text("not a jpeg")
    result = run_cli("extract", data, "--store", tmp_path / "s.zarr", *SMALL, "--skip-bad", "--workers", "0", ok=False)
    one_line_error(result, "val", f"{listed(data, 'val')[0]}.jpg")


def test_the_store_path_is_printed_whole_and_a_no_op_rerun_says_so(copy, tmp_path):
    data, store = copy
    deep = tmp_path / ("long-folder-name-" * 6) / ("deeper-" * 20) / "a-store-with-a-long-name-float32.zarr"
    deep.parent.mkdir(parents=True)
    shutil.move(store, deep)
    assert len(str(deep)) > 240  # wider than the console of a log (and than any terminal)
    out = run_cli("extract", data, "--store", deep, *SMALL, "--dtype", "float32", "--workers", "0").stdout
    assert any(str(deep) in line for line in out.splitlines())
    assert "0.00 img/s" not in out
