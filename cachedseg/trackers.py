"""Experiment trackers for `train --logger`: the run's configuration, each epoch's metrics and, at the end, its
checkpoint, in the tracker a user already has.

    tensorboard   event files in RUN/tensorboard (`tensorboard --logdir RUN`): scalars train_loss, val_miou,
                  val_pixel_acc, train_seconds, seconds per epoch; the configuration as text
    mlflow        a run in MLFLOW_TRACKING_URI (default: a file store in RUN/mlruns): params (the whole training
                  configuration and the features' spec), the same metrics per epoch (step = epoch), and best.pt,
                  last.pt, metrics.json and config.toml as artifacts; a resumed run continues its MLflow run

The numbers are those of metrics.json, epoch for epoch. Each tracker is an optional extra, imported only when asked
for; under torchrun only rank 0 logs.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from cachedseg.errors import CachedsegError
from cachedseg.runs import EpochMetrics, RunFolder

LOGGERS = ("tensorboard", "mlflow")
EXPERIMENT = "cachedseg"  # the MLflow experiment runs go to (MLFLOW_EXPERIMENT_NAME overrides it)


def check_loggers(loggers: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse an unknown tracker name, or one whose package is not installed, before training starts."""
    for name in loggers:
        if name not in LOGGERS:
            raise CachedsegError(f"--logger {name!r}: use {' or '.join(LOGGERS)} (repeat the option for both)")
        package = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[name]
        try:
            importlib.import_module(package)
        except ImportError:
            raise CachedsegError(f"--logger {name} needs {package}, which is not installed; "
                                 f"pip install 'cachedseg[{name}]'") from None
    return tuple(dict.fromkeys(loggers))


def _params(config, spec) -> dict[str, str]:
    """The training configuration and the features' spec, flat, as strings."""
    params = {f"train.{k}": v for k, v in asdict(config).items()}
    params.update({f"features.{k}": spec_value for k, spec_value in asdict(spec).items()
                   if k not in ("class_colors", "mean", "std")})
    return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in params.items()}


class TensorBoard:
    """Event files in RUN/tensorboard."""

    def __init__(self, run: Path, config, spec):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in _params(config, spec).items()))

    def epoch(self, row: EpochMetrics) -> None:
        for key, value in row.to_dict().items():
            if key != "epoch":
                self.writer.add_scalar(key, value, global_step=row.epoch)
        self.writer.flush()

    def finish(self, folder: RunFolder, failed: bool = False) -> None:
        self.writer.close()


class MLflow:
    """A run in MLflow's tracking store, through its client (heads trained in one pass each get their own run)."""

    def __init__(self, run: Path, config, spec, resume: bool):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        self.Metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # a local store beside the checkpoints; MLflow's file store asks for this opt-in now
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        known = run / "mlflow_run_id"
        run_id = known.read_text().strip() if resume and known.is_file() else None
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in _params(config, spec).items()])
        known.write_text(run_id)
        self.run_id = run_id

    def epoch(self, row: EpochMetrics) -> None:
        import time
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, row.epoch)
                                                    for k, v in row.to_dict().items() if k != "epoch"])

    def finish(self, folder: RunFolder, failed: bool = False) -> None:
        for path in (folder.best, folder.last, folder.metrics_json, folder.config):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def open_trackers(loggers: tuple[str, ...], run: Path, config, spec, resume: bool = False) -> list:
    """The trackers of one run (`train --logger`), each started with the run's configuration."""
    return [TensorBoard(run, config, spec) if name == "tensorboard" else MLflow(run, config, spec, resume)
            for name in loggers]
