"""The run folder: the files `cachedseg train` (and `report`) write into it, and its metrics rows.

    runs/conv/                  a run folder
        last.pt                 the last finished epoch (decoder, optimizer, RNG: what --resume continues)
        best.pt                 the epoch with the best val mIoU (the latest of equals)
        metrics.csv             one EpochMetrics row per epoch
        metrics.json            the same rows, as a JSON list of objects
        curves.png              the training curves
        config.toml             the `train` options that reproduce the run (`train --config RUN/config.toml`)
        tensorboard/, mlruns/   with `train --logger`: TensorBoard event files; MLflow's local store (and
        mlflow_run_id           the MLflow run a --resume continues)
        report.html             `cachedseg report`'s page
    runs/sweep/                 a sweep folder
        sweep.json              the configs, best first (see `cachedseg.sweep`)
        conv-l1-lr0.0001-s0/    a run folder

A run goes into runs/<store>-<decoder> (or runs/<store>-sweep) unless a folder is named: see `default_run`.

Deliberately light (no torch; matplotlib only when curves are drawn): the CLI reads these names before torch loads.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cachedseg.recipe import TrainConfig

RUNS = Path("runs")  # where runs go unless --run names a folder
LAST, BEST = "last.pt", "best.pt"
CHECKPOINTS = (BEST, LAST)
METRICS_CSV, METRICS_JSON, CURVES = "metrics.csv", "metrics.json", "curves.png"
REPORT = "report.html"
SWEEP_SUMMARY = "sweep.json"
CONFIG = "config.toml"


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch of training, as metrics.json, metrics.csv and the checkpoints record it.

    Attributes:
        epoch: The epoch, from 1.
        train_loss: Mean loss over the epoch's labelled pixels (cross-entropy, weighted by the class weights if
            any; for dice-ce plus each step's Dice term: see `cachedseg.losses`).
        val_miou: Val mIoU at the decoder's output size.
        val_pixel_acc: Val pixel accuracy at the decoder's output size.
        train_seconds: Seconds of training (the epoch without its validation).
        seconds: Seconds of the whole epoch.
    """

    epoch: int
    train_loss: float
    val_miou: float
    val_pixel_acc: float
    train_seconds: float
    seconds: float

    def to_dict(self) -> dict:
        """The row as written to metrics.json and checkpoints (keys in this order)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> EpochMetrics:
        """A row as `to_dict` wrote it (keys it does not know are ignored).

        Raises:
            KeyError: For a row that lacks a field.
        """
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def best_row(rows: list[EpochMetrics]) -> EpochMetrics:
    """The row with the best val mIoU (the first of equals)."""
    return max(rows, key=lambda r: r.val_miou)


def is_best(rows: list[EpochMetrics]) -> bool:
    """Whether the last row is at least as good as every one before it: its checkpoint becomes best.pt."""
    return rows[-1].val_miou >= best_row(rows).val_miou


@dataclass(frozen=True)
class SweepRow:
    """One config of a sweep, as sweep.json lists it (best val mIoU first).

    Attributes:
        name: The sub-run's folder name (see `cachedseg.sweep.name`).
        run: The sub-run folder.
        config: Its recipe.
        best_val_miou: Its best row's val mIoU (see `best_row`).
        best_epoch: That row's epoch.
        best_val_pixel_acc: That row's val pixel accuracy.
        final_train_loss: The last epoch's training loss.
    """

    name: str
    run: str
    config: TrainConfig
    best_val_miou: float
    best_epoch: int
    best_val_pixel_acc: float
    final_train_loss: float

    @classmethod
    def of(cls, run: Path, config: TrainConfig, history: list[EpochMetrics]) -> SweepRow:
        """The row of the sub-run `run`, trained with `config`, from its metrics rows."""
        top = best_row(history)
        return cls(run.name, str(run), config, top.val_miou, top.epoch, top.val_pixel_acc, history[-1].train_loss)

    def to_dict(self) -> dict:
        """The row as sweep.json holds it (the config as a dict of its fields)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> SweepRow:
        """A row as `to_dict` wrote it (config fields this version does not know are left out, as checkpoints do).

        Raises:
            KeyError: For a row that lacks a field.
        """
        known = {f.name for f in fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in row["config"].items() if k in known})
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name != "config"}, config=config)


