"""The dataset reader and the one preprocessing function."""

import numpy as np
import pytest
import torch
from PIL import Image

from cachedseg.data import Preprocess, load_image, mask_size_for, preprocess_image, preprocess_mask, read_dataset
from cachedseg.errors import CachedsegError

PP = Preprocess(image_size=112, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                interpolation="bicubic", mask_size=112)


def test_preprocess_image_resizes_and_normalises_with_the_configured_mean_and_std():
    mean_colour = tuple(round(m * 255) for m in PP.mean)
    x = preprocess_image(Image.new("RGB", (1280, 720), mean_colour), PP)
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    assert x.abs().max() < 0.01  # the mean colour maps to ~0
    white = preprocess_image(Image.new("RGB", (64, 48), (255, 255, 255)), PP)
    expected = torch.tensor([(1 - m) / s for m, s in zip(PP.mean, PP.std)])
    torch.testing.assert_close(white[:, 0, 0], expected)


def test_preprocess_image_accepts_grayscale_and_rgba():
    for mode in ("L", "RGBA"):
        assert preprocess_image(Image.new(mode, (50, 40)), PP).shape == (3, 112, 112)


def test_preprocess_mask_is_nearest_neighbour():
    labels = np.random.default_rng(0).integers(0, 12, (120, 160), dtype=np.uint8)
    labels[:5, :5] = 255
    m = preprocess_mask(Image.fromarray(labels), 64)
    assert m.shape == (64, 64) and m.dtype == torch.uint8
    assert set(m.unique().tolist()) <= set(np.unique(labels).tolist())  # no blended labels


def test_mask_size_is_input_rounded_down_to_16():
    assert mask_size_for(518) == 512 and mask_size_for(112) == 112 and mask_size_for(224) == 224


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    Image.new("RGB", (80, 40)).save(path, exif=exif)
    assert load_image(path).size == (40, 80)


def test_read_dataset_lists_trn_then_val(dataset):
    samples = read_dataset(dataset)
    trn = (dataset / "ImageSets" / "trn.txt").read_text().split()
    val = (dataset / "ImageSets" / "val.txt").read_text().split()
    assert [s.id for s in samples] == trn + val
    assert [s.split for s in samples] == ["trn"] * len(trn) + ["val"] * len(val)


def test_read_dataset_names_a_missing_file(dataset, tmp_path):
    import shutil
    copy = tmp_path / "d"
    shutil.copytree(dataset, copy)
    victim = (copy / "ImageSets" / "val.txt").read_text().split()[0]
    (copy / "JPEGImages" / f"{victim}.jpg").unlink()
    with pytest.raises(CachedsegError, match=f"{victim}.jpg is missing"):
        read_dataset(copy)
    (copy / "ImageSets" / "val.txt").write_text("\n")
    with pytest.raises(CachedsegError, match="lists no images"):
        read_dataset(copy)
    with pytest.raises(CachedsegError, match="nowhere"):
        read_dataset(tmp_path / "nowhere")


def test_a_mistyped_dataset_path_suggests_the_folder_that_exists(dataset):
    typo = dataset.with_name(dataset.name[:-1])  # synth -> synt
    with pytest.raises(CachedsegError) as err:
        read_dataset(typo)
    assert f"did you mean {dataset}?" in str(err.value) and "cachedseg synth" not in str(err.value)
