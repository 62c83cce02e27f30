"""The run folder's owner: metrics rows as files, the best epoch, and the light import the CLI relies on."""

import csv
import json
import subprocess
import sys
from pathlib import Path
from dataclasses import asdict, replace

import pytest

from cachedseg.runs import EpochMetrics, RunFolder, SweepRow, best_row, is_best
from cachedseg.train import TrainConfig

ROWS = [EpochMetrics(1, 2.5, 0.25, 0.5, 1.25, 1.5), EpochMetrics(2, 2.0, 0.5, 0.75, 1.0, 1.75),
        EpochMetrics(3, 1.5, 0.5, 0.8, 1.0, 2.0)]
KEYS = ["epoch", "train_loss", "val_miou", "val_pixel_acc", "train_seconds", "seconds"]


def test_metrics_files_hold_every_row_under_the_documented_keys(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_metrics(ROWS)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert [list(r) for r in written] == [KEYS] * 3 and written[1] == dict(zip(KEYS, [2, 2.0, 0.5, 0.75, 1.0, 1.75]))
    with open(tmp_path / "metrics.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == KEYS and table[3] == ["3", "1.5", "0.5", "0.8", "1.0", "2.0"]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert folder.read_metrics() == ROWS


def test_a_row_reads_back_from_its_dict_and_a_short_one_is_refused():
    assert EpochMetrics.from_dict({**ROWS[0].to_dict(), "later_field": 1}) == ROWS[0]
    with pytest.raises(KeyError, match="seconds"):
        EpochMetrics.from_dict({k: v for k, v in ROWS[0].to_dict().items() if k != "seconds"})


def test_the_best_row_is_the_first_of_equals_and_best_pt_follows_the_latest():
    assert best_row(ROWS).epoch == 2
    assert is_best(ROWS[:2]) and is_best(ROWS)  # epoch 3 equals epoch 2: best.pt is rewritten
    assert not is_best(ROWS[:2] + [replace(ROWS[2], val_miou=0.4)])


def test_a_folder_names_its_files_and_knows_a_sweep(tmp_path):
    folder = RunFolder(tmp_path)
    assert (folder.last.name, folder.best.name, folder.checkpoint("last"), folder.report.name) == \
        ("last.pt", "best.pt", tmp_path / "last.pt", "report.html")
    assert not folder.has_checkpoint() and folder.read_sweep_summary() is None
    rows = [SweepRow.of(tmp_path / "conv-l0-lr0.001-s0", TrainConfig(lr=1e-3, data_seed=0), ROWS),
            SweepRow.of(tmp_path / "linear-l0-lr0.0001-s0", TrainConfig(decoder="linear", data_seed=0), ROWS[:1])]
    folder.write_sweep_summary(rows)
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert written["best"] == "conv-l0-lr0.001-s0" and written["runs"][0] == {
        "name": "conv-l0-lr0.001-s0", "run": str(tmp_path / "conv-l0-lr0.001-s0"),
        "config": asdict(TrainConfig(lr=1e-3, data_seed=0)), "best_val_miou": 0.5, "best_epoch": 2,
        "best_val_pixel_acc": 0.75, "final_train_loss": 1.5}
    assert [list(r) for r in written["runs"]] == [list(written["runs"][0])] * 2
    assert folder.read_sweep_summary() == rows
    (tmp_path / "last.pt").touch()
    assert folder.has_checkpoint()


def test_a_sweep_row_from_an_older_or_newer_config_reads_back():
    row = SweepRow.of(Path("s/a"), TrainConfig(seed=3), ROWS).to_dict()
    row["config"] = {k: v for k, v in row["config"].items() if k != "workers"} | {"later_option": 1}
    assert SweepRow.from_dict(row).config == TrainConfig(seed=3)


def test_the_run_folder_module_loads_without_torch_or_matplotlib():
    code = "import sys, cachedseg.runs, cachedseg.paths; print(sorted({'torch', 'matplotlib'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_a_run_without_a_folder_goes_under_runs_named_by_its_features(tmp_path):
    from cachedseg.runs import RUNS, default_run
    assert default_run("cache/small.zarr", None, "conv") == RUNS / "small-conv"
    assert default_run("s3://bucket/x/small.zarr", None, "sweep") == RUNS / "small-sweep"  # a URL's last part
    (tmp_path / "frames").mkdir()
    assert default_run(None, tmp_path / "frames" / ".", "linear") == RUNS / "frames-live-linear"  # the folder's name
