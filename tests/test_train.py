"""Stage two through the CLI: decoders, training runs, evaluation, prediction, and the identity guarantee."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cachedseg import checkpoint
from cachedseg.backbone import backbone_for
from cachedseg.dataset import load_image, load_mask
from cachedseg.decoders import DECODERS, build_decoder, decoder_config
from cachedseg.dataset import AEROSCAPES
from cachedseg.predict import labels_from_logits, segment
from cachedseg.spec import StoreSpec
from cachedseg.store import FeatureStore
from tests.conftest import MIN_AGREEMENT, SMALL, TRAIN, one_line_error, run_cli


@pytest.mark.parametrize("name", list(DECODERS))  # every registered decoder, as timm tests list_models()
@pytest.mark.parametrize("input_size,grid", [((112, 112), (8, 8)), ((518, 924), (37, 66))])
@pytest.mark.parametrize("layers", [1, 2])
def test_decoders_map_the_token_grid_to_logits_over_the_whole_frame(name, input_size, grid, layers):
    spec = StoreSpec(backbone="b", fingerprint="f", input_size=input_size, mask_size=(16 * grid[0], 16 * grid[1]),
                     mean=(0, 0, 0), std=(1, 1, 1), interpolation="bicubic", precision="float32", dtype="float16",
                     channels=8, grid=grid, class_names=tuple("abc"), layers=2)
    decoder = build_decoder(decoder_config(name, spec, layers))
    out = decoder(torch.randn(2, 2, 8, *grid))
    # the seed decoder crops to the input size rounded down to 16 (518 -> 512); the others cover the mask grid
    expected = tuple(s // 16 * 16 for s in input_size) if name == "seed" else spec.mask_size
    assert out.shape == (2, 3, *expected)


def test_the_upconv_output_sits_over_the_labels_and_the_seed_crop_does_not():
    # A token grid whose left half is class 1: the aligned decoder's 16x output puts the edge exactly at the
    # middle of the frame, like the masks (each token is one 16x16 output patch); the seed's crop shifts it.
    spec = StoreSpec(backbone="b", fingerprint="f", input_size=(518, 518), mask_size=(592, 592), mean=(0, 0, 0),
                     std=(1, 1, 1), interpolation="bicubic", precision="float32", dtype="float16", channels=2,
                     grid=(37, 37), class_names=("a", "b"))
    x = torch.zeros(1, 1, 2, 37, 37)
    x[..., :18] = 1.0
    for name, edge in (("upconv", 18 * 16), ("seed", 18 * 16 - (592 - 512) // 2)):
        decoder = build_decoder(decoder_config(name, spec))
        with torch.no_grad():
            for m in decoder.modules():  # an identity-like decoder: pass channel 0 through every block
                if isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.Conv2d)):
                    m.weight.zero_()
                    m.bias.zero_()
                    m.weight[0, 0] = 1.0
            out = decoder.eval()(x)
        assert out[0, 0, 0, edge - 1] > 0 and out[0, 0, 0, edge] == 0, name


def test_train_writes_a_complete_run_folder(run32):
    assert {"last.pt", "best.pt", "metrics.csv", "metrics.json", "curves.png"} <= {p.name for p in run32.iterdir()}
    rows = json.loads((run32 / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    with open(run32 / "metrics.csv", newline="") as f:  # the same rows as metrics.json, columns in this order
        table = list(csv.DictReader(f))
    assert list(table[0])[:4] == ["epoch", "train_loss", "val_miou", "val_pixel_acc"]
    assert [{k: float(v) for k, v in r.items()} for r in table] == [{k: float(v) for k, v in r.items()} for r in rows]
    assert Image.open(run32 / "curves.png").size[0] > 100
    ckpt = checkpoint.load_run(run32)  # no flags: everything comes from the checkpoint
    assert ckpt.spec.backbone == "vit_small_patch14_dinov2" and ckpt.spec.dtype == "float32"
    assert ckpt.decoder_config.name == "conv" and ckpt.decoder_config.in_channels == 384
    assert ckpt.train_config.lr == 1e-4 and ckpt.weights == "random"
    # best.pt: the epoch of the highest val_miou (the first on a tie); last.pt: the last; each has the rows up to it
    best = max(rows, key=lambda r: r["val_miou"])
    assert ckpt.epoch == best["epoch"] and [m.to_dict() for m in ckpt.metrics] == rows[:best["epoch"]]
    last = checkpoint.load_run(run32, "last")
    assert last.epoch == 2 and [m.to_dict() for m in last.metrics] == rows


def test_training_learns_something(store32, tmp_path):
    run = tmp_path / "lin"
    run_cli("train", store32, "--run", run, "--decoder", "linear", "--epochs", "6", "--lr", "1e-2", "--workers", "0")
    rows = json.loads((run / "metrics.json").read_text())
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_a_finished_run_is_not_overwritten_and_resume_continues_exactly(store32, run32, tmp_path):
    before = (run32 / "last.pt").read_bytes()
    one_line_error(run_cli("train", store32, "--run", run32, *TRAIN, ok=False), "--resume")
    assert (run32 / "last.pt").read_bytes() == before
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", store32, "--run", straight, "--epochs", "3", "--workers", "0")
    run_cli("train", store32, "--run", resumed, "--epochs", "2", "--workers", "0")
    run_cli("train", store32, "--run", resumed, "--epochs", "3", "--workers", "0", "--resume")
    a, b = checkpoint.load_run(straight, "last"), checkpoint.load_run(resumed, "last")
    assert a.epoch == b.epoch == 3
    for key in a.decoder_state:
        assert torch.equal(a.decoder_state[key], b.decoder_state[key]), key


def test_resume_with_nothing_to_resume_starts_from_scratch(store32, tmp_path):
    straight, empty, torn = tmp_path / "straight", tmp_path / "empty", tmp_path / "torn"
    run_cli("train", store32, "--run", straight, "--epochs", "1", "--workers", "0")
    run_cli("train", store32, "--run", empty, "--epochs", "1", "--workers", "0", "--resume")  # no folder yet
    torn.mkdir()
    (torn / "best.pt").write_bytes((straight / "best.pt").read_bytes())  # killed before last.pt (older versions)
    run_cli("train", store32, "--run", torn, "--epochs", "1", "--workers", "0", "--resume")
    a = checkpoint.load_run(straight, "last")
    for run in (empty, torn):
        b = checkpoint.load_run(run, "last")
        assert b.epoch == 1 and all(torch.equal(a.decoder_state[k], b.decoder_state[k]) for k in a.decoder_state)


def test_last_checkpoint_is_written_before_best(store32, tmp_path, monkeypatch):
    from cachedseg.features import cached_source
    from cachedseg.train import TrainConfig, train
    order = []
    save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda ckpt, path: (order.append(path.name), save(ckpt, path)))
    train(cached_source(store32), tmp_path / "r", TrainConfig(epochs=1, workers=0))
    assert order == ["last.pt", "best.pt"]


# Every registered decoder once, the store dtypes in turn (the dtype is the backbone's output, which every decoder
# reads alike): a new decoder adds one live run of about 15 s, not one for each dtype.
@pytest.mark.parametrize("decoder,dtype", [(name, ("float32", "float16")[i % 2]) for i, name in enumerate(DECODERS)])
def test_live_training_works_for_every_dtype_and_decoder(dataset, tmp_path, dtype, decoder):
    run = tmp_path / "live"
    run_cli("train", "--live", dataset, "--run", run, *SMALL, "--dtype", dtype, "--decoder", decoder,
            "--epochs", "1", "--workers", "0", "--device", "cpu")
    ckpt = checkpoint.load_run(run)
    assert ckpt.spec.dtype == dtype and ckpt.decoder_config.name == decoder and ckpt.epoch == 1


def _evaluate(*args, tmp_path, name):
    """Run `evaluate ... --json` and return the JSON."""
    run_cli("evaluate", *args, "--json", tmp_path / f"{name}.json")
    return json.loads((tmp_path / f"{name}.json").read_text())


def _assert_cached_and_live_agree(cached: dict, live: dict) -> None:
    """Cached and live scores: the agreement count meets the threshold, and confusions differ by no more."""
    agreement = cached["agreement"]
    assert agreement["pixels"] > 0 and agreement["ratio"] == 1 - agreement["differ"] / agreement["pixels"]
    assert agreement["differ"] <= (1 - MIN_AGREEMENT) * agreement["pixels"], agreement
    moved = np.abs(np.array(cached["confusion"]) - np.array(live["confusion"])).sum()
    assert moved <= 2 * agreement["differ"]  # a differing pixel moves at most one count out of a cell and into another


def test_evaluate_cached_and_live_agree_and_report_the_count(dataset, store32, run32, tmp_path):
    cached = _evaluate(run32, "--store", store32, "--compare-live", tmp_path=tmp_path, name="cached")
    live = _evaluate(run32, "--data", dataset, tmp_path=tmp_path, name="live")
    # scored at the labels' native resolution (160x120), not the 112x112 mask size; nothing ignored in synth labels
    assert cached["agreement"]["pixels"] == sum(map(sum, cached["confusion"])) == 2 * 160 * 120
    assert len(cached["confusion"]) == 12 and "agreement" not in live
    _assert_cached_and_live_agree(cached, live)


def _agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Fraction of pixels on which two lists of label maps agree."""
    return sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(x.size for x in a)


