"""Stage two through the CLI: decoders, training runs, evaluation, prediction, and the identity guarantee."""

import json

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from cachedseg.data import load_image, load_mask
from cachedseg.decoders import DecoderConfig, build_decoder
from cachedseg.features import backbone_for
from cachedseg.predict import PALETTE, labels_from_logits, segment
from cachedseg.train import load_checkpoint
from tests.conftest import SMALL, TRAIN, run_cli



@pytest.mark.parametrize("name,grid,mask", [("seed", 8, 112), ("seed", 37, 512), ("linear", 37, 512)])
def test_decoders_map_the_token_grid_to_mask_size_logits(name, grid, mask):
    decoder = build_decoder(DecoderConfig(name, 48, 12, mask))
    assert decoder(torch.randn(2, 48, grid, grid)).shape == (2, 12, mask, mask)


def test_train_writes_a_complete_run_folder(run32):
    assert {"last.pt", "best.pt", "metrics.csv", "metrics.json", "curves.png"} <= {p.name for p in run32.iterdir()}
    rows = json.loads((run32 / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["val_miou"] <= 1 and 0 <= r["val_pixel_acc"] <= 1 and r["train_loss"] > 0 for r in rows)
    assert (run32 / "metrics.csv").read_text().splitlines()[0].startswith("epoch,train_loss,val_miou,val_pixel_acc")
    assert Image.open(run32 / "curves.png").size[0] > 100
    ckpt = load_checkpoint(run32)  # no flags: everything comes from the checkpoint
    assert ckpt.spec.backbone == "vit_small_patch14_dinov2" and ckpt.spec.dtype == "float32"
    assert ckpt.decoder_config.name == "seed" and ckpt.decoder_config.in_channels == 384
    assert ckpt.train_config.lr == 1e-4 and ckpt.weights == "random" and ckpt.epoch in (1, 2)


def test_training_learns_something(store32, tmp_path):
    run = tmp_path / "lin"
    run_cli("train", store32, "--run", run, "--decoder", "linear", "--epochs", "6", "--lr", "1e-2", "--workers", "0")
    rows = json.loads((run / "metrics.json").read_text())
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_a_finished_run_is_not_overwritten_and_resume_continues_exactly(store32, run32, tmp_path):
    result = run_cli("train", store32, "--run", run32, *TRAIN, ok=False)
    assert "--resume" in result.output
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", store32, "--run", straight, "--epochs", "3", "--workers", "0")
    run_cli("train", store32, "--run", resumed, "--epochs", "2", "--workers", "0")
    run_cli("train", store32, "--run", resumed, "--epochs", "3", "--workers", "0", "--resume")
    a, b = torch.load(straight / "last.pt", weights_only=True), torch.load(resumed / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["decoder"]:
        assert torch.equal(a["decoder"][key], b["decoder"][key]), key


def test_evaluate_store_and_data_give_identical_confusion_with_a_float32_cache(dataset, store32, run32, tmp_path):
    run_cli("evaluate", run32, "--store", store32, "--json", tmp_path / "cached.json")
    run_cli("evaluate", run32, "--data", dataset, "--json", tmp_path / "live.json")
    cached, live = (json.loads((tmp_path / f).read_text()) for f in ("cached.json", "live.json"))
    assert cached["confusion"] == live["confusion"]
    assert cached["miou"] == live["miou"] and len(cached["confusion"]) == 12
    # scored at the labels' native resolution (160x120), not the 112x112 mask size
    assert sum(map(sum, cached["confusion"])) == 2 * 160 * 120


def _agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Fraction of pixels on which two lists of label maps agree."""
    return sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(x.size for x in a)


def _val_predictions(run, store, dataset, live: bool) -> list[np.ndarray]:
    """Native-resolution val predictions of a run, from the cache or live."""
    ckpt = load_checkpoint(run)
    g = zarr.open_group(str(store))
    val = [i for i, s in enumerate(g["split"][:]) if s == "val"]
    ids = g["ids"][:]
    backbone = backbone_for(ckpt.spec, "random", "cpu")
    preds = []
    for i in val:
        size = np.asarray(load_mask(dataset / "SegmentationClass" / f"{ids[i]}.png")).shape
        if live:
            preds.append(segment(load_image(dataset / "JPEGImages" / f"{ids[i]}.jpg"), backbone, ckpt, size))
        else:
            with torch.no_grad():
                logits = ckpt.decoder(torch.from_numpy(g["features"][i][None]).float())
            preds.append(labels_from_logits(logits, size))
    return preds


def test_float16_cache_and_live_predictions_agree(dataset, store16, tmp_path):
    run = tmp_path / "r16"
    run_cli("train", store16, "--run", run, *TRAIN)
    assert _agreement(_val_predictions(run, store16, dataset, live=False),
                      _val_predictions(run, store16, dataset, live=True)) >= 0.9999


def test_cached_and_live_training_give_the_same_decoder(dataset, store16, tmp_path):
    cached, live = tmp_path / "cached", tmp_path / "live"
    run_cli("train", store16, "--run", cached, *TRAIN)
    run_cli("train", "--live", dataset, "--run", live, *SMALL, "--dtype", "float16", *TRAIN)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (cached, live))
    assert [r["val_miou"] for r in a] == pytest.approx([r["val_miou"] for r in b], abs=1e-3)
    # On one CPU the two paths feed the decoder the very same numbers, in the same layout: identical losses.
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert _agreement(_val_predictions(cached, store16, dataset, live=True),
                      _val_predictions(live, store16, dataset, live=True)) >= 0.999


def test_predict_labels_score_exactly_like_evaluate_data(dataset, run32, tmp_path):
    run_cli("evaluate", run32, "--data", dataset, "--json", tmp_path / "live.json")
    val_ids = (dataset / "ImageSets" / "val.txt").read_text().split()
    out = tmp_path / "pred"
    run_cli("predict", *[dataset / "JPEGImages" / f"{i}.jpg" for i in val_ids], "--run", run32, "--out", out)
    conf = np.zeros((12, 12), dtype=np.int64)
    for id_ in val_ids:
        pred = np.asarray(Image.open(out / f"{id_}_label.png"))
        truth = np.asarray(Image.open(dataset / "SegmentationClass" / f"{id_}.png"))
        assert pred.shape == truth.shape
        keep = truth != 255
        np.add.at(conf, (truth[keep], pred[keep]), 1)
        color = np.asarray(Image.open(out / f"{id_}_color.png"))
        assert np.array_equal(color, PALETTE[pred])
        assert Image.open(out / f"{id_}_overlay.png").size == Image.open(dataset / "JPEGImages" / f"{id_}.jpg").size
    assert conf.tolist() == json.loads((tmp_path / "live.json").read_text())["confusion"]


def test_predict_takes_folders_and_refuses_another_backbone(dataset, run32, tmp_path):
    result = run_cli("predict", dataset / "JPEGImages", "--run", run32, "--out", tmp_path / "p")
    assert len(list((tmp_path / "p").glob("*_label.png"))) == len(list((dataset / "JPEGImages").glob("*.jpg")))
    other = tmp_path / "other.pth"
    model = backbone_for(load_checkpoint(run32).spec, "random", "cpu")
    torch.save({k: v + 1e-3 for k, v in model.model.state_dict().items()}, other)
    result = run_cli("predict", dataset / "JPEGImages", "--run", run32, "--weights", other, "--out", tmp_path / "q",
                     ok=False)
    assert "fingerprint" in result.output and "Traceback" not in result.output


def test_stage_two_errors_are_clear(dataset, store32, tmp_path):
    assert "give --store STORE" in run_cli("evaluate", tmp_path / "nothing", ok=False).output
    result = run_cli("evaluate", tmp_path / "nothing", "--store", store32, ok=False)
    assert "no checkpoint" in result.output
    result = run_cli("train", "--run", tmp_path / "r", ok=False)
    assert "give either a STORE or --live DATA" in result.output
    result = run_cli("predict", tmp_path / "missing.jpg", "--run", tmp_path / "r", ok=False)
    assert "no such file" in result.output


def test_backbone_precision_is_recorded_and_reused_live(dataset, tmp_path):
    store = tmp_path / "bf16.zarr"
    run_cli("extract", dataset, "--store", store, *SMALL, "--precision", "bfloat16", "--dtype", "float32")
    g = zarr.open_group(str(store))
    assert g.attrs["precision"] == "bfloat16"
    model = backbone_for(load_checkpoint_spec(store), "random", "cpu")  # rebuilt at the recorded precision
    assert model.config.precision == "bfloat16" and model.fingerprint == g.attrs["fingerprint"]
    run = tmp_path / "run"
    run_cli("train", store, "--run", run, *TRAIN)
    run_cli("evaluate", run, "--store", store, "--json", tmp_path / "cached.json")
    run_cli("evaluate", run, "--data", dataset, "--json", tmp_path / "live.json")
    cached, live = (json.loads((tmp_path / f).read_text()) for f in ("cached.json", "live.json"))
    assert cached["confusion"] == live["confusion"]


def load_checkpoint_spec(store):
    """The feature spec recorded in a store."""
    from cachedseg.store import open_store
    return open_store(store)[1]
