"""The dataset object: layout, splits, classes and masks, as every stage reads them."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cachedseg.classes import ClassSet, spread_colors
from cachedseg.dataset import AEROSCAPES, Dataset, Layout, open_dataset
from cachedseg.errors import CachedsegError
from cachedseg.spec import StoreSpec

SIX = ClassSet(names=("ground", "tree", "building", "road", "car", "water"),
               colors=((0, 0, 0), (0, 128, 0), (128, 0, 0), (128, 128, 128), (0, 0, 255), (0, 128, 255)))


def test_a_dataset_written_through_its_layout_reads_back(tmp_path):
    layout = Layout(images="imgs/{id}.png", masks="labels/{id}_mask.png",
                    split_files=(("trn", "lists/trn.lst"), ("val", "lists/val.lst")))
    data = Dataset(tmp_path, SIX, layout, name="mine")
    labels = np.array([[0, 5], [255, 3]], dtype=np.uint8)
    for id_ in ("a", "b", "c"):
        data.write_sample(id_, Image.new("RGB", (2, 2)), labels)
    data.write_splits({"trn": ["a", "b"], "val": ["c"]})
    samples = data.samples()
    assert [(s.id, s.split) for s in samples] == [("a", "trn"), ("b", "trn"), ("c", "val")]
    assert samples[0].image == tmp_path / "imgs" / "a.png" and samples[0].mask == tmp_path / "labels" / "a_mask.png"
    assert data.read_labels(samples[2].mask).tolist() == labels.tolist()
    assert data.frame_size() == (2, 2)


def test_labels_outside_the_classes_are_refused_naming_the_file(tmp_path):
    data = Dataset(tmp_path, SIX)
    path = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 6]], dtype=np.uint8)).save(path)  # 6: one past the six classes
    with pytest.raises(CachedsegError, match="m.png"):
        data.read_labels(path)
    assert Dataset(tmp_path, AEROSCAPES).read_labels(path).tolist() == [[0, 6]]  # within AeroScapes' twelve


def test_native_labels_are_one_byte_a_pixel(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.array([[0, 3], [255, 11]], dtype=np.uint16)).save(path)
    labels = Dataset(tmp_path).read_labels(path)  # a 16-bit mask is checked, then held in one byte a pixel
    assert labels.dtype == np.uint8 and labels.tolist() == [[0, 3], [255, 11]]


def test_a_folder_without_the_layout_gets_the_layout_named(tmp_path):
    with pytest.raises(CachedsegError, match="ImageSets"):
        open_dataset(tmp_path).samples()
    with pytest.raises(CachedsegError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")


@pytest.mark.parametrize("bad", [
    dict(names=("a", "a"), colors=((0, 0, 0), (1, 1, 1))),  # a name twice
    dict(names=("a", "b"), colors=((0, 0, 0),)),  # a colour short
    dict(names=("a",), colors=((0, 0, 300),)),  # not a byte
    dict(names=("a", "b"), colors=((0, 0, 0), (1, 1, 1)), ignore_index=1),  # the ignore label is a class
    dict(names=(), colors=()),
])
def test_a_class_set_that_cannot_be_used_is_refused(bad):
    with pytest.raises(CachedsegError):
        ClassSet(**bad)


def test_the_palette_colours_each_class_and_leaves_the_rest_black():
    palette = SIX.palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert [tuple(c) for c in palette[:6].tolist()] == list(SIX.colors)
    assert not palette[6:].any()  # the ignore label and values beyond the classes


def test_class_set_differences_name_what_differs():
    assert SIX.differences(SIX) == []
    recoloured = ClassSet(SIX.names, ((9, 9, 9),) + SIX.colors[1:], ignore_index=200)
    diffs = " ".join(SIX.differences(recoloured))
    assert "ground" in diffs and "200" in diffs and "tree" not in diffs
    with pytest.raises(CachedsegError, match="ground"):
        Dataset(Path("."), recoloured).check_classes(SIX, "the store x")


def test_spread_colors_are_distinct():
    for n in (1, 2, 12, 24, 60):
        colors = spread_colors(n)
        assert len(colors) == n and len(set(colors)) == n


def test_a_spec_from_before_colours_were_recorded_gets_aeroscapes_colours():
    attrs = dict(backbone="b", fingerprint="f", input_size=[14, 14], mask_size=[16, 16], mean=[0, 0, 0],
                 std=[1, 1, 1], interpolation="bicubic", precision="float32", dtype="float16", channels=8,
                 grid=[1, 1], class_names=list(AEROSCAPES.names), ignore_index=255)
    spec = StoreSpec.from_attrs(attrs)
    assert spec.classes == AEROSCAPES
    spec = StoreSpec.from_attrs({**attrs, "class_names": list(SIX.names), "class_colors": [list(c) for c in SIX.colors]})
    assert spec.classes == SIX

