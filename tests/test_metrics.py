"""Dataset-level metrics from one confusion matrix."""

import pytest
import torch

from cachedseg.classes import IGNORE_INDEX
from cachedseg.metrics import confusion, scores


def test_confusion_counts_true_rows_against_predicted_columns_and_skips_ignored_pixels():
    target = torch.tensor([[0, 0, 1], [2, IGNORE_INDEX, 1]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 0]])
    conf = confusion(pred, target, 3)
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
    a = confusion(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 0]), 2)
    b = confusion(torch.tensor([0]), torch.tensor([1]), 2)
    dataset = scores(a + b)
    assert dataset["pixel_acc"] == pytest.approx(4 / 5)
    assert dataset["pixel_acc"] != pytest.approx((scores(a)["pixel_acc"] + scores(b)["pixel_acc"]) / 2)


def test_an_empty_confusion_scores_zero():
    assert scores(torch.zeros(3, 3, dtype=torch.long)) == {"miou": 0.0, "pixel_acc": 0.0, "iou": [None] * 3}
