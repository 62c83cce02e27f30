"""The `cachedseg` command: a thin Typer layer. Each command checks the paths it was given (fast, before torch
loads), then calls one library function; Rich (progress, tables) lives here only."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from cachedseg import distributed, paths, runs
from cachedseg.backbone_config import DEFAULT_BACKBONE
from cachedseg.demo import DEMO_SHORT_SIDE, STAGES, DemoSteps
from cachedseg.dataset import choose_dataset, is_dataset, open_dataset
from cachedseg.errors import CachedsegError

app = typer.Typer(help="Semantic segmentation of drone imagery on a frozen DINOv2 backbone, with a feature cache.\n\n"
                  "Stage one, `extract`, runs the backbone once per image and caches its token grids in a Zarr store. "
                  "Stage two, `train`, trains only the decoder from that cache; `evaluate` and `predict` run it. "
                  "`demo` runs it all on generated data. Add --verbose anywhere for tracebacks.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _console(stderr: bool = False) -> Console:
    """A console that, when piped into a log, does not wrap long paths at 80 columns (and is quiet on the ranks
    other than 0 of a torchrun job, except for errors)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 240,
                   quiet=distributed.rank() > 0 and not stderr)


console, errors = _console(), _console(stderr=True)
_state = {"verbose": False}

BACKBONE_HELP = "timm DINOv2 model, e.g. vit_small_patch14_dinov2, vit_base_patch14_reg4_dinov2."
PRECISION_HELP = ("Backbone compute precision: float32; bfloat16/float16 autocast (faster on a GPU, and bfloat16 on "
                  "CPUs with native bf16); or onnxruntime: the float32 graph run by onnxruntime on the CPU (the "
                  "README's CPU speed). It is recorded in the store, and evaluate/predict run the backbone the same "
                  "way.")
WEIGHTS_HELP = ("'auto': pretrained via timm / the Hugging Face hub or its local cache; a .safetensors/.pth file; "
                "or 'random': a seeded random init for tests and offline demos.")
SIZE_HELP = ("Backbone input: one side (518: a square, as the seed design) or WIDTH x HEIGHT (924x518), multiples "
             "of 14. Default: --short-side at the model's size.")
SHORT_SIDE = ("Keep the dataset's aspect ratio: this short side (a multiple of 14), the long side the nearest "
              "multiple of 14 (1280x720 frames at 518 -> 924x518).")
SHORT_SIDE_HELP = SHORT_SIDE + " Default: the model's size, 518."
VIEWS_HELP = "Extra cached views, comma-separated: flip (one more forward pass and as much storage per view)."
DECODER_HELP = ("Decoder: conv (3x3 convs on the token grid; the best recipe measured), upconv (transposed convs, "
                "aligned), linear (BN + 1x1; with 4 layers DINOv2's linear4), or seed (the seed design's, with its "
                "center crop: the reproduction).")
DATASET_HELP = ("A dataset file (TOML: images glob, masks template, splits, classes and their colours; its paths are "
                "relative to its folder). Default: DATA/dataset.toml if there is one, else the AeroScapes layout.")
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
        rank = distributed.rank()
        if rank == 0 or not getattr(exc, "shared", False):  # a job-wide error is told once, by rank 0
            prefix = f"[rank {rank}] " if rank else ""
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
    dataset: Optional[Path] = typer.Option(None, help="Write in the layout, classes and mask encoding of this "
                                           "dataset file (copied into OUT as dataset.toml); the scenes' 12 classes "
                                           "are folded onto its classes by index."),
    maps: bool = typer.Option(False, "--maps", help="Write COUNT georeferenced orthomosaics of WIDTH x HEIGHT instead "
                              "(maps/*.tif, RGBA with a nodata footprint, 5 cm a pixel, EPSG:32633), their label "
                              "rasters (labels/*.tif) and a dataset.toml: half for trn, half for val. For extract "
                              "--tile."),
    vector_labels: bool = typer.Option(False, "--vector-labels", help="With --maps: the labels as one GeoPackage "
                                       "of class polygons (labels.gpkg, field class) instead of label rasters."),
) -> None:
    """Write a generated drone-imagery dataset in the AeroScapes layout (the built-in default data), or generated
    orthomosaics with --maps."""
    _light_checks(lambda: paths.check_writable(out, "the dataset folder", folder=True),
                  lambda: dataset is not None and open_dataset(choose_dataset(None, dataset)),
                  _at_least(1, count=count))
    with user_errors():
        if vector_labels and not maps:
            raise CachedsegError("--vector-labels writes the labels of generated maps; give --maps too")
        if maps and dataset is not None:
            raise CachedsegError("--maps writes its own dataset.toml; leave out --dataset")
        _synth(out, count, width, height, seed, dataset, maps, vector_labels)


