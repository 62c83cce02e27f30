"""The feature store format: round trip, missing and corrupt data, other readers (xarray, tensorstore), upgrade."""

import json
import shutil

import numpy as np
import pytest
import zarr

from cachedseg import upgrade as upgrade_module
from cachedseg.dataset import AEROSCAPES, SPLITS
from cachedseg.errors import CachedsegError
from cachedseg.spec import StoreSpec
from cachedseg.store import DONE, PENDING, FeatureStore, StoreAttrs, decode_ids, encode_ids
from cachedseg.upgrade import upgrade
from tests.conftest import chunk_file, one_line_error, run_cli

SPEC = StoreSpec(backbone="vit_small_patch14_dinov2", fingerprint="f" * 32, input_size=(28, 42), mask_size=(32, 48),
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic", precision="float32",
                 dtype="float16", channels=6, grid=(2, 3), class_names=AEROSCAPES.names, layers=2, views=("identity", "flip"))
IDS = ["000001_001", "a", "ünïcode_7", "x" * 40]


@pytest.fixture
def small(tmp_path):
    """A store of four images with known numbers: three written, one pending."""
    cache = FeatureStore.create(tmp_path / "s.zarr", SPEC, IDS, ["trn", "trn", "val", "val"], dataset="/data",
                             weights="random")
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((2, 2, 6, 2, 3)).astype(np.float16), rng.integers(0, 12, (32, 48), dtype=np.uint8))
            for _ in IDS]
    data[1][1][:] = 255  # an image with no labelled pixel is still an image
    for i in range(3):
        cache.write(i, *data[i])
    return cache, data


def test_ids_encode_to_bytes_and_back():
    raw = encode_ids(IDS)
    assert raw.dtype == np.uint8 and raw.shape == (4, 40)
    assert decode_ids(raw) == IDS


def test_what_is_written_reads_back_exactly(small):
    cache, data = small
    again = FeatureStore.open(cache.path)
    assert again.spec == SPEC and again.ids == IDS and again.splits == ["trn", "trn", "val", "val"]
    assert again.flags().tolist() == [DONE, DONE, DONE, PENDING]
    for i in range(3):
        features, mask = again.read(i)  # the identity view
        assert np.array_equal(features, data[i][0][0]) and np.array_equal(mask, data[i][1])
        features, mask = again.read(i, 1)  # flipped: its own features, and the mask flipped like the input
        assert np.array_equal(features, data[i][0][1]) and np.array_equal(mask, data[i][1][:, ::-1])
    assert again.dataset == "/data" and again.weights == "random"
    d = again.describe()
    assert (d["images"], d["trn"], d["val"], d["done"], d["pending"]) == (4, 2, 2, 3, 1)


def test_a_missing_chunk_is_an_error_naming_the_image_never_fill_values(small):
    cache, _ = small
    with pytest.raises(CachedsegError, match="'000001_001'.*--redo 000001_001"):
        chunk_file(cache.path, "features", 0).unlink()
        cache.read(0)
    with pytest.raises(CachedsegError, match="'a'.*--redo a"):
        chunk_file(cache.path, "masks", 1).unlink()
        cache.read(1)


def test_a_corrupt_flag_is_an_error_or_with_repair_a_pending_image(small):
    cache, _ = small
    chunk = chunk_file(cache.path, "done", 2)
    chunk.write_bytes(bytes([chunk.read_bytes()[0] ^ 1]) + chunk.read_bytes()[1:])
    with pytest.raises(CachedsegError, match="ünïcode_7"):
        cache.flags()
    assert cache.flags(repair=True).tolist() == [DONE, DONE, PENDING, PENDING]
    assert cache.flags().tolist() == [DONE, DONE, PENDING, PENDING]


