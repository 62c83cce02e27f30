"""The `cachedseg` command: a thin Typer layer. Each command parses options and calls one library function;
Rich (progress bars, tables) lives here only."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from cachedseg.errors import CachedsegError

app = typer.Typer(help="Semantic segmentation of drone imagery on a frozen DINOv2 backbone, with a feature cache.\n\n"
                  "Stage one, `extract`, runs the backbone once per image and caches its token grids in a Zarr store. "
                  "Stage two, `train`, trains only the decoder from that cache; `evaluate` and `predict` run it. "
                  "`demo` runs it all on generated data.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
errors = Console(stderr=True)
_state = {"verbose": False}

BACKBONE_HELP = "timm DINOv2 model, e.g. vit_small_patch14_dinov2, vit_base_patch14_reg4_dinov2."
PRECISION_HELP = ("Backbone compute precision: float32, or bfloat16/float16 autocast (faster on a GPU). It is "
                  "recorded in the store, and evaluate/predict run the backbone at the same precision.")
WEIGHTS_HELP = ("'auto': pretrained via timm / the Hugging Face hub or its local cache; a .safetensors/.pth file; "
                "or 'random': a seeded random init for tests and offline demos.")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks for errors.")) -> None:
    """Semantic segmentation of drone imagery on a frozen DINOv2 backbone, with a feature cache."""
    _state["verbose"] = verbose


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a CachedsegError into a one-line message and exit code 1 (a traceback only with --verbose)."""
    try:
        yield
    except CachedsegError as exc:
        if _state["verbose"]:
            raise
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/]: finished work is kept; rerun the same command to continue")
        raise typer.Exit(130) from None


class RateColumn(ProgressColumn):
    """Items per second, from Rich's own speed estimate."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f} {self.unit}/s", style="cyan")


def progress_bar(unit: str = "img") -> Progress:
    """The progress bar every long command shows."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    transient=True)  # gone when done: the summary that follows says what happened


def progress_callback(bar: Progress, description: str):
    """A `progress(done, total)` callback that adds its task on first call, so failures show no empty bar."""
    tasks: list = []

    def update(done: int, total: int) -> None:
        if not tasks:
            tasks.append(bar.add_task(description, total=total))
        bar.update(tasks[0], completed=done, total=total)

    return update


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the dataset into (AeroScapes layout)."),
    count: int = typer.Option(24, "--count", "-n", help="Number of images."),
    width: int = typer.Option(1280, help="Image width in pixels."),
    height: int = typer.Option(720, help="Image height in pixels."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same files."),
) -> None:
    """Write a generated drone-imagery dataset in the AeroScapes layout (the built-in default data)."""
    from cachedseg.synth import synthesize

    with user_errors(), progress_bar() as bar:
        task = bar.add_task("synth", total=count)
        try:
            ids = synthesize(out, count=count, width=width, height=height, seed=seed,
                             progress=lambda n: bar.advance(task, n))
        except ValueError as exc:
            raise CachedsegError(str(exc)) from None
    console.print(f"wrote {len(ids)} images ({width}x{height}) to [bold]{out}[/]")