def _synth(out: Path, count: int, width: int, height: int, seed: int, dataset: Optional[Path] = None,
           maps: bool = False, vector_labels: bool = False) -> None:
    """Generate the dataset with progress, and say where it went."""
    from cachedseg.synth import synthesize

    with Reporter() as reporter:
        progress, done = reporter.callback("synth"), [0]

        def step(n: int) -> None:
            done[0] += n
            progress(done[0], count)
        try:
            if maps:
                from cachedseg.synth_maps import synth_map_dataset
                ids = synth_map_dataset(out, count, width, height, seed, vector_labels=vector_labels, progress=step)
            else:
                ids = synthesize(out, count=count, width=width, height=height, seed=seed, progress=step,
                                 dataset_file=dataset)
        except ValueError as exc:
            raise CachedsegError(str(exc)) from None
    console.print(f"wrote {len(ids)} {'maps' if maps else 'images'} ({width}x{height}) to "
                  f"[bold]{escape(str(out))}[/]", soft_wrap=True)


@app.command()
def extract(
    data: Optional[Path] = typer.Argument(None, help="Dataset folder (AeroScapes layout: JPEGImages/, SegmentationClass/, ImageSets/{trn,val}.txt; or one with a dataset.toml), or a dataset file."),
    dataset: Optional[Path] = typer.Option(None, help=DATASET_HELP),
    store: Optional[str] = typer.Option(None, help="Store to write: a folder or a URL such as s3://bucket/x.zarr (default: cache/<data>-<backbone>-<size>-<dtype>.zarr)."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help=BACKBONE_HELP),
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
    tile: Optional[str] = typer.Option(None, "--tile", help="Cut every image into windows of SIZE (one side, or "
                                       "WIDTHxHEIGHT), the backbone's input in pixels (after --gsd), each one item of "
                                       "the store: for orthomosaics (GeoTIFFs) and frames too large to resize whole. "
                                       "Windows wholly outside the map are skipped."),
    tile_overlap: Optional[int] = typer.Option(None, help="With --tile: pixels neighbouring windows share "
                                               "(default: an eighth of the window in whole patches, 70 at 518)."),
    gsd: Optional[float] = typer.Option(None, help="With --tile: resample georeferenced rasters to this ground "
                                        "sample distance, in metres a pixel, first (bilinear; labels nearest). "
                                        "Default: pixels as they are."),
):
    """Run the frozen backbone once per image and cache its token grids in a Zarr store.

    Rerunning the same command skips finished images, so an interrupted run resumes where it stopped, and
    follows the data: changed images and masks are recomputed, newly listed ids added, removed ones left out.
    """
    with user_errors():
        data = choose_dataset(data, dataset)
        if tile is not None and (image_size or short_side):
            raise CachedsegError("--tile SIZE is the backbone's input; leave out --image-size and --short-side")
    _light_checks(lambda: open_dataset(data), _at_least(1, batch_size=batch_size, layers=layers,
                  images_per_shard=images_per_shard, short_side=short_side),
                  _at_least(0, workers=workers, tile_overlap=tile_overlap))
    from cachedseg.backbone import config_from_options, tiling_from_options

    with user_errors():
        tiling = tiling_from_options(backbone, tile, tile_overlap, gsd)
        config = config_from_options(backbone, data, tile or image_size, short_side, precision, layers)
        return _extract(data, store, config, weights=weights, dtype=dtype, batch_size=batch_size, device=device,
                        workers=workers, overwrite=overwrite, skip_bad=skip_bad, redo=tuple(redo or ()),
                        views=_views(views), images_per_shard=images_per_shard, tiling=tiling)