def _val_predictions(run, store, dataset, live: bool) -> list[np.ndarray]:
    """Native-resolution val predictions of a run, from the cache or live."""
    ckpt = checkpoint.load_run(run)
    decoder = ckpt.decoder()
    cache = FeatureStore.open(store)
    backbone = backbone_for(ckpt.spec, "random", "cpu")
    preds = []
    for i in [i for i, s in enumerate(cache.splits) if s == "val"]:
        size = np.asarray(load_mask(dataset / "SegmentationClass" / f"{cache.ids[i]}.png")).shape
        if live:
            preds.append(segment(load_image(dataset / "JPEGImages" / f"{cache.ids[i]}.jpg"), backbone, ckpt.spec,
                                 decoder, size))
        else:
            with torch.no_grad():
                logits = decoder(torch.from_numpy(cache.read(i)[0][None]).float())
            preds.append(labels_from_logits(logits, size))
    return preds


def test_float16_cache_and_live_predictions_agree(dataset, store16, tmp_path):
    run = tmp_path / "r16"
    run_cli("train", store16, "--run", run, *TRAIN)
    assert _agreement(_val_predictions(run, store16, dataset, live=False),
                      _val_predictions(run, store16, dataset, live=True)) >= MIN_AGREEMENT


def test_cached_and_live_training_give_the_same_decoder(dataset, store16, tmp_path):
    cached, live = tmp_path / "cached", tmp_path / "live"
    run_cli("train", store16, "--run", cached, *TRAIN)
    run_cli("train", "--live", dataset, "--run", live, *SMALL, "--dtype", "float16", *TRAIN)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (cached, live))
    assert [r["val_miou"] for r in a] == pytest.approx([r["val_miou"] for r in b], abs=1e-3)
    # Live features are computed in training batches, cached ones in extraction batches: float32 rounding apart,
    # then cast to float16 (where a rounding difference rarely flips a value). Losses agree to well within 1e-4.
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-4)
    assert _agreement(_val_predictions(cached, store16, dataset, live=True),
                      _val_predictions(live, store16, dataset, live=True)) >= 0.999


