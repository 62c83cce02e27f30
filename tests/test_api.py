"""The Python API and the ONNX bundle: `cachedseg.load` predicts what `cachedseg predict` writes, from a path, a PIL
image or an array; the library functions take typed configs and return results; an exported ONNX graph, run by
onnxruntime in a process without cachedseg or torch, labels the val images as predict does, and names its classes."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import cachedseg
from cachedseg.errors import CachedsegError
from tests.conftest import MIN_AGREEMENT, one_line_error, run_cli

CPU = ["--device", "cpu", "--workers", "0"]


def val_images(dataset):
    """The val frames of the generated dataset."""
    return [dataset / "JPEGImages" / f"{i}.jpg" for i in (dataset / "ImageSets" / "val.txt").read_text().split()]


def test_load_predicts_the_label_pngs_of_the_cli(run32, dataset, tmp_path):
    images = val_images(dataset)
    run_cli("predict", *images, "--run-dir", run32, "--out", tmp_path, "--batch-size", "1", *CPU)
    model = cachedseg.load(run32, device="cpu")
    assert model.classes.names[0] == "background" and len(model.classes.colors) == len(model.classes)
    for path in images:
        png = np.array(Image.open(tmp_path / f"{path.stem}_label.png"))
        labels = model.predict(path)
        assert labels.dtype == np.uint8 and np.array_equal(labels, png)  # the same computation: bit for bit
        image = Image.open(path)
        assert np.array_equal(model.predict(image), png) and np.array_equal(model.predict(np.asarray(image)), png)
        scores = model.logits(path)
        assert scores.shape == (len(model.classes), *png.shape) and scores.dtype == np.float32
        assert (scores.argmax(0) == png).mean() >= MIN_AGREEMENT
    with pytest.raises(CachedsegError, match="H x W x 3 uint8"):
        model.predict(np.zeros((4, 4), np.float32))


def test_the_library_functions_take_configs_and_return_results(dataset, tmp_path):
    from cachedseg.evaluate import evaluate
    from cachedseg.extract import extract
    from cachedseg.train import train
    result = extract(dataset, tmp_path / "s.zarr", cachedseg.BackboneConfig("vit_small_patch14_dinov2", (112, 112)),
                     weights="random", workers=0)
    assert result.extracted == result.images == 8
    rows = train(tmp_path / "s.zarr", tmp_path / "run", cachedseg.TrainConfig(epochs=1))
    assert len(rows) == 1 and 0 <= rows[0].val_miou <= 1
    scores = evaluate(tmp_path / "run", device="cpu")
    assert scores.images == 2 and scores.confusion.shape == (12, 12)


def test_a_map_goes_through_the_same_object(tmp_path):
    from cachedseg.synth_maps import synth_map_dataset
    data = tmp_path / "maps"
    synth_map_dataset(data, count=2, width=260, height=200, seed=4)
    run_cli("extract", data, "--store", tmp_path / "m.zarr", "--backbone", "vit_small_patch14_dinov2", "--tile", "112",
            "--weights", "random", "--workers", "0")
    run_cli("train", tmp_path / "m.zarr", "--run-dir", tmp_path / "run", "--epochs", "1", *CPU)
    model = cachedseg.load(tmp_path / "run", device="cpu")
    ortho = data / "maps" / "map_11.tif"
    live = model.predict_map(ortho, tmp_path / "live")
    cached = model.predict_map(ortho, tmp_path / "cached", store=tmp_path / "m.zarr")
    rasterio = pytest.importorskip("rasterio")
    with rasterio.open(live.label) as a, rasterio.open(cached.label) as b:
        assert (a.read(1) == b.read(1)).mean() >= MIN_AGREEMENT
        inside = a.read(1) != 255
        whole = model.predict(np.asarray(Image.open(ortho).convert("RGB")))  # the windows' labels, held whole
        assert (whole[inside] == a.read(1)[inside]).mean() >= MIN_AGREEMENT


# Run in a fresh interpreter with nothing of cachedseg's or torch's: what a consumer of the file has.
STANDALONE = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime as ort
    from PIL import Image
    model, out = sys.argv[1], sys.argv[2]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    mean, std = np.array(json.loads(meta["standardization_mean"])), np.array(json.loads(meta["standardization_std"]))
    size = int(meta["tiles_size"])
    labels = []
    for path in sys.argv[3:]:
        image = Image.open(path).convert("RGB")
        x = (np.asarray(image.resize((size, size), Image.BICUBIC), np.float32) / 255 - mean) / std
        probs = session.run(None, {session.get_inputs()[0].name: x.transpose(2, 0, 1)[None].astype(np.float32)})[0]
        labels.append(probs[0].argmax(0).tolist())
    json.dump({"labels": labels, "classes": json.loads(meta["class_names"]), "model_type": meta["model_type"],
               "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cachedseg"))}, open(out, "w"))
""")