def _extract(data, store, backbone, **options):
    """Run `cachedseg.extract.extract` with progress, then print its summary."""
    from cachedseg.extract import extract as run_extract

    with Reporter() as reporter:
        result = run_extract(data, store, backbone, progress=reporter.callback("extract"), **options)
    # the store path on a line of its own, never wrapped: it is the string users copy into the next command
    console.print(f"feature store [bold]{escape(result.store)}[/]", soft_wrap=True)
    table = Table(show_header=False)
    unit = "windows" if result.rasters else "img"
    speed = f"{result.images_per_s:.2f} {unit}/s" if result.extracted else "nothing to extract"
    changed = [f"{n} {what}" for n, what in [(result.changed, "images recomputed"),
                                             (result.masks_changed, "masks rewritten (image unchanged)"),
                                             (result.touched, "touched but unchanged")] if n]
    counted = (f"{result.images} ({result.extracted} extracted, {result.skipped} already done)" if not result.rasters
               else f"{result.images} from {result.rasters} images ({result.extracted} extracted, {result.skipped} "
                    f"already done; {result.empty} outside the map, not stored)")
    for key, value in [("windows" if result.rasters else "images", counted),
                       ("changed files", ", ".join(changed)),
                       ("newly listed", f"{result.added} images added to the store" if result.added else ""),
                       ("moved split", f"{result.moved} images" if result.moved else ""),
                       ("time", f"{result.seconds:.1f} s ({speed})"),
                       ("size on disk", f"{result.bytes_on_disk / 1e6:.1f} MB ({result.mb_per_image:.2f} MB per "
                                        f"{'window' if result.rasters else 'image'})")]:
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
    live: Optional[Path] = typer.Option(None, help="Baseline: compute features live from this dataset folder (or dataset file) instead of a store."),
    dataset: Optional[Path] = typer.Option(None, help="With --live (which it implies): " + DATASET_HELP),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="With --live: " + BACKBONE_HELP),
    image_size: Optional[str] = typer.Option(None, help="With --live: " + SIZE_HELP),
    short_side: Optional[int] = typer.Option(None, help="With --live: " + SHORT_SIDE_HELP),
    views: str = typer.Option("", help="With --live: " + VIEWS_HELP),
    weights: str = typer.Option("auto", help="With --live: " + WEIGHTS_HELP),
    precision: str = typer.Option("float32", help="With --live: " + PRECISION_HELP),
    dtype: str = typer.Option("float16", help="With --live: cast features to this dtype, as a cache would store them."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    logger: Optional[list[str]] = typer.Option(None, help="Also log to this experiment tracker: tensorboard (event "
                                               "files in the run folder) or mlflow (MLFLOW_TRACKING_URI, default a "
                                               "store in the run folder); repeat for both."),
    config: Optional[Path] = typer.Option(None, is_eager=True, callback=lambda ctx, param, value: _config_file(
        ctx, value), help="Read options from this TOML file (keys: the option names, e.g. epochs = 11, "
                          "store = \"cache/x.zarr\"); options given on the line win. Every run folder holds the "
                          "config.toml that trains it again."),
) -> list[runs.EpochMetrics]:
    """Train the decoder from cached features (or, with --live, from the images), validating each epoch.

    The run folder gets last.pt, best.pt (by val mIoU), metrics.csv, metrics.json and curves.png.
    """
    def inputs() -> None:
        nonlocal live
        if live is not None or dataset is not None:
            live = choose_dataset(live, dataset)
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
    loggers = tuple(name for entry in logger or () for name in entry.split(",") if name)

    def trackers() -> None:
        from cachedseg.trackers import check_loggers
        check_loggers(loggers)
    _light_checks(inputs, _at_least(1, epochs=epochs, batch_size=batch_size, short_side=short_side),
                  _at_least(0, workers=workers), recipe, trackers)
    from cachedseg.backbone import build_backbone, config_from_options, resolve_device
    from cachedseg.features import cached_source, live_source
    from cachedseg.recipe import parse_class_weights
    from cachedseg.sweep import plan
    from cachedseg.train import TrainConfig

    # a rerun without --resume is refused (the run folder holds a run now): name the command that continues
    with user_errors(lambda: f"last.pt holds the last finished epoch; continue with {rerun('--resume')}"):
        base = TrainConfig(epochs=epochs, batch_size=batch_size, data_seed=data_seed, workers=workers,
                           decoder_precision=decoder_precision, channels_last=channels_last, compile=compile_,
                           loss=loss, class_weights=parse_class_weights(class_weights))
        todo = plan(base, lr, decoder, seed, layers, store=store, live=live, run=run)
        torch_device = resolve_device(device)
        if live is not None:
            config = config_from_options(backbone, live, image_size, short_side, precision, todo.max_layers)
            source = live_source(live, build_backbone(config, weights, torch_device), dtype, weights, _views(views))
        else:
            source = cached_source(store, in_memory=in_memory, device=torch_device)
            if in_memory:
                console.print(f"features {source.dataset.where}")
        kind = "live" if live else "cached"
        if todo.is_sweep:
            return _sweep(source, todo.run, todo.configs, torch_device, resume, kind, loggers)
        return _train(source, todo.run, todo.configs[0], torch_device, resume, kind, loggers)


