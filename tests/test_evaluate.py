"""Scoring at native resolution: what the JSON says about the score, and the labels it scores against."""

import json

from tests.conftest import run_cli


def test_evaluate_json_names_the_classes_its_miou_averages(store32, run32, tmp_path):
    run_cli("evaluate", run32, "--store", store32, "--json", tmp_path / "e.json")
    result = json.loads((tmp_path / "e.json").read_text())
    occurring = [name for name, iou in result["iou"].items() if iou is not None]
    assert result["averaged"] == occurring and occurring
    assert result["miou"] == sum(result["iou"][name] for name in occurring) / len(occurring)


def test_evaluate_and_report_load_each_checkpoint_once(store32, run32, tmp_path, monkeypatch):
    from cachedseg import checkpoint

    loaded, real = [], checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda path: loaded.append(path.name) or real(path))
    run_cli("evaluate", run32)  # the store it was trained on, as best.pt records it
    assert loaded == ["best.pt"]
    loaded.clear()
    run_cli("evaluate", run32, "--store", store32)
    assert loaded == ["best.pt"]
    loaded.clear()
    run_cli("report", run32, "--out", tmp_path / "run.html")
    assert sorted(loaded) == ["best.pt", "last.pt"]
