"""The dataset reader and the one preprocessing function."""

import numpy as np
import pytest
import torch
from PIL import Image

from cachedseg.data import Preprocess, preprocess_image, preprocess_mask
from cachedseg.dataset import load_image, open_dataset
from cachedseg.decoders import mask_size_for
from cachedseg.errors import CachedsegError

PP = Preprocess(image_size=(112, 154), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                interpolation="bicubic", mask_size=(128, 176))


def test_preprocess_image_resizes_and_normalises_with_the_configured_mean_and_std():
    mean_colour = tuple(round(m * 255) for m in PP.mean)
    x = preprocess_image(Image.new("RGB", (1280, 720), mean_colour), PP)
    assert x.shape == (3, 112, 154) and x.dtype == torch.float32  # (height, width)
    assert x.abs().max() < 0.01  # the mean colour maps to ~0
    white = preprocess_image(Image.new("RGB", (64, 48), (255, 255, 255)), PP)
    expected = torch.tensor([(1 - m) / s for m, s in zip(PP.mean, PP.std)])
    torch.testing.assert_close(white[:, 0, 0], expected)


def test_preprocess_image_accepts_grayscale_and_rgba():
    for mode in ("L", "RGBA"):
        assert preprocess_image(Image.new(mode, (50, 40)), PP).shape == (3, 112, 154)


def test_preprocess_mask_is_nearest_neighbour():
    labels = np.random.default_rng(0).integers(0, 12, (120, 160), dtype=np.uint8)
    labels[:5, :5] = 255
    m = preprocess_mask(labels, (48, 64))
    assert m.shape == (48, 64) and m.dtype == torch.uint8
    assert set(m.unique().tolist()) <= set(np.unique(labels).tolist())  # no blended labels


def test_masks_have_16_pixels_per_token_the_decoders_output_grid():
    assert mask_size_for((37, 37)) == (592, 592) and mask_size_for((37, 66)) == (592, 1056)


def test_sizes_parse_as_width_x_height_and_short_side_keeps_the_aspect_ratio():
    from cachedseg.backbone import parse_size, size_for_short_side
    assert parse_size("518") == (518, 518) and parse_size("924x518") == (518, 924)
    assert size_for_short_side(518, 1280, 720, 14) == (518, 924)  # AeroScapes frames: a 37x66 token grid
    assert size_for_short_side(518, 720, 1280, 14) == (924, 518)
    assert size_for_short_side(512, 1280, 720, 16) == (512, 912)  # multiples of the patch size given
    for bad in ("", "x", "1x2x3", "abc"):
        with pytest.raises(CachedsegError, match="--image-size"):
            parse_size(bad)
    with pytest.raises(CachedsegError, match="--short-side"):
        size_for_short_side(500, 1280, 720, 14)


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    Image.new("RGB", (80, 40)).save(path, exif=exif)
    assert load_image(path).size == (40, 80)


def test_a_dataset_lists_trn_then_val(dataset):
    samples = open_dataset(dataset).samples()
    trn = (dataset / "ImageSets" / "trn.txt").read_text().split()
    val = (dataset / "ImageSets" / "val.txt").read_text().split()
    assert [s.id for s in samples] == trn + val
    assert [s.split for s in samples] == ["trn"] * len(trn) + ["val"] * len(val)


def test_a_dataset_names_a_missing_file(dataset, tmp_path):
    import shutil
    copy = tmp_path / "d"
    shutil.copytree(dataset, copy)
    victim = (copy / "ImageSets" / "val.txt").read_text().split()[0]
    (copy / "JPEGImages" / f"{victim}.jpg").unlink()
    with pytest.raises(CachedsegError, match=f"{victim}.jpg"):
        open_dataset(copy).samples()
    (copy / "ImageSets" / "val.txt").write_text("\n")
    with pytest.raises(CachedsegError, match="val.txt"):
        open_dataset(copy).samples()
    with pytest.raises(CachedsegError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")


def test_a_mistyped_dataset_path_suggests_the_folder_that_exists(dataset):
    typo = dataset.with_name(dataset.name[:-1])  # synth -> synt
    with pytest.raises(CachedsegError) as err:
        open_dataset(typo)
    message = str(err.value)
    assert str(typo) in message.replace(str(dataset), "") and str(dataset) in message  # the path given, the one meant
    assert "cachedseg synth" not in message  # not the advice to make a dataset: there is one