@app.command()
def extract(
    data: Path = typer.Argument(..., help="Dataset folder: JPEGImages/, SegmentationClass/, ImageSets/{trn,val}.txt."),
    store: Optional[Path] = typer.Option(None, help="Store to write (default: cache/<data>-<backbone>-<size>-<dtype>.zarr)."),
    backbone: str = typer.Option("vit_base_patch14_dinov2", help=BACKBONE_HELP),
    image_size: Optional[int] = typer.Option(None, help="Square input side in px, a multiple of 14 (default: the model's, 518)."),
    weights: str = typer.Option("auto", help=WEIGHTS_HELP),
    precision: str = typer.Option("float32", help=PRECISION_HELP),
    dtype: str = typer.Option("float16", help="Feature storage dtype: float16 (half the size) or float32 (bit-exact)."),
    batch_size: int = typer.Option(4, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    workers: Optional[int] = typer.Option(None, help="Image-decoding worker processes (default: min(4, CPUs))."),
    overwrite: bool = typer.Option(False, help="Rebuild a store made with other settings instead of refusing it."),
    skip_bad: bool = typer.Option(False, help="Record unreadable images in the store, with the reason, and carry on."),
    redo: Optional[list[str]] = typer.Option(None, help="Recompute this image id (repeatable), e.g. after a checksum error."),
):
    """Run the frozen backbone once per image and cache its token grids in a Zarr store.

    Rerunning the same command skips finished images, so an interrupted run resumes where it stopped.
    """
    from cachedseg.backbone import BackboneConfig
    from cachedseg.extract import extract as run_extract

    with user_errors(), progress_bar() as bar:
        result = run_extract(data, store, BackboneConfig(backbone, image_size, precision), weights=weights, dtype=dtype,
                             batch_size=batch_size, device=device, workers=workers, overwrite=overwrite,
                             skip_bad=skip_bad, redo=tuple(redo or ()), progress=progress_callback(bar, "extract"))
    table = Table(title=f"feature store {result.store}", show_header=False)
    for key, value in [("images", f"{result.images} ({result.extracted} extracted, {result.skipped} already done)"),
                       ("time", f"{result.seconds:.1f} s ({result.images_per_s:.2f} img/s)"),
                       ("size on disk", f"{result.bytes_on_disk / 1e6:.1f} MB ({result.mb_per_image:.2f} MB/img)")]:
        table.add_row(key, value)
    console.print(table)
    if result.bad:
        errors.print(f"[bold yellow]{len(result.bad)} unreadable images skipped[/] (recorded in the store's `bad` "
                     "attribute; fix them and rerun to add them):", soft_wrap=True)
        for id_, reason in result.bad.items():
            errors.print(f"  {escape(id_)}: {escape(reason)}", soft_wrap=True)
    return result


def _metrics_table(rows: list[dict], title: str) -> Table:
    """The seed's results table: epoch, training loss, validation mIoU, pixel accuracy, time."""
    table = Table(title=title)
    for name in ("Epoch", "Training loss", "Validation mIoU", "Pixel accuracy", "Seconds"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['val_miou']:.4f}", f"{r['val_pixel_acc']:.4f}",
                      f"{r['seconds']:.1f}")
    return table