def test_predict_labels_score_exactly_like_evaluate_data(dataset, run32, tmp_path):
    # predict and evaluate --data run the very same computation (one image per forward pass): exact.
    live = _evaluate(run32, "--data", dataset, tmp_path=tmp_path, name="live")
    val_ids = (dataset / "ImageSets" / "val.txt").read_text().split()
    out = tmp_path / "pred"
    run_cli("predict", *[dataset / "JPEGImages" / f"{i}.jpg" for i in val_ids], "--run", run32, "--out", out)
    conf = np.zeros((len(AEROSCAPES), len(AEROSCAPES)), dtype=np.int64)
    for id_ in val_ids:
        pred = np.asarray(Image.open(out / f"{id_}_label.png"))
        truth = np.asarray(Image.open(dataset / "SegmentationClass" / f"{id_}.png"))
        assert pred.shape == truth.shape
        keep = truth != 255
        np.add.at(conf, (truth[keep], pred[keep]), 1)
        h, w = pred.shape
        color = np.asarray(Image.open(out / f"{id_}_color.png"))
        assert np.array_equal(color[:h], AEROSCAPES.palette()[pred]) and color.shape[0] > h  # the picture, then its legend
        overlay = Image.open(out / f"{id_}_overlay.png")
        assert overlay.width == w and overlay.height == color.shape[0]
    assert conf.tolist() == live["confusion"]


def test_the_legend_shows_the_colour_of_each_class_present(dataset, run32, tmp_path):
    image = next((dataset / "JPEGImages").glob("*.jpg"))
    run_cli("predict", image, "--run", run32, "--out", tmp_path)
    labels = np.asarray(Image.open(tmp_path / f"{image.stem}_label.png"))
    legend = np.asarray(Image.open(tmp_path / f"{image.stem}_color.png"))[labels.shape[0]:].reshape(-1, 3)
    colours = {tuple(c) for c in legend.tolist()}
    for c in np.unique(labels):
        assert AEROSCAPES.colors[c] in colours, c