# config.toml keys that are not the parameter's name (`--compile` is `compile_` in the code; `--run-dir` is `run`)
_CONFIG_ALIASES = {"compile": "compile_", "run_dir": "run"}


def read_config(path: str | Path, params: dict) -> dict[str, object]:
    """The options of a `train --config` file: {parameter name: value}, each key checked against `params` (the
    command's parameters by name).

    Raises:
        CachedsegError: For a file that is missing or not TOML, or a key that is no option of `train`.
    """
    from cachedseg.errors import CachedsegError
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CachedsegError(f"--config {path}: no such file; give a TOML file (a run folder's config.toml)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, IsADirectoryError) as exc:
        raise CachedsegError(f"--config {path} is not a TOML file ({exc}); fix it") from None
    options = {}
    for key, value in raw.items():
        name = _CONFIG_ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if name not in params or name == "config":
            known = ", ".join(sorted(k.rstrip("_") for k in params if k != "config"))
            raise CachedsegError(f"--config {path}: {key!r} is not an option of this command; the options: {known}")
        options[name] = value.split(",") if name == "logger" and isinstance(value, str) else value
    return options


def default_run(store: str | Path | None, live: str | Path | None, name: str) -> Path:
    """Where a run goes when no folder is named: runs/<store>-<name> for a store's features, runs/<data>-live-<name>
    for live ones from a dataset folder; `name` is the decoder's, or `sweep`."""
    source = Path(store).name.removesuffix(".zarr") if store is not None else f"{Path(live).resolve().name}-live"
    return RUNS / f"{source}-{name}"


@dataclass(frozen=True)
class RunFolder:
    """A run folder's files (see the module docstring); it need not exist yet."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def checkpoint(self, which: str = "best") -> Path:
        """The checkpoint file `which` (`best` or `last`)."""
        return self.path / f"{which}.pt"

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def metrics_json(self) -> Path:
        return self.path / METRICS_JSON

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def sweep_summary(self) -> Path:
        return self.path / SWEEP_SUMMARY

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    def write_config(self, options: dict[str, object]) -> None:
        """config.toml: the `train` options (name -> value; None left out) that reproduce this run."""
        lines = ["# `cachedseg train --config THIS_FILE --run-dir OTHER` trains this run again: the same weights on the",
                 "# CPU (options given on the line win over these)."]
        for key, value in options.items():
            if value is None:
                continue
            text = ("true" if value else "false") if isinstance(value, bool) else \
                repr(value) if isinstance(value, (int, float)) else json.dumps(str(value))
            lines.append(f"{key} = {text}")
        self.path.mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def has_checkpoint(self) -> bool:
        """Whether the folder holds best.pt or last.pt (anything named so: loading refuses what is not a file)."""
        return any((self.path / name).exists() for name in CHECKPOINTS)

    def write_metrics(self, rows: list[EpochMetrics]) -> None:
        """metrics.csv, metrics.json and curves.png of `rows` (one per epoch so far)."""
        dicts = [r.to_dict() for r in rows]
        with open(self.path / METRICS_CSV, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dicts[0]))
            writer.writeheader()
            writer.writerows(dicts)
        self.metrics_json.write_text(json.dumps(dicts, indent=2))
        from cachedseg.pictures import close, curves_figure
        figure = curves_figure(rows)
        figure.savefig(self.path / CURVES, dpi=100, bbox_inches="tight")
        close(figure)

    def read_metrics(self) -> list[EpochMetrics]:
        """The rows of metrics.json."""
        return [EpochMetrics.from_dict(r) for r in json.loads(self.metrics_json.read_text())]

    def write_sweep_summary(self, rows: list[SweepRow]) -> None:
        """sweep.json: {"best": the first row's name, "runs": [row, ...]} for `rows`, best first."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.sweep_summary.write_text(json.dumps({"best": rows[0].name, "runs": [r.to_dict() for r in rows]},
                                                 indent=2))

    def read_sweep_summary(self) -> list[SweepRow] | None:
        """The rows of sweep.json, best first, or None if this is not a sweep folder."""
        if not self.sweep_summary.is_file():
            return None
        return [SweepRow.from_dict(r) for r in json.loads(self.sweep_summary.read_text())["runs"]]
