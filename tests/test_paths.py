"""Module-level checks of the argument helpers (cachedseg.paths) and the views (cachedseg.views): what every command
relies on when it checks its input, without going through the CLI."""

import numpy as np
import pytest
import torch

from cachedseg import paths
from cachedseg.dataset import open_dataset
from cachedseg.errors import CachedsegError
from cachedseg.views import VIEWS, apply_view, check_views


def test_a_url_is_told_from_a_local_path_and_refused_where_only_a_folder_will_do(tmp_path):
    assert paths.is_url("s3://bucket/x.zarr") and paths.is_url("gs://b/x") and not paths.is_url(tmp_path / "x.zarr")
    paths.check_local(tmp_path / "x.zarr")
    with pytest.raises(CachedsegError, match="s3://bucket/x.zarr"):
        paths.check_local("s3://bucket/x.zarr", "upgrade")


def test_did_you_mean_names_the_nearest_sibling_or_nothing(tmp_path):
    (tmp_path / "small-float32.zarr").mkdir()
    assert str(tmp_path / "small-float32.zarr") in paths.did_you_mean(tmp_path / "smal-float32.zarr")
    assert paths.did_you_mean(tmp_path / "unrelated") == ""
    assert paths.did_you_mean(tmp_path / "no" / "such" / "folder") == ""  # its parent does not exist either


def test_checkpoint_path_takes_a_file_or_a_run_folder_and_names_what_is_missing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"")
    assert paths.checkpoint_path(run) == run / "best.pt" and paths.checkpoint_path(run / "best.pt") == run / "best.pt"
    with pytest.raises(CachedsegError) as err:
        paths.checkpoint_path(run, "last")
    assert str(run) in str(err.value) and "last.pt" in str(err.value)
    with pytest.raises(CachedsegError) as err:
        paths.checkpoint_path(tmp_path / "rnu")
    assert str(tmp_path / "rnu") in str(err.value) and str(run) in str(err.value).replace(str(tmp_path / "rnu"), "")


def test_dataset_store_and_image_arguments_that_do_not_exist_are_named(dataset, store32, tmp_path):
    assert open_dataset(dataset).root == dataset
    for missing in (tmp_path / "nowhere", next((dataset / "JPEGImages").glob("*.jpg"))):  # and a file, not a folder
        with pytest.raises(CachedsegError, match=str(missing)):
            open_dataset(missing)
    paths.check_store(store32)
    with pytest.raises(CachedsegError, match=f"{tmp_path / 'gone.zarr'}.*cachedseg extract"):
        paths.check_store(tmp_path / "gone.zarr")
    paths.check_images([dataset / "JPEGImages"])
    with pytest.raises(CachedsegError, match=str(tmp_path / "missing.jpg")):
        paths.check_images([dataset / "JPEGImages", tmp_path / "missing.jpg"])


def test_check_writable_names_the_path_in_the_way_and_allows_folders_to_be_created(tmp_path):
    paths.check_writable(tmp_path / "new" / "deeper" / "e.json", "--json")  # created later, under a writable folder
    paths.check_writable(tmp_path / "new" / "out", "--out", folder=True)
    paths.check_writable("s3://bucket/e.json", "--json")  # left to the storage to answer
    (tmp_path / "file").write_text("x")
    with pytest.raises(CachedsegError, match=f"--json {tmp_path}"):  # a folder where the file goes
        paths.check_writable(tmp_path, "--json")
    with pytest.raises(CachedsegError, match=f"--out {tmp_path / 'file'}"):  # a file where the folder goes
        paths.check_writable(tmp_path / "file", "--out", folder=True)
    with pytest.raises(CachedsegError, match=str(tmp_path / "file")):  # a file where a parent folder goes
        paths.check_writable(tmp_path / "file" / "sub" / "e.json", "--json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # a check creates nothing


@pytest.mark.parametrize("view", VIEWS)
def test_each_view_is_its_own_inverse_alike_for_numpy_and_torch(view):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    once = apply_view(x, view)
    assert np.array_equal(apply_view(once, view), x) and once.shape == x.shape
    assert np.array_equal(apply_view(torch.from_numpy(x), view).numpy(), once)
    assert np.array_equal(once, x) == (view == "identity")  # the extra views change the image


def test_flip_mirrors_the_last_axis_only():
    x = np.arange(6).reshape(2, 3)
    assert apply_view(x, "flip").tolist() == [[2, 1, 0], [5, 4, 3]]
    with pytest.raises(CachedsegError, match="'rotate'"):
        apply_view(x, "rotate")


def test_views_are_recorded_identity_first_each_once():
    assert check_views(()) == ("identity",) and check_views(("flip",)) == ("identity", "flip")
    assert check_views(("identity", "flip")) == ("identity", "flip")
    for bad in (("flip", "flip"), ("rotate",), ("flip", "identity")):
        with pytest.raises(CachedsegError, match="--views"):
            check_views(bad)
