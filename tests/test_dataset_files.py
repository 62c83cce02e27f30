"""Your own data: dataset files (layout, splits, classes, index or colour masks) through the whole pipeline."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cachedseg.dataset import open_dataset
from cachedseg.dataset_file import load_dataset_file
from cachedseg.synth import synthesize
from tests.conftest import one_line_error, run_cli

DOCS = Path(__file__).resolve().parent.parent / "docs" / "datasets"
TINY = ["--backbone", "vit_small_patch14_dinov2", "--image-size", "56", "--weights", "random", "--workers", "0"]

SIX_RGB = """
name = "six"
images = "flights/*/img/*.png"
masks = "{dir}/../lbl/{stem}.png"
mask_encoding = "rgb"
ignore_colors = [[255, 255, 255]]
[splits]
val_fraction = 0.3
seed = 1
[[classes]]
name = "ground"
color = [0, 0, 0]
[[classes]]
name = "building"
color = [128, 0, 0]
[[classes]]
name = "road"
color = [128, 64, 128]
[[classes]]
name = "tree"
color = [0, 128, 0]
[[classes]]
name = "car"
color = [192, 0, 192]
[[classes]]
name = "human"
color = [64, 64, 0]
"""


def write(folder: Path, text: str, count: int = 10) -> Path:
    """A generated dataset in the layout of the dataset file `text` (written as folder/dataset.toml)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.toml").write_text(text)
    synthesize(folder, count=count, width=64, height=48, seed=0, dataset_file=folder / "dataset.toml")
    return folder


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """Ten frames with six classes in colour masks, in subfolders, split 70/30 by hash."""
    return write(tmp_path_factory.mktemp("own") / "six", SIX_RGB)


@pytest.fixture(scope="module")
def six_run(six, tmp_path_factory):
    """A store and a one-epoch run of `six`."""
    work = tmp_path_factory.mktemp("six-run")
    run_cli("extract", six, "--store", work / "s.zarr", *TINY)
    run_cli("train", work / "s.zarr", "--run-dir", work / "run", "--epochs", "1", "--workers", "0")
    return work / "s.zarr", work / "run"


def test_ids_are_paths_below_the_globs_fixed_folder_and_masks_follow_the_template(six):
    data = open_dataset(six)
    samples = data.samples()
    assert len(samples) == 10 and {s.split for s in samples} == {"trn", "val"}
    first = samples[0]
    assert first.id.startswith("01/img/") and "/" in first.id  # flights/<id>.png: unique across subfolders
    assert first.image == six / "flights" / f"{first.id}.png"
    assert first.mask == six / "flights" / "01" / "lbl" / f"{Path(first.id).name}.png"


def test_colour_masks_decode_to_the_classes_and_ignore_colours_to_the_ignore_label(six):
    data = open_dataset(six)
    sample = data.samples()[0]
    rgb = np.array(Image.open(sample.mask).convert("RGB"))
    rgb[:2, :3] = (255, 255, 255)  # an ignore colour
    Image.fromarray(rgb).save(sample.mask)
    labels = data.read_labels(sample.mask)
    palette = np.array(data.classes.colors)
    assert labels[:2, :3].tolist() == [[255] * 3] * 2
    keep = labels != 255
    assert np.array_equal(palette[labels[keep]], rgb[keep])  # every other pixel: the class of its colour


def test_a_colour_that_is_no_class_is_named_with_its_file_and_pixel_count(six, tmp_path):
    copy = shutil.copytree(six, tmp_path / "copy")
    data = open_dataset(copy)
    mask = data.samples()[0].mask
    rgb = np.array(Image.open(mask).convert("RGB"))
    rgb[:3, :5] = (9, 9, 9)
    Image.fromarray(rgb).save(mask)
    result = run_cli("extract", copy, "--store", tmp_path / "s.zarr", *TINY, ok=False)
    one_line_error(result, mask.name, "[9, 9, 9]", "15")


def test_a_hash_split_keeps_every_image_where_it_was_when_images_are_added(tmp_path):
    folder = write(tmp_path / "grow", SIX_RGB, count=10)
    data = open_dataset(folder)
    before = {s.id: s.split for s in data.samples()}
    for k, sample in enumerate(data.samples() * 3):  # 30 more images, in a new subfolder
        new = f"99/img/extra{k}"
        for source, target in ((sample.image, data.image_path(new)), (sample.mask, data.mask_path(new))):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    after = {s.id: s.split for s in open_dataset(folder).samples()}
    assert len(after) == 40 and all(after[i] == split for i, split in before.items())
    assert 0.1 < sum(s == "val" for s in after.values()) / 40 < 0.5  # val_fraction 0.3


