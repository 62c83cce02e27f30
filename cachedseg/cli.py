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

app = typer.Typer(help=__doc__.split("\n")[0] + "\n\nStage one: `extract` caches DINOv2 token grids in a Zarr "
                  "store. Stage two trains only the decoder from that cache.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
errors = Console(stderr=True)
_state = {"verbose": False}

BACKBONE_HELP = "timm DINOv2 model, e.g. vit_small_patch14_dinov2, vit_base_patch14_reg4_dinov2."
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
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)


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
    store: Optional[Path] = typer.Option(None, help="Store to write [default: cache/<data>-<backbone>-<size>-<dtype>.zarr]."),
    backbone: str = typer.Option("vit_base_patch14_dinov2", help=BACKBONE_HELP),
    image_size: Optional[int] = typer.Option(None, help="Square input side in px, a multiple of 14 [default: the model's, 518]."),
    weights: str = typer.Option("auto", help=WEIGHTS_HELP),
    dtype: str = typer.Option("float16", help="Feature storage dtype: float16 (half the size) or float32 (bit-exact)."),
    batch_size: int = typer.Option(4, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    workers: Optional[int] = typer.Option(None, help="Image-decoding worker processes [default: min(4, CPUs)]."),
    overwrite: bool = typer.Option(False, help="Rebuild a store made with other settings instead of refusing it."),
) -> None:
    """Run the frozen backbone once per image and cache its token grids in a Zarr store.

    Rerunning the same command skips finished images, so an interrupted run resumes where it stopped.
    """
    from cachedseg.backbone import BackboneConfig
    from cachedseg.extract import extract as run_extract

    with user_errors(), progress_bar() as bar:
        result = run_extract(data, store, BackboneConfig(backbone, image_size), weights=weights, dtype=dtype,
                             batch_size=batch_size, device=device, workers=workers, overwrite=overwrite,
                             progress=progress_callback(bar, "extract"))
    table = Table(title=f"feature store {result.store}", show_header=False)
    for key, value in [("images", f"{result.images} ({result.extracted} extracted, {result.skipped} already done)"),
                       ("time", f"{result.seconds:.1f} s ({result.images_per_s:.2f} img/s)"),
                       ("size on disk", f"{result.bytes_on_disk / 1e6:.1f} MB ({result.mb_per_image:.2f} MB/img)")]:
        table.add_row(key, value)
    console.print(table)


if __name__ == "__main__":
    app()