@pytest.mark.subprocess
def test_an_exported_model_labels_as_predict_does_without_cachedseg_or_torch(dataset, tmp_path):
    pytest.importorskip("onnxruntime")
    # frames of the model's input size: the graph's output is then the very probabilities predict takes the argmax of
    frames = tmp_path / "frames"
    synth = tmp_path / "synth"
    from cachedseg.synth import synthesize
    synthesize(synth, count=6, width=112, height=112, seed=2)
    store, run = tmp_path / "s.zarr", tmp_path / "run"
    run_cli("extract", synth, "--store", store, "--backbone", "vit_small_patch14_dinov2", "--image-size", "112",
            "--weights", "random", "--workers", "0")
    run_cli("train", store, "--run-dir", run, "--epochs", "1", *CPU)
    images = val_images(synth)
    result = run_cli("export", run, "--out", tmp_path / "model.onnx")
    assert "labels agree on 1.000000" in result.output or "labels agree on 0.9999" in result.output
    run_cli("predict", *images, "--run-dir", run, "--out", frames, *CPU)
    proc = subprocess.run([sys.executable, "-c", STANDALONE, str(tmp_path / "model.onnx"), str(tmp_path / "o.json"),
                           *map(str, images)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "o.json").read_text())
    assert got["modules"] == [] and got["model_type"] == "Segmentor"
    assert list(got["classes"].values())[:2] == ["background", "person"]
    agree = [np.mean(np.array(labels) == np.array(Image.open(frames / f"{path.stem}_label.png")))
             for labels, path in zip(got["labels"], images)]
    assert min(agree) >= MIN_AGREEMENT, agree
    # and cachedseg predict --model gives the labels of the run
    run_cli("predict", *images, "--model", tmp_path / "model.onnx", "--out", tmp_path / "onnx", *CPU)
    for path in images:
        assert (np.array(Image.open(tmp_path / "onnx" / f"{path.stem}_label.png")) ==
                np.array(Image.open(frames / f"{path.stem}_label.png"))).mean() >= MIN_AGREEMENT


def test_export_and_model_errors_are_one_line(run32, tmp_path):
    pytest.importorskip("onnxruntime")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    one_line_error(run_cli("predict", image, "--model", tmp_path / "junk.onnx", "--out", tmp_path / "o", ok=False),
                   "junk.onnx")
    one_line_error(run_cli("predict", image, "--model", tmp_path / "junk.onnx", "--run-dir", run32, "--out",
                           tmp_path / "o", ok=False), "--model")
    one_line_error(run_cli("export", tmp_path / "nowhere", ok=False), "nowhere")


def test_the_onnxruntime_precision_gives_the_float32_features_once_exported(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import torch

    from cachedseg.backbone import BackboneConfig, build_backbone
    from tests.conftest import assert_features_close
    monkeypatch.setenv("CACHEDSEG_ONNX_CACHE", str(tmp_path))
    torch_backbone = build_backbone(BackboneConfig("vit_small_patch14_dinov2", (112, 112)), "random")
    ort_backbone = build_backbone(BackboneConfig("vit_small_patch14_dinov2", (112, 112), "onnxruntime"), "random")
    (graph,) = tmp_path.glob("*.onnx")
    x = torch.randn(3, 3, 112, 112)
    assert_features_close(ort_backbone(x).numpy(), torch_backbone(x).numpy())
    assert ort_backbone.fingerprint != torch_backbone.fingerprint  # stores of the two never mix
    stamp = graph.stat().st_mtime_ns
    build_backbone(BackboneConfig("vit_small_patch14_dinov2", (112, 112), "onnxruntime"), "random")
    assert graph.stat().st_mtime_ns == stamp  # exported once, reused
