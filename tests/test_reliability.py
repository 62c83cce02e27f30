"""Reliability: kills at any moment, concurrent writers, corrupt caches, and bad input at every entry point."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from cachedseg import checkpoint
from cachedseg.locks import writer_lock
from cachedseg.store import FeatureStore, decode_ids
from tests.conftest import (SMALL, TRAIN, assert_features_close, assert_same_store, chunk_file, one_line_error,
                            run_cli, written_chunks)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

EXTRACT_KILL = textwrap.dedent("""
    import os, signal, sys
    from cachedseg.backbone import BackboneConfig
    from cachedseg.extract import extract
    kill_at = int(sys.argv[3])
    def progress(done, total):
        if done >= kill_at:  # the writer thread may be anywhere inside the previous image's writes
            os.kill(os.getpid(), signal.SIGKILL)
    extract(sys.argv[1], sys.argv[2], BackboneConfig("vit_small_patch14_dinov2", 112), weights="random",
            dtype="float32", batch_size=1, workers=0, progress=progress)
""")


def copy_dataset(dataset, tmp_path):
    """A private copy of the generated dataset, to break."""
    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    return copy


def first_id(data, split="trn"):
    """The first image id of a split."""
    return (data / "ImageSets" / f"{split}.txt").read_text().split()[0]


@pytest.mark.subprocess
@pytest.mark.parametrize("kill_at", [2, 3, 5, 7])
def test_sigkill_at_any_image_then_rerun_equals_an_uninterrupted_store(dataset, store32_single, tmp_path, kill_at):
    path = tmp_path / "killed.zarr"
    proc = subprocess.run([sys.executable, "-c", EXTRACT_KILL, str(dataset), str(path), str(kill_at)], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    done = zarr.open_group(str(path))["done"][:]
    assert done.sum() < len(done)  # it really stopped half way
    # nothing is flagged done whose data is incomplete: every flagged image already holds its final numbers
    # (exactly: both stores computed every image alone, the same computation)
    ref = zarr.open_group(str(store32_single))
    for i in np.flatnonzero(done):
        assert np.array_equal(zarr.open_group(str(path))["features"][i], ref["features"][i])
    run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float32", "--batch-size", "1")
    assert_same_store(path, store32_single)


def test_a_second_writer_is_refused_with_the_holders_name(dataset, tmp_path):
    path = tmp_path / "s.zarr"
    with writer_lock(path, "test"):
        result = run_cli("extract", dataset, "--store", path, *SMALL, ok=False)
    one_line_error(result, f"pid {os.getpid()}")
    assert not path.exists()  # the refused writer wrote nothing
    run_cli("extract", dataset, "--store", path, *SMALL)  # the lock dies with its holder


TRAIN_KILL = textwrap.dedent("""
    import os, signal, sys
    from cachedseg.features import cached_source
    from cachedseg.train import TrainConfig, train
    def progress(done, total):
        if os.path.exists(os.path.join(sys.argv[2], "last.pt")) and done == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # in epoch 2, after epoch 1's checkpoint
    train(cached_source(sys.argv[1]), sys.argv[2], TrainConfig(epochs=3, workers=0), progress=progress)
