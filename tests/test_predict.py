"""Prediction on large frames (labels and pictures in bands, identical to the whole-frame ones) and predict's
refusal to take its own outputs for inputs."""

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image

from cachedseg.classes import ClassSet, spread_colors
from cachedseg.pictures import PICTURE_ROWS, colorize, legend_strip, picture_rows, present_classes, with_legend
from cachedseg.predict import _save_png_rows, _taps, labels_from_logits, resized_rows
from tests.conftest import PEAK_GROWTH, one_line_error, run_cli


def whole_frame(logits: torch.Tensor, size) -> torch.Tensor:
    """The reference: resize [1, K, Mh, Mw] to the whole frame, as predict did before bands."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]  # [K, H, W]


def logits_for(seed: int, k: int, mh: int, mw: int, coarse: bool) -> torch.Tensor:
    """Random logits [1, K, Mh, Mw]; `coarse` ones (a few values, tiny noise) make exact and near ties common."""
    g = torch.Generator().manual_seed(seed)
    if coarse:
        return (torch.randint(-3, 4, (1, k, mh, mw), generator=g).float() * 0.1
                + torch.randn(1, k, mh, mw, generator=g) * 1e-6)
    return torch.randn(1, k, mh, mw, generator=g) * 10


# Banded values against PyTorch's whole-frame resize: PyTorch's CPU kernels compute the two row taps in their own
# order and rounding (fused on AVX2/AVX-512, other formulas under ATEN_CPU_CAPABILITY=default), so the two differ by
# float32 rounding only. Measured over 400 random shapes (K 2-12, logits up to 40x40, frames up to 260x260): at
# most 1.8 units of float32 rounding of the largest logit on AVX2 and AVX-512 kernels, 23.5 on the default ones.
RESIZE_RTOL = 64 * float(torch.finfo(torch.float32).eps)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(2, 12), mh=st.integers(1, 40), mw=st.integers(1, 40),
       height=st.integers(1, 260), width=st.integers(1, 260), coarse=st.booleans(), band_bytes=st.sampled_from([1, 4096, 10**6]))
def test_banded_labels_are_the_whole_frame_ones_up_to_rounding_whatever_the_bands(seed, k, mh, mw, height, width,
                                                                                  coarse, band_bytes):
    logits = logits_for(seed, k, mh, mw, coarse)
    whole = whole_frame(logits, (height, width))
    labels = labels_from_logits(logits, (height, width), whole_bytes=0, band_bytes=band_bytes)
    assert labels.dtype == np.uint8 and labels.shape == (height, width)
    # the same labels whatever the band size: the bands are an implementation detail, never a source of change
    assert np.array_equal(labels, labels_from_logits(logits, (height, width), whole_bytes=0, band_bytes=2**30))
    taps = _taps(mh, height, logits.device)
    rows = resized_rows(logits[0], taps, width, 0, height)  # [K, H, W]: up- and downsampling, odd, non-square
    assert float((rows - whole).abs().max()) <= RESIZE_RTOL * float(logits.abs().max())
    # where the best class leads by more than the rounding, the label is the whole-frame one
    top = whole.topk(2, dim=0).values
    clear = (top[0] - top[1]) > 2 * RESIZE_RTOL * float(logits.abs().max())
    assert np.array_equal(labels[clear.numpy()], whole.argmax(0).to(torch.uint8).numpy()[clear.numpy()])
    agree = (labels == whole.argmax(0).to(torch.uint8).numpy()).mean()
    assert agree >= (0.99 if coarse else 0.9999)  # coarse logits are made of exact ties


def test_small_frames_still_resize_whole():
    logits = logits_for(1, 12, 37, 37, coarse=False)
    assert np.array_equal(labels_from_logits(logits, (120, 160)),
                          whole_frame(logits, (120, 160)).argmax(0).to(torch.uint8).numpy())


@pytest.mark.subprocess
def test_labels_of_a_large_frame_never_hold_its_logits(tmp_path):
    # A 3000x2000 frame with 12 classes: resizing it whole makes [12, 2000, 3000] float32, 288 MB (and int64 argmax,
    # 48 MB); in bands the labels (6 MB) and a few 8 MB bands. Measured in a fresh process (see PEAK_GROWTH).
    code = PEAK_GROWTH + textwrap.dedent("""
        import torch
        from cachedseg.predict import labels_from_logits
        logits = torch.randn(1, 12, 128, 128, generator=torch.Generator().manual_seed(0))
        mb, labels = grown(lambda: labels_from_logits(logits, (2000, 3000)))
        print(mb, tuple(labels.shape))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    grown, shape = proc.stdout.split(maxsplit=1)
    assert shape.strip() == "(2000, 3000)"
    assert int(grown) < 120, f"peak grew by {grown} MB"


def test_pictures_in_bands_are_the_whole_frame_pictures(tmp_path):
    rng = np.random.default_rng(0)
    height, width = PICTURE_ROWS + 45, 170  # two bands, the last one short
    labels = np.repeat(rng.integers(0, 5, (height // 5 + 1, width), dtype=np.uint8), 5, axis=0)[:height]
    labels[0, 0] = 255  # an ignored label draws black, and names no class
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    classes = ClassSet(("background", "person", "bike", "car", "drone"), spread_colors(5))
    strip = legend_strip(width, present_classes(labels), classes)
    for on, expected in ((None, with_legend(colorize(labels, classes), labels, classes)),
                         (image, with_legend(Image.blend(image, colorize(labels, classes), 0.5), labels, classes))):
        path = tmp_path / "p.png"
        _save_png_rows(picture_rows(labels, classes, strip, on), width, height + strip.height, path)
        written = Image.open(path)
        assert written.mode == "RGB" and written.info["Software"].startswith("cachedseg")
        assert np.array_equal(np.asarray(written), np.asarray(expected))


def test_predict_never_reads_its_own_outputs(dataset, run32, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for image in sorted((dataset / "JPEGImages").glob("*.jpg"))[:2]:
        shutil.copy(image, folder)
    run_cli("predict", folder, "--run", run32, "--out", folder, "--workers", "0", "--device", "cpu")
    first = sorted(p.name for p in folder.iterdir())
    assert len(first) == 2 + 3 * 2
    again = run_cli("predict", folder, "--run", run32, "--out", folder, "--workers", "0", "--device", "cpu")
    assert sorted(p.name for p in folder.iterdir()) == first  # no _label_label.png and the like
    outputs = [name for name in first if name.endswith(".png")]  # the 6 it wrote, left out as inputs
    assert len(outputs) == 6 and re.search(r"\b6\b", again.stdout.replace(str(folder), ""))  # their count
    assert any(name in again.stdout for name in outputs)  # and some of their names

    # Outputs written before the mark, with no image next to them: known by their three names.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for png in folder.glob("*_*.png"):
        Image.open(png).save(legacy / png.name)  # re-saved without cachedseg's text chunk
    assert "Software" not in Image.open(next(legacy.iterdir())).info
    one_line_error(run_cli("predict", legacy, "--run", run32, "--out", tmp_path / "p", ok=False), str(legacy))


def test_predict_returns_what_it_left_out(dataset, run32, tmp_path):
    from cachedseg.predict import predict

    image = next((dataset / "JPEGImages").glob("*.jpg"))
    written = predict([image], run32, tmp_path, device="cpu", workers=0)
    again = predict([tmp_path, image], run32, tmp_path / "again", device="cpu", workers=0)
    assert [p.image for p in again] == [image] and len(written) == 1
    assert sorted(again.left_out) == sorted([written[0].label, written[0].color, written[0].overlay])