def _config_file(ctx: typer.Context, path: Optional[Path]) -> Optional[Path]:
    """`train --config FILE`: the file's options become the defaults of this command (the line's own win)."""
    if path is not None:
        with user_errors():
            from cachedseg.runs import read_config
            names = {p.name: p for p in ctx.command.params}
            ctx.default_map = {**(ctx.default_map or {}), **read_config(path, names)}
    return path


def _sweep(source, run: Path, configs, device, resume: bool, kind: str, loggers: tuple[str, ...] = ()):
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
                           log=lambda message: reporter.print(f"[yellow]note:[/] {escape(message)}"), loggers=loggers)
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


def _train(source, run: Path, config, device, resume: bool, kind: str,
           loggers: tuple[str, ...] = ()) -> list[runs.EpochMetrics]:
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
                         log=lambda message: reporter.print(f"[yellow]note:[/] {escape(message)}"), loggers=loggers)
    best = runs.best_row(rows)
    console.print(f"best val mIoU {best.val_miou:.4f} (epoch {best.epoch}); checkpoints, metrics and "
                  f"curves.png in [bold]{escape(str(run))}[/]", soft_wrap=True)
    return rows


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder (uses best.pt) or a checkpoint file."),
    store: Optional[str] = typer.Option(None, help="Score from cached features in this store (default, with no --data "
                                        "either: the features the run was trained on)."),
    data: Optional[Path] = typer.Option(None, help="Dataset folder or file: run the backbone live (or, with --store, where the labels are)."),
    dataset: Optional[Path] = typer.Option(None, help="As --data: " + DATASET_HELP),
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
    with user_errors():
        data = choose_dataset(data, dataset) if data is not None or dataset is not None else None
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
    images: list[Path] = typer.Argument(..., help="Image files and/or folders of images; GeoTIFF maps too."),
    run: Optional[Path] = typer.Option(None, "--run", "--run-dir", help="Run folder (uses best.pt) or a checkpoint "
                                       "file."),
    out: Path = typer.Option(Path("predictions"), help="Output folder."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights (default: those the run was trained with); "
                                          "they must give the run's backbone fingerprint."),
    tta: bool = typer.Option(False, "--tta", help="Average the logits of every view the run's store cached (e.g. flipped)."),
    batch_size: int = typer.Option(4, help="Images (or windows) per forward pass."),
    workers: Optional[int] = typer.Option(None, help="Processes decoding images (default: 0 on a CPU, min(4, CPUs) on a GPU)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    tile: bool = typer.Option(False, "--tile", help="Predict frames by sliding windows of the run's input size, "
                              "pixels as they are (no resize, no 100-megapixel limit), and take every TIFF as a map."),
    tile_overlap: Optional[int] = typer.Option(None, help="Pixels neighbouring windows share, blended smoothly "
                                               "(default: an eighth of the window in whole patches, 14 at 112)."),
    polygons: bool = typer.Option(False, "--polygons", help="Also write <name>.gpkg per map: one polygon per "
                                  "connected region, with class_id and class_name, in the map's CRS."),
    min_area: float = typer.Option(0.0, help="With --polygons: leave out regions smaller than this, in m² (pixels "
                                   "for a map without a CRS); the label raster keeps them."),
    simplify: float = typer.Option(0.0, help="With --polygons: simplify outlines to this tolerance, in CRS units "
                                   "(neighbouring outlines may then no longer meet exactly)."),
    store: Optional[str] = typer.Option(None, help="A store extracted with --tile that holds the images: predict them "
                                        "from its cached windows, without the backbone (a new head re-predicts a "
                                        "whole map in seconds)."),
    model: Optional[Path] = typer.Option(None, help="Instead of --run-dir: an ONNX model `cachedseg export` wrote, "
                                         "run by onnxruntime."),
):
    """Segment images live (backbone + decoder): writes <name>_label.png, and _color.png and _overlay.png with a
    legend of the classes shown, per image. A map (a GeoTIFF with a CRS, one over 100 megapixels, or any TIFF with
    --tile) is predicted by sliding windows into <name>_label.tif, a cloud-optimised GeoTIFF on the map's grid, and
    with --polygons <name>.gpkg. A run trained on windows (extract --tile) predicts by its windows, overlap and GSD;
    with --store, from the store's cached windows instead of the backbone."""
    def source() -> None:
        if (run is None) == (model is None):
            raise CachedsegError("give a run (--run-dir RUN) or an exported model (--model model.onnx)")
        if run is not None:
            paths.checkpoint_path(run)
    _light_checks(lambda: paths.check_images(images), source,
                  lambda: store is not None and paths.check_store(store),
                  _at_least(1, batch_size=batch_size), _at_least(0, workers=workers, tile_overlap=tile_overlap),
                  lambda: paths.check_writable(out, "--out", folder=True))
    from cachedseg.map_outputs import PolygonOptions

    with user_errors(lambda: f"the images written so far are kept; rerun {rerun()} to redo them all"):
        options = PolygonOptions(min_area, simplify) if polygons else None
        return _predict(images, run, out, weights=weights, device=device, tta=tta, batch_size=batch_size,
                        workers=workers, tile=tile, tile_overlap=tile_overlap, polygons=options, store=store,
                        model=model)