@app.command()
def train(
    store: Optional[Path] = typer.Argument(None, help="Feature store from `cachedseg extract` (omit with --live)."),
    run: Optional[Path] = typer.Option(None, help="Run folder (default: runs/<store or data>-<decoder>)."),
    epochs: int = typer.Option(11, help="Epochs."),
    lr: float = typer.Option(1e-4, help="Adam learning rate."),
    batch_size: int = typer.Option(2, help="Images per step."),
    decoder: str = typer.Option("seed", help="Decoder: seed (transposed convs, the seed design) or linear (BN + 1x1 conv)."),
    seed: int = typer.Option(0, help="Seed for the decoder's initialisation and the shuffling."),
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes (default: 0 on a CPU, min(4, CPUs) on a GPU)."),
    in_memory: bool = typer.Option(False, "--in-memory", help="Load the whole cache into RAM first (if it fits)."),
    resume: bool = typer.Option(False, help="Continue the run from its last checkpoint."),
    live: Optional[Path] = typer.Option(None, help="Baseline: compute features live from this dataset folder instead of a store."),
    backbone: str = typer.Option("vit_base_patch14_dinov2", help="With --live: " + BACKBONE_HELP),
    image_size: Optional[int] = typer.Option(None, help="With --live: input side in px (default: the model's)."),
    weights: str = typer.Option("auto", help="With --live: " + WEIGHTS_HELP),
    precision: str = typer.Option("float32", help="With --live: " + PRECISION_HELP),
    dtype: str = typer.Option("float16", help="With --live: cast features to this dtype, as a cache would store them."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> list[dict]:
    """Train the decoder from cached features (or, with --live, from the images), validating each epoch.

    The run folder gets last.pt, best.pt (by val mIoU), metrics.csv, metrics.json and curves.png.
    """
    from cachedseg.backbone import BackboneConfig, build_backbone, resolve_device
    from cachedseg.features import cached_source, live_source
    from cachedseg.train import TrainConfig, train as run_train

    with user_errors():
        if (store is None) == (live is None):
            raise CachedsegError("give either a STORE or --live DATA")
        torch_device = resolve_device(device)
        if live is not None:
            model = build_backbone(BackboneConfig(backbone, image_size, precision), weights, torch_device)
            source = live_source(live, model, dtype, weights)
        else:
            source = cached_source(store, in_memory=in_memory)
        name = Path(store).stem if store is not None else f"{Path(live).resolve().name}-live"
        run = run or Path("runs") / f"{name}-{decoder}"
        config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, decoder=decoder, seed=seed, workers=workers)
        console.print(f"training [bold]{decoder}[/] decoder on {'live' if live else 'cached'} "
                      f"{source.spec.backbone} features ({source.spec.dtype}) -> {run}")
        console.print(f"{'Epoch':>5} {'Training loss':>14} {'Validation mIoU':>16} {'Pixel accuracy':>15} {'Seconds':>8}")
        with progress_bar("batch") as bar:
            def on_epoch(r: dict) -> None:
                bar.console.print(f"{r['epoch']:>5} {r['train_loss']:>14.4f} {r['val_miou']:>16.4f} "
                                  f"{r['val_pixel_acc']:>15.4f} {r['seconds']:>8.1f}")

            task = bar.add_task("epoch", total=None)
            rows = run_train(source, run, config, torch_device, resume=resume, on_epoch=on_epoch,
                             progress=lambda done, total: bar.update(task, completed=done, total=total))
            bar.remove_task(task)
    best = max(rows, key=lambda r: r["val_miou"])
    console.print(f"best val mIoU {best['val_miou']:.4f} (epoch {best['epoch']}); checkpoints, metrics and "
                  f"curves.png in [bold]{run}[/]")
    return rows


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder (uses best.pt) or a checkpoint file."),
    store: Optional[Path] = typer.Option(None, help="Score from cached features in this store."),
    data: Optional[Path] = typer.Option(None, help="Dataset folder: run the backbone live (or, with --store, where the labels are)."),
    split: str = typer.Option("val", help="trn or val."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the confusion matrix and scores here."),
    weights: Optional[str] = typer.Option(None, help="Live only: backbone weights (default: those the run was trained with)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """Score a run against the dataset's label PNGs at native resolution: confusion matrix, mIoU, pixel accuracy."""
    import json

    from cachedseg.evaluate import evaluate as run_evaluate

    with user_errors(), progress_bar() as bar:
        result = run_evaluate(run, store=store, data=data, split=split, weights=weights, device=device,
                              progress=progress_callback(bar, "evaluate"))
    table = Table(title=f"{split}: mIoU {result.miou:.4f}, pixel accuracy {result.pixel_acc:.4f} ({result.images} images)")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("pixels", justify="right")
    for name, iou, pixels in zip(result.class_names, result.iou, result.confusion.sum(1)):
        table.add_row(name, "-" if iou is None else f"{iou:.4f}", str(int(pixels)))
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(result.to_json(), indent=2))
        console.print(f"wrote {json_out}")
    return result


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files and/or folders of images."),
    run: Path = typer.Option(..., help="Run folder (uses best.pt) or a checkpoint file."),
    out: Path = typer.Option(Path("predictions"), help="Output folder."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights (default: those the run was trained with); "
                                          "they must give the run's backbone fingerprint."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """Segment images live (backbone + decoder): writes <name>_label.png, _color.png and _overlay.png per image."""
    from cachedseg.predict import predict as run_predict

    with user_errors(), progress_bar() as bar:
        written = run_predict(images, run, out, weights=weights, device=device,
                              progress=progress_callback(bar, "predict"))
    console.print(f"wrote {3 * len(written)} PNGs for {len(written)} images to [bold]{out}[/]")
    return written


@app.command()
def info(path: Path = typer.Argument(..., help="A feature store or a run folder / checkpoint.")) -> None:
    """Show what a feature store holds (settings, images done/pending/bad, size) or what a run was trained on."""
    from cachedseg.store import describe, is_store
    from cachedseg.train import load_checkpoint

    with user_errors():
        table = Table(title=str(path), show_header=False)
        if is_store(path):
            d = describe(path)
            rows = [("backbone", f"{d['backbone']} @ {d['image_size']} px, precision {d['precision']}"),
                    ("features", f"[N, {d['channels']}, {d['grid'][0]}, {d['grid'][1]}] {d['dtype']}"),
                    ("masks", f"{d['mask_size']}x{d['mask_size']} uint8"),
                    ("images", f"{d['images']} ({d['trn']} trn, {d['val']} val): {d['done']} done, "
                               f"{d['pending']} pending, {d['skipped_bad']} skipped as bad"),
                    ("size on disk", f"{d['bytes_on_disk'] / 1e6:.1f} MB ({d['bytes_on_disk'] / 1e6 / max(d['images'], 1):.2f} MB/img)"),
                    ("fingerprint", d["fingerprint"]), ("weights", d["weights"]), ("dataset", d["dataset"]),
                    ("format", f"{d['format']} v{d['format_version']}, cachedseg {d['package_version']}")]
            rows += [(f"bad: {k}", v) for k, v in d.get("bad", {}).items()]
        else:
            ckpt = load_checkpoint(path, which="last")  # the whole history; best.pt stops at its epoch
            best = max(ckpt.metrics, key=lambda r: r["val_miou"])
            rows = [("decoder", f"{ckpt.decoder_config.name} ({sum(p.numel() for p in ckpt.decoder.parameters()):,} parameters)"),
                    ("features", f"{ckpt.spec.backbone} @ {ckpt.spec.image_size} px, {ckpt.spec.dtype}, "
                                 f"fingerprint {ckpt.spec.fingerprint}"),
                    ("recipe", ", ".join(f"{k} {v}" for k, v in ckpt.train_config.__dict__.items())),
                    ("epochs trained", str(ckpt.epoch)),
                    ("best val", f"mIoU {best['val_miou']:.4f}, pixel accuracy {best['val_pixel_acc']:.4f} "
                                 f"(epoch {best['epoch']})"),
                    ("weights", ckpt.weights)]
        for key, value in rows:
            table.add_row(key, escape(str(value)))
    console.print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the demo's data, store, run and predictions."),
    count: int = typer.Option(32, help="Generated images (a quarter go to val)."),
    backbone: str = typer.Option("vit_base_patch14_dinov2", help=BACKBONE_HELP),
    image_size: int = typer.Option(224, help="Backbone input side in px (518 is the seed's; slower on a CPU)."),
    decoder: str = typer.Option("seed", help="seed or linear."),
    epochs: int = typer.Option(11, help="Training epochs."),
    weights: str = typer.Option("auto", help=WEIGHTS_HELP + " 'auto' falls back to random when offline."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """The whole pipeline on generated data: synth -> extract -> train -> evaluate -> predict."""
    import shutil

    from cachedseg.backbone import BackboneConfig, build_backbone

    data, store, run, preds = out / "data", out / "features.zarr", out / "run", out / "predictions"
    with user_errors():
        if weights == "auto":
            try:
                build_backbone(BackboneConfig(backbone, image_size), "auto")
            except CachedsegError as exc:
                errors.print(f"[bold yellow]warning:[/] {escape(str(exc).split(';')[0])}.\n[bold yellow]Using random "
                             "backbone weights: the pipeline runs end to end, but its accuracy numbers mean little.[/]",
                             soft_wrap=True)
                weights = "random"
    console.rule("1/5 synth")
    if not (data / "ImageSets" / "val.txt").is_file():
        synth(data, count=count, width=1280, height=720, seed=0)
    else:
        console.print(f"reusing {data}")
    console.rule("2/5 extract")
    extract(data, store=store, backbone=backbone, image_size=image_size, weights=weights, precision="float32",
            dtype="float16",
            batch_size=4, device=device, workers=None, overwrite=store.exists() and _stale(store, weights), skip_bad=False,
            redo=None)
    console.rule("3/5 train")
    if run.exists():
        shutil.rmtree(run)  # the demo's own previous run
    rows = train(store, run=run, epochs=epochs, lr=1e-4, batch_size=2, decoder=decoder, seed=0, workers=None,
                 in_memory=False, resume=False, live=None, backbone=backbone, image_size=image_size, weights=weights,
                 precision="float32", dtype="float16", device=device)
    console.rule("4/5 evaluate (native label resolution)")
    result = evaluate(run, store=store, data=None, split="val", json_out=out / "evaluation.json", weights=None,
                      device=device)
    console.rule("5/5 predict")
    val_images = [data / "JPEGImages" / f"{i}.jpg" for i in (data / "ImageSets" / "val.txt").read_text().split()[:4]]
    written = predict(val_images, run=run, out=preds, weights=None, device=device)
    console.rule("done")
    console.print(_metrics_table(rows, f"{decoder} decoder, {backbone} at {image_size} px, weights: {weights}"))
    console.print(f"val at native resolution: mIoU {result.miou:.4f}, pixel accuracy {result.pixel_acc:.4f}")
    for p in written:
        console.print(f"  {p.overlay}")
    console.print(f"run folder (checkpoints, metrics, curves.png): [bold]{run}[/]")


def _stale(store: Path, weights: str) -> bool:
    """Whether the demo's store was built from other weights (then the demo rebuilds it)."""
    import zarr

    from cachedseg.backbone import weights_source
    try:
        return zarr.open_group(str(store), mode="r").attrs.get("weights") != weights_source(weights)
    except Exception:  # noqa: BLE001 - anything unreadable is rebuilt
        return True


if __name__ == "__main__":
    app()
