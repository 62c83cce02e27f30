"""`cachedseg extract`: the documented store layout, exact features, resume, and refusals."""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from cachedseg.backbone import BackboneConfig, build_backbone
from cachedseg.classes import CLASS_NAMES
from cachedseg.data import load_image, load_mask, preprocess_image, preprocess_mask, read_dataset
from tests.conftest import SMALL, run_cli


def test_store_layout_reads_back_with_plain_zarr(dataset, store32):
    g = zarr.open_group(str(store32), mode="r")
    samples = read_dataset(dataset)
    n = len(samples)
    attrs = dict(g.attrs)
    assert attrs["format"] == "cachedseg-features" and attrs["format_version"] == 1
    assert attrs["backbone"] == "vit_small_patch14_dinov2" and attrs["image_size"] == 112
    assert attrs["dtype"] == "float32" and attrs["class_names"] == list(CLASS_NAMES)
    assert attrs["mean"] == [0.485, 0.456, 0.406] and attrs["std"] == [0.229, 0.224, 0.225]
    assert attrs["dataset"] == str(dataset.resolve()) and attrs["package_version"]
    assert len(attrs["fingerprint"]) == 32
    assert g["features"].shape == (n, 384, 8, 8) and g["features"].chunks == (1, 384, 8, 8)
    assert g["features"].dtype == np.float32
    assert any(type(c).__name__ == "Crc32cCodec" for c in g["features"].compressors)
    assert g["masks"].shape == (n, 112, 112) and g["masks"].dtype == np.uint8
    assert g["ids"][:].tolist() == [s.id for s in samples]
    assert g["split"][:].tolist() == [s.split for s in samples]
    assert g["done"][:].tolist() == [1] * n


def test_cached_features_equal_the_live_backbone_bit_for_bit(dataset, store32):
    g = zarr.open_group(str(store32), mode="r")
    model = build_backbone(BackboneConfig("vit_small_patch14_dinov2", 112), "random")
    assert g.attrs["fingerprint"] == model.fingerprint
    for i, sample in enumerate(read_dataset(dataset)[:3]):
        live = model(preprocess_image(load_image(sample.image), model.preprocess)[None])[0]
        assert np.array_equal(g["features"][i], live.numpy())
        assert np.array_equal(g["masks"][i], preprocess_mask(load_mask(sample.mask), 112).numpy())


def test_rerun_does_no_work(dataset, store32):
    before = {p: p.stat().st_mtime_ns for p in store32.rglob("*") if p.is_file()}
    result = run_cli("extract", dataset, "--store", store32, *SMALL, "--dtype", "float32", "--workers", "0")
    assert "0 extracted" in result.output
    assert {p: p.stat().st_mtime_ns for p in store32.rglob("*") if p.is_file()} == before


def test_float16_store_is_half_the_size_and_close(dataset, store32, tmp_path):
    path = tmp_path / "s16.zarr"
    run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float16")
    f16 = zarr.open_group(str(path))["features"]
    f32 = zarr.open_group(str(store32))["features"]
    assert f16.dtype == np.float16
    np.testing.assert_allclose(f16[:].astype(np.float32), f32[:], rtol=1e-3, atol=1e-3)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from cachedseg.backbone import BackboneConfig
    from cachedseg.extract import extract
    kill_at = int(sys.argv[3])
    def progress(done, total):
        if done >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-flight: the writer thread may be inside a batch
    extract(sys.argv[1], sys.argv[2], BackboneConfig("vit_small_patch14_dinov2", 112), weights="random",
            dtype="float32", batch_size=2, workers=0, progress=progress)
""")


@pytest.mark.parametrize("kill_at", [1, 4])
def test_killed_extraction_resumes_to_the_same_store(dataset, store32, tmp_path, kill_at):
    path = tmp_path / "killed.zarr"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(dataset), str(path), str(kill_at)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    done = zarr.open_group(str(path))["done"][:]
    assert 0 < done.sum() < len(done) or kill_at == 1  # really interrupted half way
    (path / "features" / "c" / "0").mkdir(parents=True, exist_ok=True)
    (path / "features" / "c" / "0" / "orphan.1234.partial").write_bytes(b"torn")
    result = run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float32")
    assert f"{len(done) - done.sum()} extracted" in result.output
    assert not list(path.rglob("*.partial"))
    a, b = zarr.open_group(str(path)), zarr.open_group(str(store32))
    for name in ("features", "masks", "done", "ids", "split"):
        assert np.array_equal(a[name][:], b[name][:]), name


def test_mismatched_store_is_refused_until_overwrite(dataset, tmp_path):
    path = tmp_path / "s.zarr"
    run_cli("extract", dataset, "--store", path, *SMALL)
    result = run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float32", ok=False)
    assert result.exit_code == 1
    assert "dtype: store has 'float16', asked for 'float32'" in result.output and "--overwrite" in result.output
    other = run_cli("extract", dataset, "--store", path, "--backbone", "vit_small_patch14_reg4_dinov2",
                    "--image-size", "112", "--weights", "random", ok=False)
    assert "backbone: store has 'vit_small_patch14_dinov2'" in other.output
    run_cli("extract", dataset, "--store", path, *SMALL, "--dtype", "float32", "--overwrite")
    assert zarr.open_group(str(path)).attrs["dtype"] == "float32"


def test_overwrite_never_deletes_something_that_is_not_a_store(dataset, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = run_cli("extract", dataset, "--store", precious, *SMALL, "--overwrite", ok=False)
    assert "not a cachedseg feature store" in result.output
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_dataset_errors_are_one_line_messages(dataset, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(dataset, copy)
    victim = (copy / "ImageSets" / "trn.txt").read_text().split()[0]
    (copy / "SegmentationClass" / f"{victim}.png").unlink()
    result = run_cli("extract", copy, "--store", tmp_path / "s.zarr", *SMALL, ok=False)
    assert result.exit_code == 1 and f"{victim}.png is missing" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s.zarr").exists()


def test_info_describes_a_store_and_a_run(store32, run32, tmp_path):
    out = run_cli("info", store32).output
    assert "vit_small_patch14_dinov2 @ 112 px" in out and "8 done, 0 pending, 0 skipped as bad" in out
    assert "[N, 384, 8, 8] float32" in out
    out = run_cli("info", run32).output
    assert "seed" in out and "epochs trained" in out and "mIoU" in out
    assert "no checkpoint" in run_cli("info", tmp_path / "nothing", ok=False).output