def _predict(images, run, out: Path, **options):
    """Run `cachedseg.predict.predict` with progress and say what was written (and what was replaced)."""
    from cachedseg.maps import MapPrediction
    from cachedseg.predict import predict as run_predict

    with Reporter() as reporter:
        written = run_predict(images, run, out, progress=reporter.callback("predict"),
                              window_progress=reporter.callback("windows"), **options)
    maps = [p for p in written if isinstance(p, MapPrediction)]
    frames = [p for p in written if not isinstance(p, MapPrediction)]
    replaced = sum(p.replaced for p in frames)
    if frames or not maps:
        console.print(f"wrote {3 * len(frames)} PNGs for {len(frames)} images to [bold]{escape(str(out))}[/]"
                      + (f", replacing the earlier files of {replaced} of them" if replaced else ""), soft_wrap=True)
    for p in maps:
        console.print(f"wrote {escape(str(p.label))} ({p.windows} windows)"
                      + (f" and {escape(str(p.polygons))} ({p.features} polygons)" if p.polygons else "")
                      + (", replacing earlier files" if p.replaced else ""), soft_wrap=True)
    if written.left_out:
        shown = ", ".join(p.name for p in written.left_out[:3]) + (", ..." if len(written.left_out) > 3 else "")
        console.print(f"left out {len(written.left_out)} files that cachedseg wrote itself ({escape(shown)}): "
                      "predictions are never inputs", soft_wrap=True)
    return written


@app.command()
def info(
    path: Optional[str] = typer.Argument(None, help="A feature store (folder or URL), a run folder / checkpoint file, "
                                         "or a dataset (folder or dataset file)."),
    dataset: Optional[Path] = typer.Option(None, help="Survey this dataset file: " + DATASET_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="For a dataset: write the survey here as JSON."),
) -> None:
    """Show what a feature store holds (settings, images done/pending/bad, size), what a run was trained on, or
    what a dataset holds before extraction (images per split, sizes, masks missing, class shares, problems)."""
    if dataset is not None or (path is not None and not paths.is_url(path) and is_dataset(path)):
        with user_errors():
            data = choose_dataset(path, dataset)
        _light_checks(lambda: open_dataset(data), lambda: json_out is not None and paths.check_writable(json_out, "--json"))
        with user_errors():
            return _info_dataset(open_dataset(data), json_out)
    if path is None:
        _light_checks(lambda: choose_dataset(None, None))

    def exists() -> None:
        if paths.is_url(path):  # only a store can live at a URL
            paths.check_store(path)
        elif not Path(path).exists():
            raise CachedsegError(f"nothing at {path} (expected a feature store or a run folder)"
                                 f"{paths.did_you_mean(Path(path))}")
    _light_checks(exists)
    from cachedseg.info import describe

    with user_errors():
        rows = describe(path)
    _print_rows(path, rows)


def _print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    """`info`'s rows under their title: lines, not a table, which would wrap its title and cells to the terminal
    (and these paths are copied whole)."""
    console.print(f"[bold]{escape(title)}[/]", soft_wrap=True)
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        console.print(f"  [bold]{escape(key.ljust(width))}[/]  {escape(value)}", soft_wrap=True, highlight=False)


