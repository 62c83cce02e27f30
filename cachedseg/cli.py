"""The `cachedseg` command: a thin Typer layer. Each command checks the paths it was given (fast, before torch
loads), then calls one library function; Rich (progress, tables) lives here only."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from cachedseg import paths, runs
from cachedseg.dataset import Dataset, open_dataset
from cachedseg.errors import CachedsegError

app = typer.Typer(help="Semantic segmentation of drone imagery on a frozen DINOv2 backbone, with a feature cache.\n\n"
                  "Stage one, `extract`, runs the backbone once per image and caches its token grids in a Zarr store. "
                  "Stage two, `train`, trains only the decoder from that cache; `evaluate` and `predict` run it. "
                  "`demo` runs it all on generated data. Add --verbose anywhere for tracebacks.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


RANK = int(os.environ.get("RANK", "0"))  # under torchrun: only rank 0 reports


def _console(stderr: bool = False) -> Console:
    """A console that, when piped into a log, does not wrap long paths at 80 columns (and is quiet on the ranks
    other than 0 of a torchrun job, except for errors)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 240, quiet=RANK > 0 and not stderr)


console, errors = _console(), _console(stderr=True)
_state = {"verbose": False}

BACKBONE_HELP = "timm DINOv2 model, e.g. vit_small_patch14_dinov2, vit_base_patch14_reg4_dinov2."
PRECISION_HELP = ("Backbone compute precision: float32, or bfloat16/float16 autocast (faster on a GPU). It is "
                  "recorded in the store, and evaluate/predict run the backbone at the same precision.")
WEIGHTS_HELP = ("'auto': pretrained via timm / the Hugging Face hub or its local cache; a .safetensors/.pth file; "
                "or 'random': a seeded random init for tests and offline demos.")
SIZE_HELP = ("Backbone input: one side (518: a square, as the seed design) or WIDTH x HEIGHT (924x518), multiples "
             "of 14. Default: --short-side at the model's size.")
SHORT_SIDE = ("Keep the dataset's aspect ratio: this short side (a multiple of 14), the long side the nearest "
              "multiple of 14 (1280x720 frames at 518 -> 924x518).")
SHORT_SIDE_HELP = SHORT_SIDE + " Default: the model's size, 518."
DEMO_SHORT_SIDE = 224  # the demo's default: a CPU runs it in minutes
VIEWS_HELP = "Extra cached views, comma-separated: flip (one more forward pass and as much storage per view)."
DECODER_HELP = ("Decoder: conv (3x3 convs on the token grid; the best recipe measured), upconv (transposed convs, "
                "aligned), linear (BN + 1x1; with 4 layers DINOv2's linear4), or seed (the seed design's, with its "
                "center crop: the reproduction).")
VERBOSE = ("--verbose", "-v")


def main() -> None:
    """Entry point: accepts --verbose anywhere on the line, not only before the command."""
    args = sys.argv[1:]
    _state["argv"] = args
    flags = [a for a in args if a in VERBOSE]
    app(args=flags + [a for a in args if a not in VERBOSE], prog_name="cachedseg")


@app.callback()
def _root(verbose: bool = typer.Option(False, *VERBOSE, help="Show tracebacks for errors.")) -> None:
    """Semantic segmentation of drone imagery on a frozen DINOv2 backbone, with a feature cache."""
    _state["verbose"] = verbose


def rerun(*extra: str) -> str:
    """The command line this process was started with, plus `extra` options it lacks: the command to continue."""
    import shlex

    args = _state.get("argv")
    if args is None or "LOCAL_RANK" in os.environ:  # a library call (no line to repeat), or a torchrun job's rank
        return "the same command" + "".join(f" with {e}" for e in extra)
    return "`" + shlex.join(["cachedseg", *args, *(e for e in extra if e not in args)]) + "`"


