"""Dataset-level metrics from one confusion matrix."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

IGNORE_INDEX = 255  # AeroScapes' (cachedseg.dataset.AEROSCAPES.ignore_index)
from cachedseg.metrics import confusion, scores
from tests.conftest import PEAK_GROWTH


def test_confusion_counts_true_rows_against_predicted_columns_and_skips_ignored_pixels():
    target = torch.tensor([[0, 0, 1], [2, IGNORE_INDEX, 1]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 0]])
    conf = confusion(pred, target, 3, 255)
    assert conf.tolist() == [[1, 1, 0],
                             [1, 1, 0],
                             [0, 0, 1]]
    assert conf.sum() == 5  # the ignored pixel is not counted, whatever was predicted there


def test_scores_average_iou_over_classes_that_occur_and_leave_the_rest_undefined():
    conf = torch.tensor([[3, 1, 0, 0],
                         [0, 2, 0, 0],
                         [0, 2, 0, 0],
                         [0, 0, 0, 0]])  # class 3 neither labelled nor predicted
    s = scores(conf)
    assert s["iou"][0] == pytest.approx(3 / 4) and s["iou"][1] == pytest.approx(2 / 5) and s["iou"][2] == 0.0
    assert s["iou"][3] is None
    assert s["miou"] == pytest.approx((3 / 4 + 2 / 5 + 0) / 3)
    assert s["pixel_acc"] == pytest.approx(5 / 8)


def test_summing_confusions_is_the_dataset_level_score_not_a_mean_of_batches():
    a = confusion(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 0]), 2, 255)
    b = confusion(torch.tensor([0]), torch.tensor([1]), 2, 255)
    dataset = scores(a + b)
    assert dataset["pixel_acc"] == pytest.approx(4 / 5)
    assert dataset["pixel_acc"] != pytest.approx((scores(a)["pixel_acc"] + scores(b)["pixel_acc"]) / 2)


def test_an_empty_confusion_scores_zero():
    assert scores(torch.zeros(3, 3, dtype=torch.long)) == {"miou": 0.0, "pixel_acc": 0.0, "iou": [None] * 3,
                                                           "averaged": []}


def test_miou_averages_exactly_the_classes_in_the_labels_or_the_predictions_and_says_which():
    target = torch.tensor([0, 0, 1, 1, IGNORE_INDEX])
    pred = torch.tensor([0, 3, 1, 1, 2])  # 3 is predicted but never labelled; 2 only where the label is ignored
    s = scores(confusion(pred, target, 5, 255))
    assert s["averaged"] == [0, 1, 3]  # 2 (ignored pixel only) and 4 (nowhere) are not averaged
    assert s["iou"][3] == 0.0 and s["iou"][2] is None and s["iou"][4] is None
    assert s["miou"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_confusion_refuses_values_outside_the_class_set():
    # target * K + pred would count a prediction of class K in the next row's first cell
    with pytest.raises(ValueError):
        confusion(torch.tensor([0, 3]), torch.tensor([0, 1]), 3, 255)
    with pytest.raises(ValueError):
        confusion(torch.tensor([0, 1]), torch.tensor([0, 7]), 3, 255)


def test_confusion_counts_in_chunks_what_it_counts_at_once(monkeypatch):
    import cachedseg.metrics as metrics

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (37, 41), generator=g, dtype=torch.uint8)
    target[::7] = IGNORE_INDEX
    pred = torch.randint(0, 6, (37, 41), generator=g, dtype=torch.uint8)
    keep = target != IGNORE_INDEX
    expected = torch.bincount(target[keep].long() * 6 + pred[keep].long(), minlength=36).reshape(6, 6)
    monkeypatch.setattr(metrics, "CHUNK", 100)
    assert torch.equal(confusion(pred, target, 6, 255), expected)


@pytest.mark.subprocess
def test_confusion_of_a_native_resolution_frame_needs_no_int64_copies_of_it():
    # A 4000x3000 label map and prediction (uint8, 12 MB each): every int64 copy of one is 96 MB.
    code = PEAK_GROWTH + textwrap.dedent("""
        import torch
        from cachedseg.metrics import confusion
        target = torch.randint(0, 12, (3000, 4000), dtype=torch.uint8)
        pred = torch.randint(0, 12, (3000, 4000), dtype=torch.uint8)
        mb, conf = grown(lambda: confusion(pred, target, 12, 255))
        print(mb, int(conf.sum()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    grown, total = map(int, proc.stdout.split())
    assert total == 3000 * 4000
    assert grown < 250, f"peak grew by {grown} MB"  # in chunks: 60-130 MB; through int64 copies: 470 MB
