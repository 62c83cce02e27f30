"""Sweeps: many training configs in one pass over the cache.

Lists of learning rates, decoders, layer counts and seeds expand into every combination. All of them train in the
same pass (`train.train_heads`): each batch is read once and fed to every head. Each config gets its own sub-run
folder (checkpoints, metrics, `--resume`), and the sweep folder gets `sweep.json`, the configs sorted by their best
val mIoU, naming the best.

    runs/sweep/
        sweep.json              {"best": name, "runs": [{name, run, config, best_val_miou, ...}, ...]}
        conv-l1-lr0.0001-s0/    a run folder, as `cachedseg train` writes
        ...
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from cachedseg import distributed
from cachedseg.errors import CachedsegError
from cachedseg.features import FeatureSource
from cachedseg.runs import EpochMetrics, RunFolder, SweepRow, default_run
from cachedseg.train import TrainConfig, resolve_class_weights, train_heads


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep.

    Attributes:
        run: The sweep folder.
        runs: One summary row per config, best val mIoU first.
    """

    run: Path
    runs: list[SweepRow]

    @property
    def best(self) -> SweepRow:
        """The row of the config with the best val mIoU."""
        return self.runs[0]


@dataclass(frozen=True)
class Plan:
    """What one `cachedseg train` runs: a config into its run folder, or several (a sweep) into a sweep folder.

    Attributes:
        configs: The configs, in the order `grid` gives them.
        run: The run folder (one config) or the sweep folder.
    """

    configs: list[TrainConfig]
    run: Path

    @property
    def is_sweep(self) -> bool:
        """Whether several configs train, each into a sub-run of `run`."""
        return len(self.configs) > 1

    @property
    def max_layers(self) -> int:
        """The most layers a config reads (one that reads all counts 1): what a live backbone must return."""
        return max(c.layers or 1 for c in self.configs)


def plan(base: TrainConfig, lr: str, decoder: str, seed: str, layers: str | None = None,
         store: str | Path | None = None, live: str | Path | None = None, run: str | Path | None = None) -> Plan:
    """The configs that `cachedseg train`'s options ask for, and the folder they train into.

    Args:
        base: The settings all configs share (epochs, batch size, data seed, ...).
        lr: The learning rate, or a comma list of them ('1e-4,3e-4').
        decoder: The decoder, or a comma list.
        seed: The seed, or a comma list.
        layers: The layer count, or a comma list (None: all the features hold).
        store: The store the features come from, or None with `live`.
        live: The dataset folder live features are computed from, or None with `store`.
        run: The folder to train into (None: see `runs.default_run`).

    Returns:
        One config (its `data_seed` as given), or a sweep of every combination of the lists.

    Raises:
        CachedsegError: For a value that does not parse, a learning rate that is not positive and finite, a layer
            count under 1, or lists that repeat a value.
    """
    lrs, decoders = parse_values(lr, float, "--lr"), parse_values(decoder, str, "--decoder")
    seeds = parse_values(seed, int, "--seed")
    layer_counts = parse_values(layers, int, "--layers") if layers else [None]
    for value in lrs:  # nan > 0 is False too
        if not (0 < value < float("inf")):
            raise CachedsegError(f"--lr {value}: give a positive, finite learning rate, e.g. 1e-4")
    for n in layer_counts:
        if n is not None and n < 1:
            raise CachedsegError(f"--layers {n}: give a whole number of at least 1")
    configs = grid(base, lrs, decoders, layer_counts, seeds)
    if len(configs) > 1:
        return Plan(configs, Path(run) if run else default_run(store, live, "sweep"))
    # alone, a config shuffles by its own seed unless a data seed was given (grid sets the shared one)
    config = configs[0] if base.data_seed is not None else replace(configs[0], data_seed=None)
    return Plan([config], Path(run) if run else default_run(store, live, config.decoder))


def parse_values(text: str, kind: type, option: str) -> list:
    """A comma list of values of one kind ('1e-4,3e-4' -> [0.0001, 0.0003]); `option` names it in the error."""
    try:
        values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise CachedsegError(f"{option} {text!r}: give a value, or a comma list of them")
    return values


def grid(base: TrainConfig, lrs: list[float], decoders: list[str], layers: list[int | None],
         seeds: list[int]) -> list[TrainConfig]:
    """Every combination of the lists, on top of `base`; the shuffling follows the first seed in all of them, so
    that they can share batches (a config trained alone with the same `data_seed` sees the same ones)."""
    data_seed = base.data_seed if base.data_seed is not None else seeds[0]
    configs = [replace(base, lr=lr, decoder=decoder, layers=layer, seed=seed, data_seed=data_seed)
               for decoder, layer, lr, seed in itertools.product(decoders, layers, lrs, seeds)]
    if len({name(c) for c in configs}) != len(configs):
        raise CachedsegError("the sweep lists repeat a value; give each learning rate, decoder, layer count and "
                             "seed once")
    return configs


def name(config: TrainConfig) -> str:
    """A sub-run's folder name, e.g. conv-l4-lr0.0003-s1 (l0: all the layers the store holds)."""
    return f"{config.decoder}-l{config.layers or 0}-lr{config.lr:g}-s{config.seed}"


def sweep(source: FeatureSource, run: str | Path, configs: list[TrainConfig], device: str = "cpu",
          resume: bool = False, progress: Callable[[int, int], None] | None = None,
          on_epoch: Callable[[Path, EpochMetrics], None] | None = None,
          log: Callable[[str], None] | None = None, loggers: tuple[str, ...] = ()) -> SweepResult:
    """Train `configs` in one pass over `source`, each into `run/<name>`, and summarise them in `run/sweep.json`
    (each sub-run logged to `loggers` too, see `cachedseg.trackers`).

    Args:
        source: Cached (or live) features.
        run: The sweep folder.
        configs: The configs (see `grid`); they must share epochs, batch size and data seed.
        device, resume, progress, on_epoch, log: As for `train.train_heads`.

    Returns:
        The summary, best first.

    Raises:
        CachedsegError: As `train.train_heads` does.
    """
    run = Path(run)
    # `--class-weights auto` resolved here already, so that sweep.json records the numbers the heads train with
    plans = resolve_class_weights(source, [(run / name(c), c) for c in configs], resume,
                                  distributed.context(str(device)))
    histories = train_heads(source, plans, device, resume, progress, on_epoch, log, loggers)
    rows = sorted((SweepRow.of(path, config, history) for (path, config), history in zip(plans, histories)),
                  key=lambda r: -r.best_val_miou)
    if distributed.context(str(device)).main:
        RunFolder(run).write_sweep_summary(rows)
    return SweepResult(run, rows)
