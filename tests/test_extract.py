"""`cachedseg extract`: the documented store layout, exact features, resume, and refusals."""

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

from cachedseg import checkpoint
from cachedseg.backbone import BackboneConfig, build_backbone
from cachedseg.data import preprocess_image, preprocess_mask
from cachedseg.dataset import AEROSCAPES, load_image, open_dataset
from cachedseg.store import FeatureStore, decode_ids
from tests.conftest import SMALL, assert_features_close, one_line_error, run_cli


def test_store_layout_reads_back_with_plain_zarr(dataset, store32):
    g = zarr.open_group(str(store32), mode="r")
    samples = open_dataset(dataset).samples()
    n = len(samples)
    attrs = dict(g.attrs)
    assert attrs["format"] == "cachedseg-features" and attrs["format_version"] == 2
    assert attrs["backbone"] == "vit_small_patch14_dinov2" and attrs["input_size"] == [112, 112]
    assert attrs["layers"] == 1 and attrs["views"] == ["identity"] and attrs["mask_size"] == [128, 128]
    assert attrs["dtype"] == "float32" and attrs["class_names"] == list(AEROSCAPES.names)
    assert attrs["class_colors"] == [list(c) for c in AEROSCAPES.colors] and attrs["ignore_index"] == 255
    assert attrs["mean"] == [0.485, 0.456, 0.406] and attrs["std"] == [0.229, 0.224, 0.225]
    assert attrs["dataset"] == str(dataset.resolve()) and attrs["package_version"]
    assert len(attrs["fingerprint"]) == 32
    assert g["features"].shape == (n, 1, 1, 384, 8, 8) and g["features"].chunks == (1, 1, 1, 384, 8, 8)
    assert g["features"].dtype == np.float32 and np.isnan(g["features"].fill_value)
    assert g["masks"].shape == (n, 128, 128) and g["masks"].dtype == np.uint8 and g["masks"].fill_value == 254
    assert decode_ids(g["ids"][:]) == [s.id for s in samples]
    assert [("trn", "val")[c] for c in g["split"][:]] == [s.split for s in samples]
    assert g["done"][:].tolist() == [1] * n
    assert g["sources"].shape == (n, 2, 4) and g["sources"].dtype == np.int64  # what each entry was computed from
    for name in ("features", "masks", "ids", "split", "done", "sources"):  # every array is checksummed
        assert any(type(c).__name__ == "Crc32cCodec" for c in g[name].compressors), name
        assert g[name].metadata.dimension_names[0] == "image", name


def test_the_store_round_trip_is_bit_exact_and_live_features_are_within_rounding(dataset, store32):
    cache = FeatureStore.open(store32)
    model = build_backbone(BackboneConfig("vit_small_patch14_dinov2", 112), "random")
    assert cache.spec.fingerprint == model.fingerprint
    data = open_dataset(dataset)
    samples = data.samples()
    x = torch.stack([preprocess_image(load_image(s.image), model.preprocess) for s in samples[:4]])  # [4, 3, S, S]
    batch = model(x).numpy()  # the first batch of the extraction (batch size 4): the same computation
    for i, sample in enumerate(samples[:4]):
        features, mask = cache.read(i)
        assert np.array_equal(features, batch[i])
        assert np.array_equal(mask, preprocess_mask(data.read_labels(sample.mask), (128, 128)).numpy())
        assert_features_close(features, model(x[i:i + 1].clone())[0])  # batch of one: equal up to rounding


def test_rerun_does_no_work(dataset, store32):
    before = {p: p.stat().st_mtime_ns for p in store32.rglob("*") if p.is_file()}
    run_cli("extract", dataset, "--store", store32, *SMALL, "--dtype", "float32", "--workers", "0")
    assert {p: p.stat().st_mtime_ns for p in store32.rglob("*") if p.is_file()} == before


def test_float16_store_is_half_the_size_and_close(dataset, store32, tmp_path):
    path = tmp_path / "s16.zarr"
    run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float16")
    f16 = zarr.open_group(str(path))["features"]
    f32 = zarr.open_group(str(store32))["features"]
    assert f16.dtype == np.float16
    assert f16.nbytes * 2 == f32.nbytes
    np.testing.assert_allclose(f16[:].astype(np.float32), f32[:], rtol=1e-3, atol=1e-3)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import zarr
    from cachedseg.backbone import BackboneConfig
    from cachedseg.extract import extract
    store, kill_at = sys.argv[2], int(sys.argv[3])
    def progress(done, total):
        # once kill_at images are flagged done, die at once: the writer thread may be inside the next image
        if done < kill_at:
            return
        deadline = time.monotonic() + 60
        while (zarr.open_group(store)["done"][:] == 1).sum() < kill_at and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)
    extract(sys.argv[1], store, BackboneConfig("vit_small_patch14_dinov2", 112), weights="random",
            dtype="float32", batch_size=2, workers=0, progress=progress)