def test_predict_takes_folders_and_refuses_another_backbone(dataset, run32, tmp_path):
    run_cli("predict", dataset / "JPEGImages", "--run", run32, "--out", tmp_path / "p")
    assert len(list((tmp_path / "p").glob("*_label.png"))) == len(list((dataset / "JPEGImages").glob("*.jpg")))
    other = tmp_path / "other.pth"
    model = backbone_for(checkpoint.load_run(run32).spec, "random", "cpu")
    torch.save({k: v + 1e-3 for k, v in model.model.state_dict().items()}, other)
    result = run_cli("predict", dataset / "JPEGImages", "--run", run32, "--weights", other, "--out", tmp_path / "q",
                     ok=False)
    one_line_error(result, "fingerprint")
    assert not (tmp_path / "q").exists() or not list((tmp_path / "q").iterdir())


def test_predict_never_overwrites_one_input_with_another(dataset, run32, tmp_path):
    image = next((dataset / "JPEGImages").glob("*.jpg"))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / image.name).write_bytes(image.read_bytes())
    result = run_cli("predict", tmp_path / "a" / image.name, tmp_path / "b" / image.name, "--run", run32,
                     "--out", tmp_path / "out", ok=False)
    one_line_error(result, tmp_path / "a" / image.name, tmp_path / "b" / image.name)
    assert not (tmp_path / "out").exists()


def test_stage_two_errors_are_clear(dataset, store32, run32, tmp_path):
    from dataclasses import replace

    from cachedseg import checkpoint
    (tmp_path / "moved").mkdir()  # a run whose store is gone: evaluate defaults to it, so it names it and --store
    checkpoint.save(replace(checkpoint.load(run32 / "best.pt"), source=str(tmp_path / "gone.zarr")),
                    tmp_path / "moved" / "best.pt")
    one_line_error(run_cli("evaluate", tmp_path / "moved", ok=False), tmp_path / "gone.zarr", "--store", "--data")
    one_line_error(run_cli("evaluate", tmp_path / "nothing", "--store", store32, ok=False), tmp_path / "nothing")
    one_line_error(run_cli("train", "--run", tmp_path / "r", ok=False), "STORE", "--live")
    one_line_error(run_cli("predict", tmp_path / "missing.jpg", "--run", run32, ok=False), tmp_path / "missing.jpg")
    one_line_error(run_cli("evaluate", run32, "--store", store32, "--split", "test", ok=False), "--split")


def test_a_mistyped_run_folder_is_named_with_what_was_meant(dataset, run32):
    typo = run32.with_name(run32.name[:-1])  # runs/conv32 -> runs/conv3
    out = one_line_error(run_cli("predict", dataset / "JPEGImages", "--run", typo, ok=False), typo, run32)
    assert f"--run {typo}" in out  # the command that would create it names the path the user gave


# PyTorch's own limit, not ours: with ATen's kernels forced below AVX-512 (`default`, `avx2`) on an AVX-512 CPU,
# bfloat16 autocast on the CPU fails inside oneDNN ("pack_vnni2 is only supported when avx512 is supported"; seen
# on the AVX-512/AMX Xeon).
@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") in ("default", "avx2"),
                    reason="bfloat16 CPU autocast fails in PyTorch with ATen kernels forced below AVX-512")
def test_backbone_precision_is_recorded_and_reused_live(dataset, tmp_path):
    store = tmp_path / "bf16.zarr"
    run_cli("extract", dataset, "--store", store, *SMALL, "--precision", "bfloat16", "--dtype", "float32")
    cache = FeatureStore.open(store)
    assert cache.spec.precision == "bfloat16"
    model = backbone_for(cache.spec, "random", "cpu")  # rebuilt at the recorded precision
    assert model.config.precision == "bfloat16" and model.fingerprint == cache.spec.fingerprint
    run = tmp_path / "run"
    run_cli("train", store, "--run", run, *TRAIN)
    cached = _evaluate(run, "--store", store, "--compare-live", tmp_path=tmp_path, name="cached")
    live = _evaluate(run, "--data", dataset, tmp_path=tmp_path, name="live")
    _assert_cached_and_live_agree(cached, live)


def test_evaluate_and_predict_decode_in_workers_with_the_same_results(dataset, store32, run32, tmp_path):
    a = _evaluate(run32, "--store", store32, "--workers", "2", "--batch-size", "3", tmp_path=tmp_path, name="w")
    b = _evaluate(run32, "--store", store32, tmp_path=tmp_path, name="nw")
    assert a == b  # batching only groups the decoder's work; each image's numbers are its own
    run_cli("predict", dataset / "JPEGImages", "--run", run32, "--out", tmp_path / "w", "--workers", "2")
    run_cli("predict", dataset / "JPEGImages", "--run", run32, "--out", tmp_path / "nw")
    for label in (tmp_path / "nw").glob("*_label.png"):
        assert np.array_equal(np.asarray(Image.open(label)), np.asarray(Image.open(tmp_path / "w" / label.name)))