def test_a_remap_merges_and_drops_classes_before_anything_sees_them(tmp_path):
    text = ('images = "images/*.png"\nmasks = "masks/{stem}.png"\nremap = { "3" = 0, "4" = 255 }\n'
            '[splits]\ntrn = "trn.txt"\nval = "val.txt"\n'
            + "".join(f'[[classes]]\nname = "c{i}"\n' for i in range(3)))
    (tmp_path / "dataset.toml").write_text(text)
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.array([[0, 1, 2, 3, 4]], dtype=np.uint8)).save(tmp_path / "masks" / "a.png")
    data = open_dataset(tmp_path)
    assert data.read_labels(tmp_path / "masks" / "a.png").tolist() == [[0, 1, 2, 0, 255]]
    assert len(data.classes.colors) == 3  # colours spread when the file gives none


def test_the_class_set_travels_from_the_dataset_file_to_the_predict_legend(six, six_run, tmp_path):
    store, run = six_run
    data = open_dataset(six)
    image = data.samples()[0].image
    run_cli("predict", image, "--run", run, "--out", tmp_path)
    labels = np.asarray(Image.open(tmp_path / f"{image.stem}_label.png"))
    picture = np.asarray(Image.open(tmp_path / f"{image.stem}_color.png"))
    h = labels.shape[0]
    assert labels.max() < 6 and np.array_equal(picture[:h], data.classes.palette()[labels])
    legend = {tuple(c) for c in picture[h:].reshape(-1, 3).tolist()}
    assert all(data.classes.colors[c] in legend for c in np.unique(labels))
    run_cli("evaluate", run, "--json", tmp_path / "e.json")
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["class_names"] == list(data.classes.names) and len(result["confusion"]) == 6
    info = run_cli("info", store).output
    assert "human" in info


def test_live_training_on_the_dataset_file_equals_training_from_its_cache(six, six_run, tmp_path):
    store, run = six_run
    run_cli("train", "--dataset", six / "dataset.toml", "--run-dir", tmp_path / "live", "--epochs", "1", *TINY)
    cached = json.loads((run / "metrics.json").read_text())
    live = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert live[-1]["val_miou"] == pytest.approx(cached[-1]["val_miou"], abs=1e-3)


def test_a_store_and_a_dataset_of_other_classes_are_refused_with_the_difference_named(six, six_run, tmp_path):
    store, run = six_run
    copy = shutil.copytree(six, tmp_path / "renamed")
    toml = copy / "dataset.toml"
    toml.write_text(toml.read_text().replace('name = "human"', 'name = "person"'))
    one_line_error(run_cli("evaluate", run, "--data", copy, ok=False), "person")
    one_line_error(run_cli("extract", copy, "--store", store, *TINY, ok=False), "person")


@pytest.mark.parametrize("text, key", [
    ('images = "i/*.png"\nmasks = "m/{stem}.png"\n', "classes"),
    ('images = "i/*.png"\nmasks = "m/x.png"\n[[classes]]\nname = "a"\n', "masks"),
    ('images = "i/*.png"\nmasks = "m/{stem}.png"\nmask_encoding = "rgb"\n[[classes]]\nname = "a"\n', "color"),
    ('images = "i/*.png"\nmasks = "m/{stem}.png"\nfolders = 1\n[[classes]]\nname = "a"\n', "folders"),
    ('images = "i/*.png"\nmasks = "m/{stem}.png"\n[splits]\nval_fraction = 2\n[[classes]]\nname = "a"\n', "val_fraction"),
    ('images = "i/*.png"\nmasks = "m/{stem}.png"\nremap = { "1" = 7 }\n[[classes]]\nname = "a"\n', "remap"),
    ('images = "i/*.png"\nmasks = "m/{stem}.png"\n[splits]\nval_fraction = 0.2\nblock = 0\n[[classes]]\nname = "a"\n',
     "block"),
    ('images = "i/*.png"\nmasks = "m/{stem}.png"\n[splits]\ntrn = "a/*"\nval = "b/*"\nblock = 512\n[[classes]]\n'
     'name = "a"\n', "val_fraction"),
    ('images = "i/*.png"\nmasks = [\n', "TOML"),
])
def test_a_dataset_file_with_a_mistake_is_refused_naming_the_key(tmp_path, text, key):
    (tmp_path / "dataset.toml").write_text(text)
    one_line_error(run_cli("extract", "--dataset", tmp_path / "dataset.toml", *TINY, ok=False), "dataset.toml", key)


