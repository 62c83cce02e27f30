"""Class imbalance: `train --class-weights` (auto from the trn pixel shares, recorded in the run) and `--loss dice-ce`."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from cachedseg import checkpoint
from cachedseg.features import FeatureSource, cached_source
from cachedseg.losses import dice_loss, segmentation_loss
from cachedseg.recipe import MAX_WEIGHT, auto_class_weights
from cachedseg.spec import StoreSpec
from cachedseg.store import FeatureStore
from cachedseg.train import TrainConfig, train
from tests.conftest import SMALL, one_line_error, run_cli, torchrun

TRAIN1 = ["--epochs", "1", "--workers", "0", "--device", "cpu"]
IGNORE = 255


def _rule(pixels) -> list[float]:
    """The documented rule, written out again: s^-1/2 scaled to a trn-pixel mean of 1, clipped, absent -> 1."""
    shares = np.asarray(pixels, dtype=np.float64) / np.sum(pixels)
    norm = np.sqrt(shares).sum()
    return [float(np.clip(1 / (np.sqrt(s) * norm), 0.1, 10)) if s else 1.0 for s in shares]


def test_auto_weights_of_hand_made_masks_follow_the_rule(tmp_path):
    # 5 classes; two trn masks of 32x32 and one val mask, counts chosen by hand: 1600, 300, 99, 0 and 1 pixels, 48
    # ignored; the val image is all class 3, which must stay absent (trn only).
    spec = StoreSpec(backbone="b", fingerprint="f", input_size=(28, 28), mask_size=(32, 32), mean=(0, 0, 0),
                     std=(1, 1, 1), interpolation="bicubic", precision="float32", dtype="float32", channels=2,
                     grid=(2, 2), class_names=tuple("abcde"))
    labels = np.concatenate([np.full(1600, 0), np.full(300, 1), np.full(99, 2), np.full(1, 4), np.full(48, IGNORE)])
    masks = [labels[:1024], labels[1024:], np.full(1024, 3)]
    store = FeatureStore.create(tmp_path / "s.zarr", spec, ["t0", "t1", "v0"], ["trn", "trn", "val"], "data", "random")
    for i, mask in enumerate(masks):
        store.write(i, np.zeros((1, 1, 2, 2, 2), dtype=np.float32), mask.reshape(32, 32).astype(np.uint8))
    pixels = cached_source(tmp_path / "s.zarr").class_pixels("trn")
    assert pixels.tolist() == [1600, 300, 99, 0, 1]
    weights = auto_class_weights(pixels.tolist())
    assert weights == pytest.approx(_rule(pixels), rel=1e-3)
    assert weights == pytest.approx((0.7323, 1.691, 2.944, 1.0, MAX_WEIGHT), rel=1e-3)  # worked out by hand
    assert sum(w * n for w, n in zip(weights, pixels)) / pixels.sum() == pytest.approx(1, abs=0.01)  # mean ~1
    assert FeatureStore.open(tmp_path / "s.zarr").class_pixels([2]).tolist() == [0, 0, 0, 1024, 0]


def test_live_training_gets_the_weights_the_store_gives(dataset, store32, tmp_path):
    # the decoded trn masks, resized as training sees them, count what the store holds: cached and live runs of a
    # dataset train with the same weights
    expected = auto_class_weights(cached_source(store32).class_pixels("trn").tolist())
    run_cli("train", "--live", dataset, *SMALL, "--dtype", "float32", "--run-dir", tmp_path / "live",
            "--class-weights", "auto", "--decoder", "linear", *TRAIN1)
    assert checkpoint.load_run(tmp_path / "live", "last").train_config.class_weights == expected


def _loss_case():
    """One image of 1x3 pixels, 2 classes: probabilities (.5, .5), (.75, .25) and an ignored pixel."""
    logits = torch.tensor([[0.0, math.log(3), 7.0], [0.0, 0.0, -3.0]])[None, :, None, :]  # [1, 2, 1, 3]
    target = torch.tensor([[[0, 1, IGNORE]]])
    return logits.requires_grad_(), target


def test_the_losses_equal_the_numbers_worked_out_by_hand():
    logits, target = _loss_case()
    weight = torch.tensor([1.0, 3.0])
    ce = (-math.log(0.5) * 1 - math.log(0.25) * 3) / 2  # per labelled pixel, weighted
    # Dice: class 0: 2 * .5 / (.5 + .75 + 1); class 1: 2 * .25 / (.5 + .25 + 1); weighted mean of 1 - dice
    d0, d1 = 1 - 1 / 2.25, 1 - 0.5 / 1.75
    assert float(segmentation_loss(logits, target, IGNORE, "ce", weight).loss.detach()) == pytest.approx(ce, rel=1e-6)
    assert float(dice_loss(logits, target, IGNORE).detach()) == pytest.approx((d0 + d1) / 2, rel=1e-6)
    step = segmentation_loss(logits, target, IGNORE, "dice-ce", weight)
    assert float(step.loss.detach()) == pytest.approx(ce + (d0 + 3 * d1) / 4, rel=1e-6)
    assert float(step.total) == pytest.approx(float(step.loss.detach()) * 2, rel=1e-6) and int(step.pixels) == 2
    # unit weights are no weights; perfect predictions leave no Dice loss, so dice-ce is then ce
    plain = segmentation_loss(logits, target, IGNORE, "dice-ce")
    assert float(segmentation_loss(logits, target, IGNORE, "dice-ce", torch.ones(2)).loss.detach()) == pytest.approx(
        float(plain.loss.detach()), rel=1e-7)
    sure = torch.tensor([[50.0, -50.0, 0.0], [-50.0, 50.0, 0.0]])[None, :, None, :]
    assert float(segmentation_loss(sure, target, IGNORE, "dice-ce").loss.detach()) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("loss", ["ce", "dice-ce"])
@pytest.mark.parametrize("weighted", [False, True])
def test_ignored_pixels_count_for_nothing(loss, weighted):
    weight = torch.tensor([1.0, 3.0]) if weighted else None
    logits, target = _loss_case()
    step = segmentation_loss(logits, target, IGNORE, loss, weight)
    step.loss.backward()
    assert not logits.grad[..., 2].any() and logits.grad[..., :2].any()  # the ignored pixel gets no gradient
    moved = logits.detach().clone()
    moved[..., 2] = torch.tensor([[-9.0], [9.0]])  # whatever is predicted there
    assert float(segmentation_loss(moved, target, IGNORE, loss, weight).loss.detach()) == float(step.loss.detach())
    # a batch with every pixel ignored: a finite zero loss and zero gradients
    empty = torch.randn(2, 2, 4, 4, requires_grad=True)
    step = segmentation_loss(empty, torch.full((2, 4, 4), IGNORE), IGNORE, loss, weight)
    step.loss.backward()
    assert float(step.loss.detach()) == 0 and float(step.total) == 0 and int(step.pixels) == 0
    assert torch.isfinite(empty.grad).all() and not empty.grad.any()


def test_class_weights_none_is_bit_identical_to_omitting_it(store32, tmp_path):
    run_cli("train", store32, "--run-dir", tmp_path / "omitted", *TRAIN1)
    run_cli("train", store32, "--run-dir", tmp_path / "none", "--class-weights", "none", "--loss", "ce", *TRAIN1)
    a, b = (checkpoint.load_run(tmp_path / name, "last") for name in ("omitted", "none"))
    assert a.train_config == b.train_config and a.train_config.class_weights is None
    assert a.decoder_state.keys() == b.decoder_state.keys()
    assert all(torch.equal(a.decoder_state[k], b.decoder_state[k]) for k in a.decoder_state)


def test_auto_weights_are_recorded_shown_and_kept_by_resume(store32, tmp_path, monkeypatch):
    source = cached_source(store32)
    expected = auto_class_weights(source.class_pixels("trn").tolist())
    run, straight = tmp_path / "run", tmp_path / "straight"
    args = ["--class-weights", "auto", "--loss", "dice-ce", "--decoder", "linear", "--workers", "0",
            "--device", "cpu"]
    run_cli("train", store32, "--run-dir", run, "--epochs", "1", *args)
    ckpt = checkpoint.load_run(run, "last")
    assert ckpt.train_config.class_weights == expected and ckpt.train_config.loss == "dice-ce"
    assert len(expected) == len(source.spec.class_names) and len(set(expected)) > 1
    shown = run_cli("info", run).output
    assert "dice-ce" in shown and f"{expected[1]:g}" in shown
    # omitting the weights (or the loss) on --resume is refused, naming the option; the run is untouched
    before = (run / "last.pt").read_bytes()
    one_line_error(run_cli("train", store32, "--run-dir", run, "--epochs", "2", "--resume", "--decoder", "linear",
                           "--workers", "0", "--device", "cpu", "--loss", "dice-ce", ok=False), "--class-weights")
    assert (run / "last.pt").read_bytes() == before
    # resumed with auto: the recorded numbers (never counted again), and the very run trained straight through
    monkeypatch.setattr(FeatureSource, "class_pixels", lambda *a: pytest.fail("a resumed run counted pixels again"))
    train(source, run, TrainConfig(epochs=2, decoder="linear", workers=0, loss="dice-ce", class_weights="auto"),
          resume=True)
    monkeypatch.undo()
    run_cli("train", store32, "--run-dir", straight, "--epochs", "2", *args)
    a, b = checkpoint.load_run(run, "last"), checkpoint.load_run(straight, "last")
    assert a.epoch == b.epoch == 2 and a.train_config.class_weights == b.train_config.class_weights == expected
    assert all(torch.equal(a.decoder_state[k], b.decoder_state[k]) for k in a.decoder_state)
    assert [r.train_loss for r in a.metrics] == [r.train_loss for r in b.metrics]


def test_weights_change_training_and_unit_weights_do_not(store32, tmp_path):
    k = len(cached_source(store32).spec.class_names)
    for name, weights in (("plain", "none"), ("ones", ",".join(["1"] * k)), ("auto", "auto")):
        run_cli("train", store32, "--run-dir", tmp_path / name, "--class-weights", weights, "--decoder", "linear",
                *TRAIN1)
    plain, ones, auto = (checkpoint.load_run(tmp_path / n, "last") for n in ("plain", "ones", "auto"))
    assert ones.train_config.class_weights == (1.0,) * k
    for key in plain.decoder_state:
        assert torch.allclose(plain.decoder_state[key].float(), ones.decoder_state[key].float(), atol=1e-6), key
    assert any(not torch.allclose(plain.decoder_state[key].float(), auto.decoder_state[key].float(), atol=1e-6)
               for key in plain.decoder_state)


def test_a_sweep_trains_every_head_with_the_loss_and_records_the_weights(store32, tmp_path):
    run, alone = tmp_path / "sweep", tmp_path / "alone"
    recipe = ["--loss", "dice-ce", "--class-weights", "auto", "--epochs", "2", "--workers", "0", "--device", "cpu"]
    run_cli("train", store32, "--run-dir", run, "--decoder", "conv,linear", *recipe)
    expected = list(auto_class_weights(cached_source(store32).class_pixels("trn").tolist()))
    summary = json.loads((run / "sweep.json").read_text())
    assert [r["config"]["class_weights"] for r in summary["runs"]] == [expected, expected]
    assert {r["config"]["loss"] for r in summary["runs"]} == {"dice-ce"}
    # a head of the sweep ends exactly where the same config trained alone ends (the heads share the batches)
    run_cli("train", store32, "--run-dir", alone, "--decoder", "linear", "--data-seed", "0", *recipe)
    a, b = checkpoint.load_run(alone, "last"), checkpoint.load_run(run / "linear-l0-lr0.0001-s0", "last")
    assert [r.train_loss for r in a.metrics] == [r.train_loss for r in b.metrics]
    assert all(torch.equal(a.decoder_state[k], b.decoder_state[k]) for k in a.decoder_state)


@pytest.mark.parametrize("weights", ["1,2", "1,-1,1,1,1,1,1,1,1,1,1,1", "nan,1,1,1,1,1,1,1,1,1,1,1",
                                     "inf,1,1,1,1,1,1,1,1,1,1,1", "0,0,0,0,0,0,0,0,0,0,0,0", "heavy", "1,,2"])
def test_bad_class_weights_are_refused_in_one_line(store32, dataset, tmp_path, weights):
    one_line_error(run_cli("train", store32, "--run-dir", tmp_path / "r", "--class-weights", weights, *TRAIN1,
                           ok=False), "--class-weights")
    one_line_error(run_cli("train", "--live", dataset, "--run-dir", tmp_path / "r", "--class-weights", weights,
                           *TRAIN1, ok=False), "--class-weights")
    assert not (tmp_path / "r").exists()


def test_an_unknown_loss_is_refused_in_one_line(store32, tmp_path):
    one_line_error(run_cli("train", store32, "--run-dir", tmp_path / "r", "--loss", "focal", *TRAIN1, ok=False),
                   "--loss", "dice-ce")
    with pytest.raises(Exception, match="--loss"):
        train(cached_source(store32), tmp_path / "lib", replace(TrainConfig(epochs=1, workers=0), loss="focal"))


@pytest.mark.subprocess
def test_two_ranks_train_dice_ce_with_auto_weights_like_one_process(store32, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    recipe = ["--loss", "dice-ce", "--class-weights", "auto", "--decoder", "conv", "--batch-size", "2",
              "--epochs", "2", "--workers", "0", "--device", "cpu"]
    run_cli("train", store32, "--run-dir", one, *recipe)
    torchrun("train", store32, "--run-dir", two, *recipe)
    a, b = checkpoint.load_run(one, "last"), checkpoint.load_run(two, "last")
    assert a.train_config.class_weights == b.train_config.class_weights
    # the Dice sums and the pixel count span both ranks: each rank alone would give other losses and weights
    assert [r.train_loss for r in b.metrics] == pytest.approx([r.train_loss for r in a.metrics], rel=1e-5)
    diff = torch.cat([(a.decoder_state[k].float() - b.decoder_state[k].float()).abs().flatten()
                      for k in a.decoder_state if a.decoder_state[k].is_floating_point()])
    # the bounds of test_distributed's CE run (the same rounding, the same Adam steps): see there
    assert diff.max() <= 0.25 * 1e-4 * 6
    assert (diff > 1e-6).float().mean() <= 1e-2