@contextlib.contextmanager
def user_errors(interrupted: Callable[[], str] = lambda: f"finished work is kept; rerun {rerun()} to continue"
                ) -> Iterator[None]:
    """Turn a CachedsegError into a one-line message and exit code 1 (a traceback only with --verbose); a Ctrl-C
    into exit code 130 and the command that continues (`interrupted` gives it: train needs --resume)."""
    try:
        yield
    except CachedsegError as exc:
        if _state["verbose"]:
            raise
        if RANK == 0 or not getattr(exc, "shared", False):  # a job-wide error is told once, by rank 0
            prefix = f"[rank {RANK}] " if RANK else ""
            errors.print(f"[bold red]{prefix}error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # a path the system refused (read-only, full disk) that no check caught first
        if _state["verbose"] or exc.filename is None:
            raise
        errors.print(f"[bold red]error:[/] {escape(str(exc.filename))}: {escape(exc.strerror or type(exc).__name__)}; "
                     "check that the path exists and that you may read and write it (--verbose shows where)",
                     soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        errors.print(f"[yellow]interrupted[/]: {escape(interrupted())}", soft_wrap=True)
        raise typer.Exit(130) from None


class RateColumn(ProgressColumn):
    """Items per second, from Rich's own speed estimate."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f} {self.unit}/s", style="cyan")


class Reporter:
    """Progress of a long command: a Rich bar on a terminal; in a pipe or a batch log, plain lines about every
    10% or 10 s (a bar redrawn in place would show nothing there)."""

    def __init__(self, unit: str = "img"):
        self.unit = unit
        self.bar = (Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                             TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                             transient=True)  # gone when done: the summary that follows says what happened
                    if console.is_terminal else None)

    def __enter__(self) -> Reporter:
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.__exit__(*exc)

    def print(self, text: str) -> None:
        """A line above the bar."""
        (self.bar.console if self.bar else console).print(text, soft_wrap=True)

    def callback(self, description: str) -> Callable[[int, int], None]:
        """A `progress(done, total)` callback; it shows nothing until first called, so failures leave no empty bar."""
        if self.bar:
            tasks: list = []

            def update(done: int, total: int) -> None:
                if not tasks:
                    tasks.append(self.bar.add_task(description, total=total))
                self.bar.update(tasks[0], completed=done, total=total)
            return update
        start, last = time.monotonic(), {"time": time.monotonic(), "tenth": 0}

        def line(done: int, total: int) -> None:
            now, tenth = time.monotonic(), (10 * done // total if total else 10)
            if done == 0 or not (tenth > last["tenth"] or now - last["time"] >= 10 or done == total):
                return
            last.update(time=now, tenth=tenth)
            rate = done / max(now - start, 1e-9)
            eta = f", eta {(total - done) / rate:.0f} s" if done < total else ""
            console.print(f"{description}: {done}/{total} {self.unit} ({100 * done // max(total, 1)}%), "
                          f"{rate:.2f} {self.unit}/s{eta}", soft_wrap=True, highlight=False)
        return line


def _backbone_config(backbone: str, image_size: Optional[str], short_side: Optional[int], precision: str,
                     layers: int, data: Optional[Path]):
    """A BackboneConfig from the size options (--short-side reads the dataset's first frame)."""
    import timm

    from cachedseg.backbone import BackboneConfig, parse_size, size_for_short_side
    from cachedseg.dataset import open_dataset

    if image_size and short_side:
        raise CachedsegError("give --image-size or --short-side, not both")
    if image_size:
        return BackboneConfig(backbone, parse_size(image_size), precision, layers)
    if not short_side:  # the default: the model's own size as the short side, the dataset's aspect ratio kept
        cfg = timm.models.get_pretrained_cfg(backbone) if backbone in timm.list_models("*dinov2*") else None
        short_side = cfg.input_size[-1] if cfg else 518
    return BackboneConfig(backbone, size_for_short_side(short_side, *open_dataset(data).frame_size()), precision, layers)


def _views(views: str) -> tuple[str, ...]:
    """'flip' -> ('identity', 'flip')."""
    from cachedseg.views import check_views
    return check_views(tuple(v.strip() for v in views.split(",") if v.strip()))


def _light_checks(*checks: Callable[[], object]) -> None:
    """Run path checks before the heavy imports, so a typo costs milliseconds, not seconds of loading torch."""
    with user_errors():
        for check in checks:
            check()


def _at_least(minimum: int, **options: Optional[int]) -> Callable[[], None]:
    """A check that each numeric option given (not None) is at least `minimum`, named as the user typed it."""
    def check() -> None:
        for name, value in options.items():
            if value is not None and value < minimum:
                raise CachedsegError(f"--{name.replace('_', '-')} {value}: give a whole number of at least {minimum}")
    return check


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the dataset into (AeroScapes layout)."),
    count: int = typer.Option(24, "--count", "-n", help="Number of images."),
    width: int = typer.Option(1280, help="Image width in pixels."),
    height: int = typer.Option(720, help="Image height in pixels."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same files."),
) -> None:
    """Write a generated drone-imagery dataset in the AeroScapes layout (the built-in default data)."""
    _light_checks(lambda: paths.check_writable(out, "the dataset folder", folder=True))
    with user_errors():
        _synth(out, count, width, height, seed)


def _synth(out: Path, count: int, width: int, height: int, seed: int) -> None:
    """Generate the dataset with progress, and say where it went."""
    from cachedseg.synth import synthesize

    with Reporter() as reporter:
        progress, done = reporter.callback("synth"), [0]

        def step(n: int) -> None:
            done[0] += n
            progress(done[0], count)
        try:
            ids = synthesize(out, count=count, width=width, height=height, seed=seed, progress=step)
        except ValueError as exc:
            raise CachedsegError(str(exc)) from None
    console.print(f"wrote {len(ids)} images ({width}x{height}) to [bold]{escape(str(out))}[/]", soft_wrap=True)


@app.command()
def extract(
    data: Path = typer.Argument(..., help="Dataset folder (AeroScapes layout: JPEGImages/, SegmentationClass/, ImageSets/{trn,val}.txt)."),
    store: Optional[str] = typer.Option(None, help="Store to write: a folder or a URL such as s3://bucket/x.zarr (default: cache/<data>-<backbone>-<size>-<dtype>.zarr)."),
    backbone: str = typer.Option("vit_base_patch14_dinov2", help=BACKBONE_HELP),
    image_size: Optional[str] = typer.Option(None, help=SIZE_HELP),
    short_side: Optional[int] = typer.Option(None, help=SHORT_SIDE_HELP),
    layers: int = typer.Option(1, help="Store the normed patch tokens of the last N blocks (4: DINOv2's linear4 / +ms recipes)."),
    views: str = typer.Option("", help=VIEWS_HELP),
    weights: str = typer.Option("auto", help=WEIGHTS_HELP),
    precision: str = typer.Option("float32", help=PRECISION_HELP),
    dtype: str = typer.Option("float16", help="Feature storage dtype: float16 (half the size) or float32."),
    batch_size: int = typer.Option(4, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    workers: Optional[int] = typer.Option(None, help="Image-decoding worker processes (default: min(4, CPUs))."),
    overwrite: bool = typer.Option(False, help="Rebuild a store made with other settings instead of refusing it."),
    skip_bad: bool = typer.Option(False, help="Record unreadable images in the store, with the reason, and carry on."),
    redo: Optional[list[str]] = typer.Option(None, help="Recompute this image id (repeatable), e.g. after a checksum error."),
    images_per_shard: int = typer.Option(1, help="Pack N images into each file (zarr shards) of a new store: fewer "
                                         "files; a shard is then the unit of work (an unfinished one is redone whole)."),
):
    """Run the frozen backbone once per image and cache its token grids in a Zarr store.

    Rerunning the same command skips finished images, so an interrupted run resumes where it stopped, and
    follows the data: changed images and masks are recomputed, newly listed ids added, removed ones left out.
    """
    _light_checks(lambda: open_dataset(data), _at_least(1, batch_size=batch_size, layers=layers,
                  images_per_shard=images_per_shard, short_side=short_side), _at_least(0, workers=workers))
    with user_errors():
        config = _backbone_config(backbone, image_size, short_side, precision, layers, data)
        return _extract(data, store, config, weights=weights, dtype=dtype, batch_size=batch_size, device=device,
                        workers=workers, overwrite=overwrite, skip_bad=skip_bad, redo=tuple(redo or ()),
                        views=_views(views), images_per_shard=images_per_shard)


def _extract(data, store, backbone, **options):
    """Run `cachedseg.extract.extract` with progress, then print its summary."""
    from cachedseg.extract import extract as run_extract

    with Reporter() as reporter:
        result = run_extract(data, store, backbone, progress=reporter.callback("extract"), **options)
    # the store path on a line of its own, never wrapped: it is the string users copy into the next command
    console.print(f"feature store [bold]{escape(result.store)}[/]", soft_wrap=True)
    table = Table(show_header=False)
    speed = f"{result.images_per_s:.2f} img/s" if result.extracted else "nothing to extract"
    changed = [f"{n} {what}" for n, what in [(result.changed, "images recomputed"),
                                             (result.masks_changed, "masks rewritten (image unchanged)"),
                                             (result.touched, "touched but unchanged")] if n]
    for key, value in [("images", f"{result.images} ({result.extracted} extracted, {result.skipped} already done)"),
                       ("changed files", ", ".join(changed)),
                       ("newly listed", f"{result.added} images added to the store" if result.added else ""),
                       ("moved split", f"{result.moved} images" if result.moved else ""),
                       ("time", f"{result.seconds:.1f} s ({speed})"),
                       ("size on disk", f"{result.bytes_on_disk / 1e6:.1f} MB ({result.mb_per_image:.2f} MB/img)")]:
        if value:
            table.add_row(key, value)
    console.print(table)
    if result.adopted:
        errors.print(f"[bold yellow]{result.adopted} images had no record of the files they were computed from[/] "
                     "(a store from an older cachedseg): their current files are now the record; pass --redo ID "
                     "for any that changed since the store was built", soft_wrap=True)
    if result.gone:
        errors.print(f"[bold yellow]{len(result.gone)} images are gone from the dataset[/] (kept in the store, left "
                     "out of training and evaluation; list them again to bring them back):", soft_wrap=True)
        for id_, reason in list(result.gone.items())[:10]:
            errors.print(f"  {escape(id_)}: {escape(reason)}", soft_wrap=True)
        if len(result.gone) > 10:
            errors.print(f"  ... and {len(result.gone) - 10} more", soft_wrap=True)
    if result.bad:
        errors.print(f"[bold yellow]{len(result.bad)} unreadable images skipped[/] (recorded in the store's `bad` "
                     "attribute; fix them and rerun to add them):", soft_wrap=True)
        for id_, reason in result.bad.items():
            errors.print(f"  {escape(id_)}: {escape(reason)}", soft_wrap=True)
    return result


def _metrics_table(rows: list[runs.EpochMetrics], title: str) -> Table:
    """The seed's results table: epoch, training loss, validation mIoU, pixel accuracy, time."""
    table = Table(title=title)
    for name in ("Epoch", "Training loss", "Validation mIoU", "Pixel accuracy", "Seconds"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r.epoch), f"{r.train_loss:.4f}", f"{r.val_miou:.4f}", f"{r.val_pixel_acc:.4f}",
                      f"{r.seconds:.1f}")
    return table


@app.command()
def train(
    store: Optional[str] = typer.Argument(None, help="Feature store from `cachedseg extract` (omit with --live)."),
    run: Optional[Path] = typer.Option(None, "--run", "--run-dir", help="Run folder, or sweep folder (default: runs/<store or data>-<decoder or sweep>). Under torchrun write --run-dir: torchrun takes --run for its own --run-path."),
    epochs: int = typer.Option(11, help="Epochs."),
    lr: str = typer.Option("1e-4", help="Adam learning rate. A comma list (1e-4,3e-4) sweeps: every combination of the listed values trains in one pass over the cache, each in its own sub-run."),
    batch_size: int = typer.Option(2, help="Images per step, in all (under torchrun split over the processes)."),
    decoder: str = typer.Option("conv", help=DECODER_HELP + " A comma list sweeps."),
    layers: Optional[str] = typer.Option(None, help="The decoder reads the last N cached layers (default: all the store holds; with --live: 1). A comma list sweeps."),
    seed: str = typer.Option("0", help="Seed for the decoder's initialisation and the shuffling. A comma list sweeps (the shuffling then follows the first)."),
    data_seed: Optional[int] = typer.Option(None, help="Seed for the shuffling alone (default: --seed); a sweep's sub-runs record theirs."),
    decoder_precision: str = typer.Option("float32", help="Decoder compute: float32, or bfloat16 autocast (GPUs)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Run the decoder channels-last (faster convolutions on GPUs)."),
    compile_: bool = typer.Option(False, "--compile", help="Compile the decoder with torch.compile (pays off on long GPU runs)."),
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes (default: 0 on a CPU, min(4, CPUs) on a GPU)."),
    loss: str = typer.Option("ce", help="ce (cross-entropy), or dice-ce: cross-entropy plus soft Dice over the classes present in each batch, so a small class counts as much as a large one. Both leave the ignore label out."),
    class_weights: str = typer.Option("none", help="Weigh the loss per class: none; auto: from the trn pixel shares (inverse square root of each class's share, scaled so the trn pixels' mean weight is 1, clipped to [0.1, 10]; a class absent from trn gets 1); or w0,w1,... one per class. The run records the numbers, and --resume keeps them."),
    in_memory: bool = typer.Option(False, "--in-memory", help="Load the whole cache first: onto the GPU when it fits there, else into RAM (if it fits)."),
    resume: bool = typer.Option(False, help="Continue the run from its last checkpoint (from scratch if it has none yet)."),
    live: Optional[Path] = typer.Option(None, help="Baseline: compute features live from this dataset folder instead of a store."),
    backbone: str = typer.Option("vit_base_patch14_dinov2", help="With --live: " + BACKBONE_HELP),
    image_size: Optional[str] = typer.Option(None, help="With --live: " + SIZE_HELP),
    short_side: Optional[int] = typer.Option(None, help="With --live: " + SHORT_SIDE_HELP),
    views: str = typer.Option("", help="With --live: " + VIEWS_HELP),
    weights: str = typer.Option("auto", help="With --live: " + WEIGHTS_HELP),
    precision: str = typer.Option("float32", help="With --live: " + PRECISION_HELP),
    dtype: str = typer.Option("float16", help="With --live: cast features to this dtype, as a cache would store them."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> list[runs.EpochMetrics]:
    """Train the decoder from cached features (or, with --live, from the images), validating each epoch.

    The run folder gets last.pt, best.pt (by val mIoU), metrics.csv, metrics.json and curves.png.
    """
    def inputs() -> None:
        if (store is None) == (live is None):
            raise CachedsegError("give either a STORE or --live DATA")
        paths.check_store(store) if store is not None else open_dataset(live)
    def recipe() -> None:
        from cachedseg.recipe import LOSSES, check_class_weights, parse_class_weights
        if loss not in LOSSES:
            raise CachedsegError(f"--loss {loss!r}: use {' or '.join(LOSSES)}")
        weights = parse_class_weights(class_weights)
        if isinstance(weights, tuple):  # one per class: the store's classes, or the dataset's
            from cachedseg.store import FeatureStore
            check_class_weights(weights, FeatureStore.open(store).spec.class_names if store is not None
                                else open_dataset(live).classes.names)
    _light_checks(inputs, _at_least(1, epochs=epochs, batch_size=batch_size, short_side=short_side),
                  _at_least(0, workers=workers), recipe)
    from cachedseg.backbone import build_backbone, resolve_device
    from cachedseg.features import cached_source, live_source
    from cachedseg.recipe import parse_class_weights
    from cachedseg.sweep import grid
    from cachedseg.train import TrainConfig

    # a rerun without --resume is refused (the run folder holds a run now): name the command that continues
    with user_errors(lambda: f"last.pt holds the last finished epoch; continue with {rerun('--resume')}"):
        lrs, decoders = _values(lr, float, "--lr"), _values(decoder, str, "--decoder")
        seeds, layer_counts = _values(seed, int, "--seed"), _values(layers, int, "--layers") if layers else [None]
        for lr_ in lrs:  # nan > 0 is False too
            if not (0 < lr_ < float("inf")):
                raise CachedsegError(f"--lr {lr_}: give a positive, finite learning rate, e.g. 1e-4")
        for n in layer_counts:
            _at_least(1, layers=n)()
        torch_device = resolve_device(device)
        if live is not None:
            config = _backbone_config(backbone, image_size, short_side, precision, max(layer_counts, key=lambda n: n or 1)
                                      or 1, live)
            source = live_source(live, build_backbone(config, weights, torch_device), dtype, weights, _views(views))
        else:
            source = cached_source(store, in_memory=in_memory, device=torch_device)
            if in_memory:
                console.print(f"features {source.dataset.where}")
        base = TrainConfig(epochs=epochs, batch_size=batch_size, data_seed=data_seed, workers=workers,
                           decoder_precision=decoder_precision, channels_last=channels_last, compile=compile_,
                           loss=loss, class_weights=parse_class_weights(class_weights))
        configs = grid(base, lrs, decoders, layer_counts, seeds)
        name = Path(store).name.removesuffix(".zarr") if store is not None else f"{Path(live).resolve().name}-live"
        kind = "live" if live else "cached"
        if len(configs) == 1:
            config = configs[0] if data_seed is not None else replace(configs[0], data_seed=None)
            return _train(source, run or Path("runs") / f"{name}-{config.decoder}", config, torch_device, resume, kind)
        return _sweep(source, run or Path("runs") / f"{name}-sweep", configs, torch_device, resume, kind)


def _values(text: str, kind: type, option: str) -> list:
    """A comma list of values of one kind ('1e-4,3e-4' -> [0.0001, 0.0003])."""
    try:
        values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise CachedsegError(f"{option} {text!r}: give a value, or a comma list of them")
    return values


def _sweep(source, run: Path, configs, device, resume: bool, kind: str):
    """Run `cachedseg.sweep.sweep` with progress, then print the configs, best first."""
    from cachedseg.sweep import sweep as run_sweep

    console.print(f"sweeping {len(configs)} configs in one pass over {kind} {source.spec.backbone} features -> "
                  f"{escape(str(run))}", soft_wrap=True)
    with Reporter("batch") as reporter:
        def on_epoch(sub: Path, r: runs.EpochMetrics) -> None:
            reporter.print(f"{escape(sub.name):>28} epoch {r.epoch:>3}  loss {r.train_loss:.4f}  "
                           f"val mIoU {r.val_miou:.4f}  pixel acc {r.val_pixel_acc:.4f}")

        result = run_sweep(source, run, configs, device, resume=resume, on_epoch=on_epoch,
                           progress=reporter.callback("epoch") if reporter.bar else None,
                           log=lambda message: reporter.print(f"[yellow]note:[/] {escape(message)}"))
    table = Table(title="configs, best first")  # no path in a title: a table wraps it (the lines around name it)
    for column in ("run", "best val mIoU", "epoch", "pixel acc", "final loss"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in result.runs:
        table.add_row(escape(row.name), f"{row.best_val_miou:.4f}", str(row.best_epoch),
                      f"{row.best_val_pixel_acc:.4f}", f"{row.final_train_loss:.4f}")
    console.print(table)
    console.print(f"best: [bold]{escape(result.best.run)}[/]; summary in "
                  f"{escape(str(runs.RunFolder(run).sweep_summary))}", soft_wrap=True)
    return result


def _train(source, run: Path, config, device, resume: bool, kind: str) -> list[runs.EpochMetrics]:
    """Run `cachedseg.train.train` with progress and the seed's per-epoch table."""
    from cachedseg.train import train as run_train

    with Reporter("batch") as reporter:
        bar, started = reporter.callback("epoch") if reporter.bar else None, []

        def start() -> None:  # once training really starts: a refused run prints only its error
            if not started:
                started.append(True)
                reporter.print(f"training [bold]{config.decoder}[/] decoder on {kind} {source.spec.backbone} "
                               f"features ({source.spec.dtype}) -> {escape(str(run))}")
                reporter.print(f"{'Epoch':>5} {'Training loss':>14} {'Validation mIoU':>16} {'Pixel accuracy':>15} "
                               f"{'Seconds':>8}")

        def progress(done: int, total: int) -> None:
            start()
            if bar:
                bar(done, total)

        def on_epoch(r: runs.EpochMetrics) -> None:
            reporter.print(f"{r.epoch:>5} {r.train_loss:>14.4f} {r.val_miou:>16.4f} "
                           f"{r.val_pixel_acc:>15.4f} {r.seconds:>8.1f}")

        rows = run_train(source, run, config, device, resume=resume, on_epoch=on_epoch, progress=progress,
                         log=lambda message: reporter.print(f"[yellow]note:[/] {escape(message)}"))
    best = runs.best_row(rows)
    console.print(f"best val mIoU {best.val_miou:.4f} (epoch {best.epoch}); checkpoints, metrics and "
                  f"curves.png in [bold]{escape(str(run))}[/]", soft_wrap=True)
    return rows


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder (uses best.pt) or a checkpoint file."),
    store: Optional[str] = typer.Option(None, help="Score from cached features in this store (default, with no --data "
                                        "either: the features the run was trained on)."),
    data: Optional[Path] = typer.Option(None, help="Dataset folder: run the backbone live (or, with --store, where the labels are)."),
    split: str = typer.Option("val", help="trn or val."),
    compare_live: bool = typer.Option(False, "--compare-live", help="With cached features (--store, or the run's own "
                                      "store): also run the backbone live and count the pixels whose predicted label "
                                      "differs from the cached prediction."),
    tta: bool = typer.Option(False, "--tta", help="Average the logits of every cached view (e.g. flipped), mapped back."),
    batch_size: int = typer.Option(4, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, help="Processes decoding labels and images (default: 0 on a CPU, min(4, CPUs) on a GPU)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the confusion matrix and scores here."),
    weights: Optional[str] = typer.Option(None, help="Live only: backbone weights (default: those the run was trained with)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """Score a run against the dataset's label PNGs at native resolution: confusion matrix, mIoU, pixel accuracy."""
    _light_checks(lambda: paths.checkpoint_path(run), lambda: store is not None and paths.check_store(store),
                  lambda: data is not None and open_dataset(data), _at_least(1, batch_size=batch_size),
                  _at_least(0, workers=workers),
                  lambda: json_out is not None and paths.check_writable(json_out, "--json"))
    with user_errors(lambda: f"nothing was written; rerun {rerun()}"):
        ckpt = None
        if store is None and data is None:
            from cachedseg.checkpoint import load_run
            from cachedseg.evaluate import trained_on
            ckpt = load_run(run)  # handed on, so best.pt is loaded once
            store, data = trained_on(run, ckpt)
            console.print(f"scoring the features {escape(str(run))} was trained on: "
                          f"{escape(store or f'live from {data}')}", soft_wrap=True, highlight=False)
        return _evaluate(run, store=store, data=data, split=split, compare_live=compare_live, tta=tta,
                         json_out=json_out, weights=weights, device=device, batch_size=batch_size, workers=workers,
                         ckpt=ckpt)


def _evaluate(run, json_out: Path | None = None, **options):
    """Run `cachedseg.evaluate.evaluate` with progress; print the per-class table and write the JSON."""
    import json

    from cachedseg.evaluate import evaluate as run_evaluate

    with Reporter() as reporter:
        result = run_evaluate(run, progress=reporter.callback("evaluate"), **options)
    console.print(f"{options.get('split', 'val')}: mIoU {result.miou:.4f}, pixel accuracy {result.pixel_acc:.4f} "
                  f"({result.images} images)")
    table = Table()
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("pixels", justify="right")
    for name, iou, pixels in zip(result.class_names, result.iou, result.confusion.sum(1)):
        table.add_row(name, "-" if iou is None else f"{iou:.4f}", str(int(pixels)))
    console.print(table)
    if result.stale_labels:
        errors.print(f"[bold yellow]warning:[/] {len(result.stale_labels)} label files changed since the store was "
                     f"built (e.g. {escape(', '.join(result.stale_labels[:3]))}): the scores use the new labels, the "
                     "store (and training) the old; rerun `cachedseg extract` on the dataset to update it",
                     soft_wrap=True)
    if result.pixels is not None:
        console.print(f"cached vs live: {result.differ} of {result.pixels} pixels differ "
                      f"({1 - result.differ / max(result.pixels, 1):.6f} agree)")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_json(), indent=2))
        console.print(f"wrote {escape(str(json_out))}", soft_wrap=True)
    return result


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files and/or folders of images."),
    run: Path = typer.Option(..., "--run", "--run-dir", help="Run folder (uses best.pt) or a checkpoint file."),
    out: Path = typer.Option(Path("predictions"), help="Output folder."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights (default: those the run was trained with); "
                                          "they must give the run's backbone fingerprint."),
    tta: bool = typer.Option(False, "--tta", help="Average the logits of every view the run's store cached (e.g. flipped)."),
    batch_size: int = typer.Option(4, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, help="Processes decoding images (default: 0 on a CPU, min(4, CPUs) on a GPU)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """Segment images live (backbone + decoder): writes <name>_label.png, and _color.png and _overlay.png with a
    legend of the classes shown, per image."""
    _light_checks(lambda: paths.check_images(images), lambda: paths.checkpoint_path(run),
                  _at_least(1, batch_size=batch_size), _at_least(0, workers=workers),
                  lambda: paths.check_writable(out, "--out", folder=True))
    with user_errors(lambda: f"the images written so far are kept; rerun {rerun()} to redo them all"):
        return _predict(images, run, out, weights=weights, device=device, tta=tta, batch_size=batch_size,
                        workers=workers)


def _predict(images, run, out: Path, **options):
    """Run `cachedseg.predict.predict` with progress and say what was written (and what was replaced)."""
    from cachedseg.predict import predict as run_predict

    with Reporter() as reporter:
        written = run_predict(images, run, out, progress=reporter.callback("predict"), **options)
    replaced = sum(p.replaced for p in written)
    console.print(f"wrote {3 * len(written)} PNGs for {len(written)} images to [bold]{escape(str(out))}[/]"
                  + (f", replacing the earlier files of {replaced} of them" if replaced else ""), soft_wrap=True)
    if written.left_out:
        shown = ", ".join(p.name for p in written.left_out[:3]) + (", ..." if len(written.left_out) > 3 else "")
        console.print(f"left out {len(written.left_out)} files that cachedseg wrote itself ({escape(shown)}): "
                      "predictions are never inputs", soft_wrap=True)
    return written


@app.command()
def info(path: str = typer.Argument(..., help="A feature store (folder or URL), or a run folder / checkpoint file.")) -> None:
    """Show what a feature store holds (settings, images done/pending/bad, size) or what a run was trained on."""
    def exists() -> None:
        if paths.is_url(path):  # only a store can live at a URL
            paths.check_store(path)
        elif not Path(path).exists():
            raise CachedsegError(f"nothing at {path} (expected a feature store or a run folder)"
                                 f"{paths.did_you_mean(Path(path))}")
    _light_checks(exists)
    from cachedseg import checkpoint
    from cachedseg.store import FeatureStore, is_store, open_group

    with user_errors():
        group = open_group(path)  # opened once: on a bucket each open is a round trip
        if is_store(path, group):
            d = FeatureStore.open(path, group=group).describe()
            (h, w), (mh, mw) = d["input_size"], d["mask_size"]
            rows = [("backbone", f"{d['backbone']} @ {w}x{h} px, precision {d['precision']}"),
                    ("features", f"[N, {len(d['views'])}, {d['layers']}, {d['channels']}, {d['grid'][0]}, "
                                 f"{d['grid'][1]}] {d['dtype']} (views: {', '.join(d['views'])}; last {d['layers']} "
                                 "layer(s))"),
                    ("masks", f"{mw}x{mh} uint8"),
                    ("images", f"{d['images']} ({d['trn']} trn, {d['val']} val): {d['done']} done, "
                               f"{d['pending']} pending, {d['skipped_bad']} skipped as bad"
                               + (f", {d['gone']} gone from the dataset (left out)" if d["gone"] else "")),
                    ("size on disk", f"{d['bytes_on_disk'] / 1e6:.1f} MB ({d['bytes_on_disk'] / 1e6 / max(d['images'], 1):.2f} MB/img)"),
                    ("fingerprint", d["fingerprint"]), ("weights", d["weights"]), ("dataset", d["dataset"]),
                    ("format", f"{d['format']} v{d['format_version']}, cachedseg {d['package_version']}")]
            rows += [(f"bad: {k}", v) for k, v in d.get("bad", {}).items()]
        else:
            p = Path(path)
            if p.is_file() and p.suffix != ".pt" or p.is_dir() and not runs.RunFolder(p).has_checkpoint():
                raise CachedsegError(f"{path} is neither a feature store (a Zarr folder from `cachedseg extract`) nor "
                                     "a run (a folder with best.pt/last.pt from `cachedseg train`, or a .pt file)")
            ckpt = checkpoint.load_run(path, which="last")  # the whole history; best.pt stops at its epoch
            best = runs.best_row(ckpt.metrics)
            params = sum(p.numel() for p in ckpt.decoder().parameters())
            rows = [("decoder", f"{ckpt.decoder_config.name} ({params:,} parameters)"),
                    ("features", f"{ckpt.spec.backbone} @ {ckpt.spec.input_size[1]}x{ckpt.spec.input_size[0]} px, "
                                 f"{ckpt.spec.dtype}, last {ckpt.decoder_config.layers} layer(s) of "
                                 f"{ckpt.spec.layers}, views {', '.join(ckpt.spec.views)}, "
                                 f"fingerprint {ckpt.spec.fingerprint}"),
                    ("recipe", ckpt.train_config.describe(ckpt.spec.layers)),
                    ("epochs trained", str(ckpt.epoch)),
                    ("best val", f"mIoU {best.val_miou:.4f}, pixel accuracy {best.val_pixel_acc:.4f} "
                                 f"(epoch {best.epoch})"),
                    ("weights", ckpt.weights),
                    ("trained on", (f"live features from {ckpt.source.removeprefix('live:')}"
                                    if ckpt.source.startswith("live:") else ckpt.source) or "not recorded")]
    # lines, not a table: a table wraps its title and cells to the terminal, and these paths are copied whole
    console.print(f"[bold]{escape(path)}[/]", soft_wrap=True)
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        console.print(f"  [bold]{escape(key.ljust(width))}[/]  {escape(str(value))}", soft_wrap=True, highlight=False)


@app.command()
def report(
    path: Path = typer.Argument(..., help="A run folder, or a sweep folder (with sweep.json)."),
    out: Optional[Path] = typer.Option(None, help="The HTML file (default: report.html in that folder)."),
    store: Optional[str] = typer.Option(None, help="Score from this store (default: the one the run was trained on)."),
    data: Optional[Path] = typer.Option(None, help="Run the backbone live on this dataset instead."),
    samples: int = typer.Option(4, help="Val images to show with their prediction and label."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Write one self-contained HTML page for a run (curves, per-class IoU, confusion matrix, val images with
    predictions, provenance) or for a sweep (all configs compared, each linked to its own page)."""
    def inputs() -> None:
        if not path.is_dir():
            raise CachedsegError(f"no run or sweep folder at {path}{paths.did_you_mean(path)}")
        folder = runs.RunFolder(path)
        if not folder.sweep_summary.is_file():
            paths.checkpoint_path(path)
        paths.check_writable(out or folder.report, "the report")
    _light_checks(inputs, _at_least(0, samples=samples))
    from cachedseg.report import report as run_report

    with user_errors(lambda: f"nothing was written; rerun {rerun()}"):
        written = run_report(path, out, store, data, samples, device)
    console.print(f"wrote [bold]{escape(str(written))}[/]", soft_wrap=True)


@app.command()
def upgrade(store: str = typer.Argument(..., help="A feature store written by an earlier cachedseg.")) -> None:
    """Convert an older feature store to the current format in place, keeping every computed feature."""
    _light_checks(lambda: paths.check_store(store))
    from cachedseg.upgrade import upgrade as run_upgrade

    with user_errors():
        result = run_upgrade(store)
    if not result["upgraded"]:
        console.print(f"{escape(store)} already has the current format; nothing to do", soft_wrap=True)
        return
    console.print(f"upgraded {escape(store)}: {result['images']} images, {result['done']} done, no features "
                  "recomputed", soft_wrap=True)
    if result["reset"]:
        errors.print(f"[bold yellow]{result['reset']} images[/] were flagged done but lacked a chunk; they are "
                     "pending now: rerun the `cachedseg extract` command that built the store", soft_wrap=True)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the demo's data, store, run and predictions."),
    count: int = typer.Option(32, help="Generated images (a quarter go to val)."),
    backbone: str = typer.Option("vit_base_patch14_dinov2", help=BACKBONE_HELP),
    image_size: Optional[str] = typer.Option(None, help=SIZE_HELP.split(" Default:")[0]
                                             + f" Default here: --short-side {DEMO_SHORT_SIDE}."),
    short_side: Optional[int] = typer.Option(None, help=SHORT_SIDE + f" Default here: {DEMO_SHORT_SIDE} (518 is "
                                             "the recipe's resolution; slower on a CPU)."),
    layers: int = typer.Option(1, help="Cache the last N blocks' tokens."),
    views: str = typer.Option("", help=VIEWS_HELP),
    decoder: str = typer.Option("conv", help=DECODER_HELP),
    epochs: int = typer.Option(11, help="Training epochs."),
    weights: str = typer.Option("auto", help=WEIGHTS_HELP + " 'auto' falls back to random when offline."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """The whole pipeline on generated data: synth -> extract -> train -> evaluate -> predict -> report."""
    import shutil

    from cachedseg.backbone import BackboneConfig, build_backbone, resolve_device
    from cachedseg.features import cached_source
    from cachedseg.store import is_store
    from cachedseg.train import TrainConfig

    data, store, run, preds = out / "data", out / "features.zarr", out / "run", out / "predictions"
    _light_checks(_at_least(2, count=count), _at_least(1, epochs=epochs, layers=layers, short_side=short_side),
                  lambda: paths.check_writable(out, "--out", folder=True))
    with user_errors():
        torch_device = resolve_device(device)
        if weights == "auto":
            try:
                build_backbone(BackboneConfig(backbone), "auto")
            except CachedsegError as exc:
                errors.print(f"[bold yellow]warning:[/] {escape(str(exc).split(';')[0])}.\n[bold yellow]Using random "
                             "backbone weights: the pipeline runs end to end, but its accuracy numbers mean little.[/]",
                             soft_wrap=True)
                weights = "random"
        console.rule("1/6 synth")
        if not Dataset(data).split_file("val").is_file():
            _synth(data, count, 1280, 720, 0)
        else:
            console.print(f"reusing {escape(str(data))}", soft_wrap=True)
        console.rule("2/6 extract")
        bcfg = _backbone_config(backbone, image_size, short_side or (None if image_size else DEMO_SHORT_SIDE),
                                "float32", layers, data)
        # the demo's own store is rebuilt each time: its options (or the weights the hub gave) may have changed
        _extract(data, store, bcfg, weights=weights, dtype="float16", batch_size=4, device=device,
                 overwrite=is_store(store), views=_views(views))
        console.rule("3/6 train")
        if run.exists():
            shutil.rmtree(run)  # the demo's own previous run
        rows = _train(cached_source(store), run, TrainConfig(epochs=epochs, decoder=decoder), torch_device, False,
                      "cached")
        console.rule("4/6 evaluate (native label resolution)")
        result = _evaluate(run, store=store, split="val", json_out=out / "evaluation.json", device=device)
        console.rule("5/6 predict")
        dataset = open_dataset(data)
        val_images = [dataset.image_path(i) for i in dataset.ids("val")[:4]]
        written = _predict(val_images, run, preds, device=device)
        console.rule("6/6 report")
        from cachedseg.report import report as run_report
        page = run_report(run, device=device)
    console.rule("done")
    size = f"{bcfg.image_size[1]}x{bcfg.image_size[0]}" if bcfg.image_size else "its pretrained size"
    console.print(_metrics_table(rows, f"{decoder} decoder, {backbone} at {size} px, weights: {weights}"))
    console.print(f"val at native resolution: mIoU {result.miou:.4f}, pixel accuracy {result.pixel_acc:.4f}")
    for p in written:
        console.print(f"  {escape(str(p.overlay))}", soft_wrap=True)
    console.print(f"run folder (checkpoints, metrics, curves.png): [bold]{escape(str(run))}[/]", soft_wrap=True)
    console.print(f"report: [bold]{escape(str(page))}[/]", soft_wrap=True)


if __name__ == "__main__":
    main()