""")


@pytest.mark.subprocess
def test_killed_training_keeps_a_loadable_checkpoint_and_resumes_exactly(store32, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = subprocess.run([sys.executable, "-c", TRAIN_KILL, str(store32), str(killed)], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert checkpoint.load_run(killed, "last").epoch == 1
    assert not list(killed.glob("*.tmp*"))
    run_cli("train", store32, "--run", killed, "--epochs", "3", "--workers", "0", "--resume")
    run_cli("train", store32, "--run", straight, "--epochs", "3", "--workers", "0")
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (killed, straight))
    assert all(torch.equal(a["decoder"][k], b["decoder"][k]) for k in a["decoder"])
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]


@pytest.mark.parametrize("split", ["trn", "val"])
def test_a_corrupt_cached_chunk_names_the_image_and_redo_repairs_it(dataset, store32, run32, tmp_path, split):
    path = tmp_path / "s.zarr"
    shutil.copytree(store32, path)
    g = zarr.open_group(str(path))
    victim = next(i for i, s in enumerate(g["split"][:]) if s == (split == "val"))  # split codes: 0 trn, 1 val
    chunk = chunk_file(path, "features", victim)
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    victim_id = decode_ids(g["ids"][:])[victim]
    redo = f"--redo {victim_id}"
    one_line_error(run_cli("train", path, "--run", tmp_path / "r", *TRAIN, ok=False), victim_id, redo)
    one_line_error(run_cli("train", path, "--run", tmp_path / "r2", *TRAIN, "--in-memory", ok=False), redo)
    one_line_error(run_cli("evaluate", run32, "--store", path, "--split", split, "--json", tmp_path / "e.json",
                           ok=False), victim_id, redo)
    assert not (tmp_path / "e.json").exists()
    other = {"trn": "val", "val": "trn"}[split]  # the other split never reads the victim: it scores as before
    run_cli("evaluate", run32, "--store", path, "--split", other, "--json", tmp_path / "other.json")
    run_cli("evaluate", run32, "--store", store32, "--split", other, "--json", tmp_path / "intact.json")
    assert json.loads((tmp_path / "other.json").read_text()) == json.loads((tmp_path / "intact.json").read_text())
    run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float32", "--redo", victim_id)
    # recomputed alone, where the reference computed it in a batch of 4: equal up to float32 rounding
    assert_features_close(zarr.open_group(str(path))["features"][victim], zarr.open_group(str(store32))["features"][victim])
    run_cli("train", path, "--run", tmp_path / "r3", *TRAIN)


@pytest.mark.parametrize("array", ["features", "masks"])
def test_a_deleted_chunk_is_an_error_naming_the_image_not_fill_values(dataset, store32, run32, tmp_path, array):
    path = tmp_path / "s.zarr"
    shutil.copytree(store32, path)
    g = zarr.open_group(str(path))
    val = [i for i, s in enumerate(g["split"][:]) if s == 1]
    victim_id = decode_ids(g["ids"][:])[val[0]]
    chunk_file(path, array, val[0]).unlink()
    redo = f"--redo {victim_id}"
    one_line_error(run_cli("evaluate", run32, "--store", path, ok=False), victim_id, redo)
    one_line_error(run_cli("train", path, "--run", tmp_path / "r", *TRAIN, ok=False), victim_id, redo)
    one_line_error(run_cli("train", path, "--run", tmp_path / "r2", *TRAIN, "--in-memory", ok=False), victim_id, redo)
    run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float32", "--redo", victim_id)
    assert_same_store(path, store32, close=["features"])


@pytest.mark.parametrize("array", ["ids", "split", "done"])
def test_a_flipped_byte_in_a_small_array_is_detected(dataset, store32, tmp_path, array):
    path = tmp_path / "s.zarr"
    shutil.copytree(store32, path)
    chunk = chunk_file(path, array, 0)
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x01  # e.g. a done flag 1 -> 0, an id character to its neighbour
    chunk.write_bytes(bytes(data))
    one_line_error(run_cli("train", path, "--run", tmp_path / "r", *TRAIN, ok=False), path, array)
    if array == "done":  # extract recomputes the images whose flag it cannot read
        run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float32")
        assert_same_store(path, store32, close=["features"])


def _break(kind, data):
    """Damage a dataset copy in one way; returns the file the error message must name."""
    id_ = first_id(data)
    image, mask = data / "JPEGImages" / f"{id_}.jpg", data / "SegmentationClass" / f"{id_}.png"
    if kind == "corrupt jpeg":
        image.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    elif kind == "truncated jpeg":
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    elif kind == "not an image":
        image.write_text("this is a text file\n")
    elif kind == "missing image":
        image.unlink()
    elif kind == "missing mask":
        mask.unlink()
    elif kind == "mask size":
        Image.open(mask).resize((50, 40)).save(mask)
    elif kind == "mask values":
        labels = np.array(Image.open(mask))
        labels[0, 0] = 40
        Image.fromarray(labels).save(mask)
    elif kind == "rgb mask":
        Image.open(mask).convert("RGB").save(mask)
    elif kind == "empty split":
        (data / "ImageSets" / "val.txt").write_text("")
        return data / "ImageSets" / "val.txt"
    elif kind == "no dataset":
        shutil.rmtree(data / "ImageSets")
        return data / "ImageSets" / "trn.txt"
    return mask if "mask" in kind else image


BAD = ["corrupt jpeg", "truncated jpeg", "not an image", "missing image", "missing mask", "mask size",
       "mask values", "rgb mask", "empty split", "no dataset"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_a_one_line_error_naming_the_file(dataset, tmp_path, kind):
    data = copy_dataset(dataset, tmp_path)
    culprit = _break(kind, data)
    result = run_cli("extract", data, "--store", tmp_path / "s.zarr", *SMALL, ok=False)
    assert result.exit_code == 1
    assert str(culprit) in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_skip_bad_records_the_image_and_carries_on(dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path)
    culprit = _break("corrupt jpeg", data)
    path = tmp_path / "s.zarr"
    result = run_cli("extract", data, "--store", path, *SMALL, "--skip-bad")
    victim = first_id(data)
    assert victim in result.output  # the summary names the image it skipped
    assert FeatureStore.open(path).describe()["skipped_bad"] == 1
    g = zarr.open_group(str(path))
    assert str(culprit) in g.attrs["bad"][victim]
    assert g["done"][:].tolist().count(2) == 1
    run_cli("train", path, "--run", tmp_path / "r", *TRAIN)
    assert len(json.loads((tmp_path / "r" / "metrics.json").read_text())) == 2


def test_awkward_images_are_handled_not_refused(dataset, tmp_path, run32):
    out = tmp_path / "in"
    out.mkdir()
    rgb = np.asarray(Image.open(next((dataset / "JPEGImages").glob("*.jpg"))))
    Image.fromarray(rgb).convert("L").save(out / "gray.jpg")
    Image.fromarray(rgb).convert("RGBA").save(out / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(out / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees
    Image.fromarray(rgb).save(out / "rotated.jpg", exif=exif)
    assert Image.open(out / "sixteen.png").mode.startswith("I")
    run_cli("predict", out, "--run", run32, "--out", tmp_path / "pred")
    h, w = rgb.shape[:2]
    assert Image.open(tmp_path / "pred" / "rotated_label.png").size == (h, w)
    assert Image.open(tmp_path / "pred" / "sixteen_label.png").size == (w, h)
    from cachedseg.dataset import load_image
    sixteen = np.asarray(load_image(out / "sixteen.png"))[..., 0].astype(int)
    assert np.abs(sixteen - rgb[..., 0]).max() <= 1  # rescaled to 8 bits, not clipped at 255


def test_an_oversized_image_is_refused_before_decoding(dataset, tmp_path, monkeypatch, run32):
    import cachedseg.dataset
    monkeypatch.setattr(cachedseg.dataset, "MAX_PIXELS", 1000)
    image = next((dataset / "JPEGImages").glob("*.jpg"))
    result = run_cli("predict", image, "--run", run32, "--out", tmp_path / "p", ok=False)
    one_line_error(result, image, "{}x{}".format(*Image.open(image).size))  # the image and its size
    assert not list((tmp_path / "p").glob("*.png"))


def test_stores_and_checkpoints_that_do_not_fit_are_refused(dataset, store32, run32, tmp_path):
    other = tmp_path / "o.zarr"
    shutil.copytree(store32, other)
    g = zarr.open_group(str(other), mode="r+")
    g.attrs["format_version"] = 99
    result = run_cli("train", other, "--run", tmp_path / "r", ok=False)
    one_line_error(result, "99", "--overwrite")
    s16 = tmp_path / "s16.zarr"
    run_cli("extract", dataset, "--store", s16, *SMALL, "--dtype", "float16")
    result = run_cli("evaluate", run32, "--store", s16, ok=False)
    one_line_error(result, "dtype", "'float16'", "'float32'", run32)  # the field, both values, the run
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "best.pt").write_bytes(b"not a checkpoint")
    result = run_cli("predict", next((dataset / "JPEGImages").glob("*.jpg")), "--run", broken, ok=False)
    one_line_error(result, broken / "best.pt")


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(store32, tmp_path):
    path, run = tmp_path / "s.zarr", tmp_path / "r"
    shutil.copytree(store32, path)
    run_cli("train", path, "--run", run, "--epochs", "1", "--workers", "0")
    good = (run / "last.pt").read_bytes()
    g = zarr.open_group(str(path), mode="r+")
    for i, split in enumerate(g["split"][:]):
        if split == 0:  # trn: features that make the loss non-finite
            g["features"][i] = np.full(g["features"].shape[1:], np.inf, dtype=np.float32)
    result = run_cli("train", path, "--run", run, "--epochs", "2", "--workers", "0", "--resume", ok=False)
    one_line_error(result, "nan", run)
    assert (run / "last.pt").read_bytes() == good


@pytest.mark.subprocess
def test_verbose_shows_the_traceback_wherever_it_is_placed(tmp_path):
    from cachedseg.errors import CachedsegError
    result = run_cli("--verbose", "extract", tmp_path / "nowhere", *SMALL, ok=False)
    assert isinstance(result.exception, CachedsegError) and str(tmp_path / "nowhere") in str(result.exception)
    proc = subprocess.run([sys.executable, "-m", "cachedseg.cli", "extract", str(tmp_path / "nowhere"), "--verbose"],
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "CachedsegError" in proc.stderr


CHECK_BEFORE_TORCH = textwrap.dedent("""
    import sys
    from cachedseg.cli import main
    sys.argv = ["cachedseg", *sys.argv[1:]]
    try:
        main()
    except SystemExit as exit:
        print(exit.code, "torch" in sys.modules)