def _info_dataset(data, json_out: Optional[Path]):
    """Survey a dataset with progress and print what a user checks before extracting it."""
    import json

    from cachedseg.info import survey_rows
    from cachedseg.survey import survey

    with Reporter("mask") as reporter:
        result = survey(data, progress=reporter.callback("survey"))
    _print_rows(result.dataset, survey_rows(result))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_json(), indent=2))
        console.print(f"wrote {escape(str(json_out))}", soft_wrap=True)
    return result


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
def export(
    run: Path = typer.Argument(..., help="Run folder (uses best.pt) or a checkpoint file."),
    out: Path = typer.Option(Path("model.onnx"), help="The ONNX file to write."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights (default: those the run was trained with); "
                                          "they must give the run's backbone fingerprint."),
    device: str = typer.Option("cpu", help="Where PyTorch runs for the export and the check: cpu or cuda."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset (default: the exporter's)."),
) -> None:
    """Export a run's backbone and head as one ONNX graph (input: the normalised image [N, 3, H, W]; output: class
    probabilities [N, K, H, W]) with its classes, normalisation, tile size and GSD in the metadata (the keys QGIS's
    Deepness plugin reads). The graph is checked with onnxruntime against PyTorch first; one that fails is not
    written."""
    _light_checks(lambda: paths.checkpoint_path(run), lambda: paths.check_writable(out, "--out"))
    with user_errors(lambda: "nothing was written"):
        from cachedseg.export import export as run_export

        console.print(f"exporting {escape(str(run))} (backbone and head) to ONNX ...", soft_wrap=True)
        result = run_export(run, out, weights=weights, device=device, opset=opset)
    (h, w) = result.input_size
    console.print(f"wrote [bold]{escape(str(result.path))}[/] ({result.megabytes:.1f} MB): input [N, 3, {h}, {w}], "
                  f"output [N, {json_len(result.metadata['class_names'])}, {h}, {w}] probabilities", soft_wrap=True)
    console.print(f"checked with onnxruntime against PyTorch on {result.pixels} pixels of generated scenes: largest "
                  f"probability difference {result.max_difference:.2g}, labels agree on {result.agreement:.6f}")
    return result


def json_len(text: str) -> int:
    """The number of entries of a JSON object or list."""
    import json
    return len(json.loads(text))


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


class _ShownDemo(DemoSteps):
    """The demo's stages with the progress and summaries the commands themselves show."""

    def stage(self, number: int, title: str) -> None:
        console.rule(f"{number}/{len(STAGES)} {title}")

    def fallback(self, reason: str) -> None:
        errors.print(f"[bold yellow]warning:[/] {escape(reason.split(';')[0])}.\n[bold yellow]Using random backbone "
                     "weights: the pipeline runs end to end, but its accuracy numbers mean little.[/]", soft_wrap=True)

    def reuse(self, data: Path) -> None:
        console.print(f"reusing {escape(str(data))}", soft_wrap=True)

    def synth(self, out, count, width, height, seed):
        return _synth(out, count, width, height, seed)

    def extract(self, data, store, backbone, **options):
        return _extract(data, store, backbone, **options)

    def train(self, source, run, config, device):
        return _train(source, run, config, device, False, "cached")

    def evaluate(self, run, json_out, **options):
        return _evaluate(run, json_out=json_out, **options)

    def predict(self, images, run, out, **options):
        return _predict(images, run, out, **options)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the demo's data, store, run and predictions."),
    count: int = typer.Option(32, help="Generated images (a quarter go to val)."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help=BACKBONE_HELP),
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
    from cachedseg.demo import DemoConfig, demo as run_demo

    _light_checks(_at_least(2, count=count), _at_least(1, epochs=epochs, layers=layers, short_side=short_side),
                  lambda: paths.check_writable(out, "--out", folder=True))
    with user_errors():
        config = DemoConfig(count=count, backbone=backbone, image_size=image_size, short_side=short_side,
                            layers=layers, views=_views(views), decoder=decoder, epochs=epochs, weights=weights,
                            device=device)
        result = run_demo(out, config, _ShownDemo())
    console.rule("done")
    bcfg = result.backbone
    size = f"{bcfg.image_size[1]}x{bcfg.image_size[0]}" if bcfg.image_size else "its pretrained size"
    console.print(_metrics_table(result.rows, f"{decoder} decoder, {backbone} at {size} px, weights: {result.weights}"))
    console.print(f"val at native resolution: mIoU {result.evaluation.miou:.4f}, pixel accuracy "
                  f"{result.evaluation.pixel_acc:.4f}")
    for p in result.predictions:
        console.print(f"  {escape(str(p.overlay))}", soft_wrap=True)
    console.print(f"run folder (checkpoints, metrics, curves.png): [bold]{escape(str(result.run))}[/]", soft_wrap=True)
    console.print(f"report: [bold]{escape(str(result.report))}[/]", soft_wrap=True)


if __name__ == "__main__":
    main()