@pytest.mark.parametrize("name", sorted(p.stem for p in DOCS.glob("*.toml")))
def test_each_ready_description_runs_through_extract_train_and_predict(name, tmp_path):
    described = load_dataset_file(DOCS / f"{name}.toml")
    folder = tmp_path / name
    synthesize(folder, count=10, width=64, height=48, seed=0, dataset_file=DOCS / f"{name}.toml")
    assert open_dataset(folder).classes == described.classes
    run_cli("extract", folder, "--store", tmp_path / "s.zarr", *TINY)
    run_cli("train", tmp_path / "s.zarr", "--run-dir", tmp_path / "run", "--epochs", "1", "--workers", "0")
    image = open_dataset(folder).samples()[-1].image
    run_cli("predict", image, "--run", tmp_path / "run", "--out", tmp_path / "out")
    labels = np.asarray(Image.open(tmp_path / "out" / f"{image.stem}_label.png"))
    assert labels.shape == (48, 64) and labels.max() < len(described.classes)


def test_the_ready_descriptions_cover_the_datasets_users_download_most():
    assert {"uavid", "udd6", "semantic-drone", "aeroscapes-9"} <= {p.stem for p in DOCS.glob("*.toml")}
    assert len(load_dataset_file(DOCS / "uavid.toml").classes) == 8
    assert len(load_dataset_file(DOCS / "semantic-drone.toml").classes) == 23


def test_info_surveys_a_dataset_before_extraction_and_names_its_problems(six, tmp_path):
    copy = shutil.copytree(six, tmp_path / "survey")
    data = open_dataset(copy)
    samples = data.samples()
    samples[0].mask.unlink()  # a mask missing
    rgb = np.array(Image.open(samples[1].mask).convert("RGB"))
    rgb[0, 0] = (9, 9, 9)  # a colour that is no class
    Image.fromarray(rgb).save(samples[1].mask)
    run_cli("info", copy, "--json", tmp_path / "s.json")
    survey = json.loads((tmp_path / "s.json").read_text())
    assert survey["classes"] == list(data.classes.names)
    assert sum(survey["images"].values()) == 9 and list(survey["masks_missing"]) == [samples[0].id]
    assert survey["sizes"] == {"64x48": 9}
    assert len(survey["problems"]) == 1 and samples[1].mask.name in survey["problems"][0]
    labelled = {split: sum(counts) for split, counts in survey["class_pixels"].items()}
    assert sum(labelled.values()) + sum(survey["ignored_pixels"].values()) == 64 * 48 * 8  # the 8 readable masks
    assert sum(survey["trn_shares"].values()) == pytest.approx(1.0)
    run_cli("info", "--dataset", copy / "dataset.toml")  # the same through --dataset


def test_jpeg_png_tiff_and_webp_images_mix_in_one_dataset(tmp_path):
    from cachedseg.dataset import load_image

    (tmp_path / "dataset.toml").write_text('images = "images/*"\nmasks = "masks/{stem}.png"\n[splits]\n'
                                           'trn = "trn.txt"\nval = "val.txt"\n[[classes]]\nname = "a"\n'
                                           '[[classes]]\nname = "b"\n')
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("a.jpg", "b.png", "c.tif", "d.webp"):
        Image.new("RGB", (8, 6), (10, 200, 30)).save(tmp_path / "images" / name)
        Image.fromarray(np.ones((6, 8), np.uint8)).save(tmp_path / "masks" / f"{Path(name).stem}.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "trn.txt").write_text("a\nb\nc\n")
    (tmp_path / "val.txt").write_text("d\n")
    data = open_dataset(tmp_path)
    samples = data.samples()
    assert [s.image.name for s in samples] == ["a.jpg", "b.png", "c.tif", "d.webp"]
    assert all(load_image(s.image).size == (8, 6) and data.read_labels(s.mask).max() == 1 for s in samples)