""")


@pytest.mark.parametrize("args,culprit", [
    (["extract", "nowhere"], "nowhere"), (["train", "nowhere.zarr"], "nowhere.zarr"),
    (["train", "--live", "nowhere"], "nowhere"), (["evaluate", "nowhere", "--store", "x.zarr"], "nowhere"),
    (["predict", "x.jpg", "--run", "r"], "x.jpg"), (["info", "nowhere"], "nowhere"),
    (["train", "s3://bucket/x.zarr"], "s3://bucket/x.zarr"), (["info", "s3://bucket/x.zarr"], "s3://bucket/x.zarr")])
@pytest.mark.subprocess
def test_a_mistyped_path_is_answered_before_torch_loads(tmp_path, args, culprit):
    # no S3 credentials, and an endpoint that refuses at once: a bucket that cannot be reached is one clean line too
    env = {**{k: v for k, v in ENV.items() if not k.startswith("AWS_")}, "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    proc = subprocess.run([sys.executable, "-c", CHECK_BEFORE_TORCH, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.stdout.split() == ["1", "False"], proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and culprit in proc.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize("delay_ms", [0, 7, 23])
def test_external_sigkill_at_a_random_moment_then_rerun_equals_an_uninterrupted_store(dataset, store32_single,
                                                                                     tmp_path, delay_ms):
    import time
    path = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "cachedseg.cli", "extract", str(dataset), "--store", str(path), *SMALL,
           "--dtype", "float32", "--batch-size", "1", "--workers", "0"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and not written_chunks(path, "done") and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay_ms / 1000)
    proc.kill()
    assert proc.wait() == -9  # killed, not finished
    done = zarr.open_group(str(path))["done"][:]
    assert 0 < done.sum() < len(done)  # the kill came after the first image and before the end
    run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float32", "--batch-size", "1")
    assert_same_store(path, store32_single)  # every image computed alone in both: the same computation
