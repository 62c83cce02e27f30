"""Trackers and config files: TensorBoard's and MLflow's own readers give back the numbers of metrics.json, epoch
for epoch; a run folder's config.toml trains the same weights again, the line's options winning over the file's;
bad names are one line."""

import json

import pytest
import torch

from tests.conftest import one_line_error, run_cli

CPU = ["--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def logged(store16, tmp_path_factory):
    """A 2-epoch run logged to TensorBoard and MLflow (MLflow's default local store in the run folder)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run = tmp_path_factory.mktemp("logged") / "run"
    run_cli("train", store16, "--run-dir", run, "--epochs", "2", "--logger", "tensorboard", "--logger", "mlflow", *CPU)
    return run


def test_tensorboard_reads_back_the_metrics_of_the_run(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    rows = json.loads((logged / "metrics.json").read_text())
    events = EventAccumulator(str(logged / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "val_miou", "val_pixel_acc"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [r["epoch"] for r in rows]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6)  # stored as float32


def test_mlflow_reads_back_the_params_metrics_and_checkpoint(logged):
    from mlflow.tracking import MlflowClient
    rows = json.loads((logged / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=(logged / "mlruns").resolve().as_uri())
    run_id = (logged / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "2"
    assert run.data.params["features.backbone"] == "vit_small_patch14_dinov2"
    for key in ("train_loss", "val_miou", "val_pixel_acc"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(r["epoch"], r[key]) for r in rows]
    assert {"best.pt", "last.pt", "metrics.json", "config.toml"} <= {a.path for a in client.list_artifacts(run_id)}


def test_a_run_rebuilt_from_its_config_file_ends_with_the_same_weights(logged, tmp_path):
    config = (logged / "config.toml").read_text()
    assert "store = " in config and "epochs = 2" in config and 'logger = "tensorboard,mlflow"' in config
    run_cli("train", "--config", logged / "config.toml", "--run-dir", tmp_path / "again", *CPU)
    a = torch.load(logged / "last.pt", weights_only=True)["decoder"]
    b = torch.load(tmp_path / "again" / "last.pt", weights_only=True)["decoder"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run_cli("train", "--config", logged / "config.toml", "--run-dir", tmp_path / "short", "--epochs", "1", *CPU)
    assert len(json.loads((tmp_path / "short" / "metrics.json").read_text())) == 1  # the line wins


def test_bad_config_files_and_loggers_are_one_line(store16, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = 2\nlearning_rate = 0.1\n")
    one_line_error(run_cli("train", store16, "--config", bad, ok=False), "learning_rate", "bad.toml")
    bad.write_text("epochs = [")
    one_line_error(run_cli("train", store16, "--config", bad, ok=False), "bad.toml")
    one_line_error(run_cli("train", store16, "--config", tmp_path / "none.toml", ok=False), "none.toml")
    one_line_error(run_cli("train", store16, "--run-dir", tmp_path / "r", "--logger", "wandb", ok=False), "wandb")