def test_open_refuses_what_is_not_a_store_of_this_version(small, tmp_path):
    cache, _ = small
    with pytest.raises(CachedsegError, match=f"{tmp_path / 'nothing.zarr'}.*cachedseg extract"):  # how to make one
        FeatureStore.open(tmp_path / "nothing.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CachedsegError, match=str(tmp_path / "folder")):
        FeatureStore.open(tmp_path / "folder")
    with pytest.raises(CachedsegError, match="s3://bucket/x.zarr.*AWS_ENDPOINT_URL"):  # no credentials here
        FeatureStore.open("s3://bucket/x.zarr")
    cache.group.attrs["format_version"] = 1
    with pytest.raises(CachedsegError, match="cachedseg upgrade"):
        FeatureStore.open(cache.path)


def test_xarray_opens_every_array_with_named_dimensions(small):
    xr = pytest.importorskip("xarray")
    cache, data = small
    ds = xr.open_zarr(cache.path, consolidated=False)
    assert dict(ds.sizes) == {"image": 4, "view": 2, "layer": 2, "channel": 6, "token_y": 2, "token_x": 3,
                              "mask_y": 32, "mask_x": 48, "id_byte": 40, "source_file": 2, "source_field": 4}
    # the README's recipe: the ids as the `image` coordinate, then select by id
    ds = ds.assign_coords(image=decode_ids(ds["ids"].values))
    assert np.array_equal(ds["features"].sel(image="ünïcode_7").values, data[2][0])
    assert np.array_equal(ds["features"].sel(image="a", view=1, layer=1).values, data[1][0][1, 1])
    assert np.array_equal(ds["masks"].sel(image="a").values, data[1][1])
    assert [SPLITS[c] for c in ds["split"].values] == cache.splits
    assert ds["done"].values.tolist() == cache.flags().tolist()


def test_tensorstore_reads_every_array(small):
    ts = pytest.importorskip("tensorstore")
    cache, _ = small
    group = zarr.open_group(cache.path, mode="r")
    for name in ("features", "masks", "ids", "split", "done", "sources"):
        array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{cache.path}/{name}"}}).result()
        values, expected = array.read().result(), group[name][:]
        assert values.shape == expected.shape, name
        assert np.array_equal(values, expected, equal_nan=True), name


def make_v1(store, path):
    """A version-1 copy of a one-view, one-layer store, laid out as cachedseg 0.1.0 wrote them: [N, C, h, w]
    features (chunk bytes as in version 2, two folders higher), string ids and splits, zero fill values."""
    shutil.copytree(store, path)
    g = zarr.open_group(str(path), mode="r+")
    ids, splits, done = decode_ids(g["ids"][:]), [SPLITS[c] for c in g["split"][:]], g["done"][:]
    for name in ("ids", "split", "done"):
        shutil.rmtree(path / name)
    n = len(ids)
    g = zarr.open_group(str(path), mode="r+")
    for name, values in (("ids", ids), ("split", splits)):
        g.create_array(name, shape=(n,), chunks=(n,), dtype=str)[:] = np.array(values, dtype=object)
    g.create_array("done", shape=(n,), chunks=(1,), dtype="uint8", fill_value=0)[:] = done
    for i in range(n):  # c.i.0.0.0.0.0 -> c/i/0/0/0 and c.i.0.0 -> c/i/0/0 (nested keys, one view and layer less)
        (path / "features" / "c" / str(i) / "0" / "0").mkdir(parents=True)
        chunk_file(path, "features", i).rename(path / "features" / "c" / str(i) / "0" / "0" / "0")
        (path / "masks" / "c" / str(i) / "0").mkdir(parents=True)
        chunk_file(path, "masks", i).rename(path / "masks" / "c" / str(i) / "0" / "0")
    meta = json.loads((path / "features" / "zarr.json").read_text())
    shape = [meta["shape"][0], *meta["shape"][3:]]
    meta.update(shape=shape, fill_value=0, dimension_names=["image", "channel", "y", "x"],
                chunk_grid={"name": "regular", "configuration": {"chunk_shape": [1, *shape[1:]]}},
                chunk_key_encoding={"name": "default", "configuration": {"separator": "/"}})
    (path / "features" / "zarr.json").write_text(json.dumps(meta))
    meta = json.loads((path / "masks" / "zarr.json").read_text())
    meta.update(fill_value=255, dimension_names=["image", "y", "x"],
                chunk_key_encoding={"name": "default", "configuration": {"separator": "/"}})
    (path / "masks" / "zarr.json").write_text(json.dumps(meta))
    attrs = dict(g.attrs)
    for key in ("input_size", "layers", "views"):
        attrs.pop(key)
    attrs.update(format_version=1, image_size=g.attrs["input_size"][0], mask_size=g.attrs["mask_size"][0])
    g.attrs.put(attrs)
    assert zarr.open_group(str(path))["features"].shape == (n, *shape[1:])
    return path


def test_upgrade_converts_a_version_1_store_in_place_keeping_every_feature(store32, tmp_path):
    old = make_v1(store32, tmp_path / "old.zarr")
    chunks = {p.relative_to(old): p.read_bytes() for p in (old / "features").rglob("*") if p.is_file()
              and p.name != "zarr.json"}
    one_line_error(run_cli("train", old, "--run", tmp_path / "r", ok=False), "cachedseg upgrade")
    run_cli("upgrade", old)
    for name in ("features", "masks", "ids", "split", "done"):
        assert np.array_equal(zarr.open_group(str(old))[name][:], zarr.open_group(str(store32))[name][:],
                              equal_nan=True), name
    assert dict(zarr.open_group(str(old)).attrs) == dict(zarr.open_group(str(store32)).attrs)
    # no feature recomputed: each chunk's bytes moved two folders down ([N, C, h, w] -> [N, 1, 1, C, h, w])
    assert all((old / rel / "0" / "0").read_bytes() == b for rel, b in chunks.items()) and chunks
    run_cli("upgrade", old)  # a second upgrade has nothing to do
    run_cli("train", old, "--run", tmp_path / "r", "--epochs", "1", "--workers", "0")


def test_an_upgrade_killed_half_way_is_finished_by_a_rerun(store32, tmp_path, monkeypatch):
    old = make_v1(store32, tmp_path / "old.zarr")
    real_swap, calls = upgrade_module._swap_in, []

    def dies_on_second_swap(new, old):
        calls.append(old)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would, between two steps
        real_swap(new, old)
    monkeypatch.setattr(upgrade_module, "_swap_in", dies_on_second_swap)
    with pytest.raises(KeyboardInterrupt):
        upgrade(old)
    monkeypatch.setattr(upgrade_module, "_swap_in", real_swap)
    assert upgrade(old)["upgraded"]
    for name in ("features", "masks", "ids", "split", "done"):
        assert np.array_equal(zarr.open_group(str(old))[name][:], zarr.open_group(str(store32))[name][:],
                              equal_nan=True), name
    assert not list(old.glob("*.v2"))


def test_upgrade_sends_done_images_without_chunks_back_to_pending(store32, tmp_path):
    old = make_v1(store32, tmp_path / "old.zarr")
    shutil.rmtree(old / "features" / "c" / "3")  # version 1: nested chunk folders
    result = upgrade(old)
    assert result["reset"] == 1 and FeatureStore.open(old).flags().tolist().count(PENDING) == 1


def test_the_typed_attributes_are_what_the_store_holds(small):
    cache, _ = small
    stored = dict(zarr.open_group(cache.path, mode="r").attrs)
    written = json.loads(json.dumps(cache.attrs.to_dict()))  # as JSON: tuples are lists
    assert written == stored and list(written) == list(stored)  # same keys, values and order
    assert StoreAttrs.from_dict(stored) == cache.attrs
    attrs = cache.attrs
    assert (attrs.spec, attrs.num_images, attrs.images_per_shard, attrs.gone) == (SPEC, 4, 1, None)
    cache.set_gone({"a": "deleted"})  # written only once there is something gone, and read back
    assert FeatureStore.open(cache.path).attrs.gone == {"a": "deleted"} == FeatureStore.open(cache.path).gone


def test_an_empty_block_reads_as_missing_where_it_is_not_filled(small):
    cache, data = small
    features, masks = cache.empty_block(2)
    assert features.shape == (2, *data[0][0].shape) and features.dtype == np.float16 and masks.shape == (2, 32, 48)
    features[0], masks[0] = data[0]
    cache.write_block(2, features, masks, np.array([DONE, DONE], dtype=np.uint8))
    assert np.array_equal(cache.read(2)[0], data[0][0][0])
    with pytest.raises(CachedsegError, match="x{40}"):
        cache.read(3)
    assert cache.states() == ["done", "done", "done", "done"]
