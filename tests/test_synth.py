"""The procedural dataset: AeroScapes layout, determinism, label coverage and argument checks."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cachedseg.dataset import AEROSCAPES
from cachedseg.synth import render_scene, synthesize

SMALL = dict(count=8, width=160, height=120)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small generated dataset and the ids synthesize returned."""
    root = tmp_path_factory.mktemp("synth") / "a"
    calls = []
    ids = synthesize(root, seed=0, progress=calls.append, **SMALL)
    assert calls == [1] * SMALL["count"]
    return root, ids


def test_layout(small):
    root, ids = small
    assert len(ids) == len(set(ids)) == SMALL["count"]
    assert all(len(i) == 10 and i[6] == "_" and i.replace("_", "").isdigit() for i in ids)  # 000001_001
    splits = {}
    for name in ("trn", "val"):
        text = (root / "ImageSets" / f"{name}.txt").read_text()
        assert text.endswith("\n")
        splits[name] = text.splitlines()
        assert splits[name], f"{name} split is empty"
    assert not set(splits["trn"]) & set(splits["val"])
    assert sorted(splits["trn"] + splits["val"]) == sorted(ids)
    assert sorted(p.stem for p in (root / "JPEGImages").iterdir()) == sorted(ids)
    assert sorted(p.stem for p in (root / "SegmentationClass").iterdir()) == sorted(ids)
    # Frames of one sequence stay in one split.
    assert not {i.split("_")[0] for i in splits["trn"]} & {i.split("_")[0] for i in splits["val"]}
    for id_ in ids:
        with Image.open(root / "JPEGImages" / f"{id_}.jpg") as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (SMALL["width"], SMALL["height"]))
        with Image.open(root / "SegmentationClass" / f"{id_}.png") as mask:
            assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (SMALL["width"], SMALL["height"]))


def test_all_classes_occur(small):
    root, ids = small
    seen = np.zeros(256, bool)
    for id_ in ids:
        seen[np.unique(np.asarray(Image.open(root / "SegmentationClass" / f"{id_}.png")))] = True
    assert np.flatnonzero(seen).tolist() == list(range(len(AEROSCAPES)))


def test_deterministic(small, tmp_path):
    root, _ = small
    synthesize(tmp_path / "b", seed=0, **SMALL)
    assert _files(tmp_path / "b") == _files(root)
    synthesize(tmp_path / "c", seed=1, **SMALL)
    other = _files(tmp_path / "c")
    first = "JPEGImages/000001_001.jpg"
    assert other[first] != _files(root)[first]


def test_render_scene_matches_and_scales():
    for width, height in ((64, 64), (32, 48), (300, 90)):
        for oblique in (False, True):
            img, labels = render_scene(np.random.default_rng(3), width, height, oblique=oblique)
            assert img.mode == "RGB" and img.size == (width, height)
            assert labels.dtype == np.uint8 and labels.shape == (height, width)
            assert labels.max() < len(AEROSCAPES)
            assert (11 in labels) == oblique  # sky only in oblique views


@pytest.mark.parametrize("kwargs, message", [
    (dict(count=1), "count"),
    (dict(count=2.5), "count"),
    (dict(width=31), "width"),
    (dict(height=0), "height"),
    (dict(seed=-1), "seed"),
    (dict(val_fraction=0.0), "val_fraction"),
    (dict(val_fraction=1.0), "val_fraction"),
])
def test_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path / "x", **{**SMALL, **kwargs})
    assert not (tmp_path / "x").exists()  # nothing written before the arguments are checked


@pytest.mark.parametrize("count, val_fraction", [(2, 0.25), (3, 0.9), (5, 0.5), (24, 0.25), (41, 0.1)])
def test_splits_are_whole_sequences_and_non_empty(tmp_path, count, val_fraction, monkeypatch):
    # Rendering is not what this checks, so stub it with a tiny constant scene.
    monkeypatch.setattr("cachedseg.synth.render_scene",
                        lambda rng, w, h, oblique=None: (Image.new("RGB", (w, h)), np.zeros((h, w), np.uint8)))
    ids = synthesize(tmp_path, count=count, width=32, height=32, val_fraction=val_fraction)
    trn = (tmp_path / "ImageSets" / "trn.txt").read_text().split()
    val = (tmp_path / "ImageSets" / "val.txt").read_text().split()
    assert trn and val and sorted(trn + val) == sorted(ids)
    assert not {i.split("_")[0] for i in trn} & {i.split("_")[0] for i in val}
    if count >= 20:
        assert abs(len(val) / count - val_fraction) < 0.15