""")


@pytest.mark.subprocess
@pytest.mark.parametrize("kill_at", [1, 4])
def test_killed_extraction_resumes_to_the_same_store(dataset, store32, tmp_path, kill_at):
    path = tmp_path / "killed.zarr"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(dataset), str(path), str(kill_at)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    done = zarr.open_group(str(path))["done"][:]
    assert kill_at <= done.sum() < len(done)  # really interrupted half way
    finished = {i: zarr.open_group(str(path))["features"][i] for i in np.flatnonzero(done == 1)}
    (path / "features" / "c.0.0.0.0.0.0.1234.partial").write_bytes(b"torn")
    run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float32")
    assert not list(path.rglob("*.partial"))
    a, b = zarr.open_group(str(path)), zarr.open_group(str(store32))
    for name in ("masks", "done", "ids", "split"):
        assert np.array_equal(a[name][:], b[name][:]), name
    for i, features in finished.items():  # resume leaves finished images alone, bit for bit
        assert np.array_equal(a["features"][i], features)
    # the rest were computed in other batches than the reference's: equal up to float32 rounding
    assert_features_close(a["features"][:], b["features"][:])


def test_mismatched_store_is_refused_until_overwrite(dataset, tmp_path):
    path = tmp_path / "s.zarr"
    run_cli("extract", dataset, "--store", path, *SMALL)
    result = run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float32", ok=False)
    one_line_error(result, path, "dtype", "'float16'", "'float32'", "--overwrite")  # the field, both values
    other = run_cli("extract", dataset, "--store", path, "--backbone", "vit_small_patch14_reg4_dinov2",
                    "--image-size", "112", "--weights", "random", ok=False)
    one_line_error(other, "backbone", "'vit_small_patch14_dinov2'", "--overwrite")
    assert zarr.open_group(str(path)).attrs["dtype"] == "float16"  # refused: the store is as it was
    run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float32", "--overwrite")
    assert zarr.open_group(str(path)).attrs["dtype"] == "float32"


def test_overwrite_never_deletes_something_that_is_not_a_store(dataset, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = run_cli("extract", dataset, "--store", precious, *SMALL, "--overwrite", ok=False)
    one_line_error(result, precious)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_dataset_errors_are_one_line_messages(dataset, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(dataset, copy)
    victim = (copy / "ImageSets" / "trn.txt").read_text().split()[0]
    (copy / "SegmentationClass" / f"{victim}.png").unlink()
    result = run_cli("extract", copy, "--store", tmp_path / "s.zarr", *SMALL, ok=False)
    one_line_error(result, f"{victim}.png")
    assert not (tmp_path / "s.zarr").exists()


def test_info_describes_a_store_and_a_run(store32, run32, tmp_path):
    # the figures info prints for a store are FeatureStore.describe()'s; the output names its values
    d = FeatureStore.open(store32).describe()
    assert (d["done"], d["pending"], d["skipped_bad"], d["trn"] + d["val"]) == (8, 0, 0, 8)
    assert (d["backbone"], d["dtype"], d["channels"], tuple(d["input_size"]), tuple(d["grid"])) == (
        "vit_small_patch14_dinov2", "float32", 384, (112, 112), (8, 8))
    out = run_cli("info", store32).output
    for value in (store32, d["backbone"], d["fingerprint"], d["dtype"], "112x112"):
        assert str(value) in out, value
    out = run_cli("info", run32).output
    best = max(json.loads((run32 / "metrics.json").read_text()), key=lambda r: r["val_miou"])
    ckpt = checkpoint.load_run(run32, "last")
    for value in (run32, ckpt.decoder_config.name, ckpt.spec.fingerprint, f"{best['val_miou']:.4f}", store32):
        assert str(value) in out, value


def test_info_names_what_it_found_instead(dataset, store32, tmp_path):
    typo = store32.with_name(store32.name.replace("small", "smal"))
    one_line_error(run_cli("info", typo, ok=False), typo, store32)  # "did you mean" the real store
    image = next((dataset / "JPEGImages").glob("*.jpg"))
    one_line_error(run_cli("info", image, ok=False), image)
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli("info", tmp_path / "empty", ok=False), tmp_path / "empty")


def test_a_store_url_is_never_written_to_a_local_folder(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # no credentials here: a clean error naming the URL, and nothing written locally (a Path would have made s3:/)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec would reuse a client made under another environment
    try:
        one_line_error(run_cli("extract", dataset, "--store", "s3://bucket/x.zarr", *SMALL, ok=False),
                       "s3://bucket/x.zarr")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert not list(tmp_path.iterdir())
