"""Maps: orthomosaics (and large frames) predicted by sliding windows, in strips, into a label COG and a GeoPackage.

A raster is read one strip of windows at a time (`cachedseg.rasters`); each window is predicted as it is (the
backbone's input size, no resizing) and the windows' class probabilities are blended with the weights of
`cachedseg.tiles`. Rows that no later window touches are final: their labels go on (to `cachedseg.map_outputs`:
the COG and the polygons, or to scoring), and only the rows the next strip of windows overlaps are kept. Memory
therefore grows with the raster's width (the strip: K classes x window height x width float32, with the input
strip and the prefetched windows), never with its height. At a GSD the labels of the resampled grid are warped
back onto the map's own grid; under torchrun one map's rows of windows are split over the ranks.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from cachedseg.classes import ClassSet
from cachedseg.errors import CachedsegError
from cachedseg.map_outputs import BLOCK, LabelRaster, PolygonOptions, Polygons, _Blocks, _GridRaster, _temp
from cachedseg.rasters import FrameReader, MapReader, gdal_env, _quiet, _rasterio
from cachedseg.tiles import Grid

PREFETCH = 2  # batches of windows read and preprocessed ahead of the forward pass


@dataclass(frozen=True)
class WindowModel:
    """How windows become class probabilities: what `blend` runs on each window.

    Attributes:
        size: Window (height, width): the backbone's input.
        classes: Number of classes K.
        prepare: A window's pixels [h, w, 3] uint8 -> the model's input [3, h, w] (run ahead, in a thread).
        run: Inputs [B, ...] (what `prepare` or `load` gives, stacked) -> class probabilities [B, K, h, w] (on
            `device`).
        device: Where `run` returns its probabilities; the strip's blend is summed there.
        load: Instead of `prepare`, the input of the window at (row, column) of the grid without its pixels (cached
            features: then only the raster's validity is read).
    """

    size: tuple[int, int]
    classes: int
    prepare: Callable[[np.ndarray], torch.Tensor] | None
    run: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    load: Callable[[int, int], torch.Tensor] | None = None


@dataclass(frozen=True)
class MapPrediction:
    """The files written for one map.

    Attributes:
        image: The input raster.
        label: The label COG, `<stem>_label.tif`.
        polygons: The GeoPackage `<stem>.gpkg` (with `--polygons`), else None.
        windows: Windows predicted (all-nodata windows are skipped).
        features: Polygons written (with `--polygons`).
        replaced: Whether files of an earlier prediction were overwritten.
    """

    image: Path
    label: Path
    polygons: Path | None
    windows: int
    features: int = 0
    replaced: bool = False


# --- sliding windows ---------------------------------------------------------------------------------------------

def padded(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A window's pixels [n, m, 3], reflected out to `size` where the raster is smaller than a window."""
    pad = (0, max(0, size[0] - pixels.shape[0])), (0, max(0, size[1] - pixels.shape[1])), (0, 0)
    return np.pad(pixels, pad, mode="reflect") if any(p[1] for p in pad[:2]) else pixels


def _prefetched(items: Iterable, depth: int) -> Iterator:
    """Iterate `items` in a thread, `depth` items ahead (reading and preprocessing hide behind the forward pass);
    its exceptions are raised here, and it stops when this generator is closed."""
    box: queue.Queue = queue.Queue(depth)
    stop, done = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", done))
        except BaseException as exc:  # handed to the consumer, which raises it
            put(("error", exc))

    thread = threading.Thread(target=produce, daemon=True, name="cachedseg-prefetch")
    thread.start()
    try:
        while True:
            kind, item = box.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _window_batches(reader, grid: Grid, model: WindowModel, batch_size: int,
                    rows: range | None = None) -> Iterator[tuple]:
    """Per row of windows r (of `rows`, default all): ("batch", r, columns, inputs [B, ...]) for its windows that
    hold valid pixels, then ("row", r, valid [n, W]); all-nodata windows are skipped."""
    h, w = grid.size
    for r in rows if rows is not None else range(len(grid.rows)):
        y = grid.rows[r]
        rgb, valid = reader.read(y, min(y + h, grid.height), pixels=model.load is None)
        cols = [c for c, x in enumerate(grid.cols) if valid[:, x:x + w].any()]
        for i in range(0, len(cols), batch_size):
            chunk = cols[i:i + batch_size]
            inputs = torch.stack([model.load(y, grid.cols[c]) if model.load is not None else
                                  model.prepare(padded(rgb[:, grid.cols[c]:grid.cols[c] + w], grid.size))
                                  for c in chunk])
            yield "batch", r, chunk, inputs
        yield "row", r, valid


ARGMAX_ROWS = 64  # rows of the strip labelled at a time: the running maximum stays small (64 x W floats)


def class_argmax(total: torch.Tensor) -> torch.Tensor:
    """argmax over the classes of [K, n, W] -> uint8 [n, W], the first class on ties (as torch.argmax): one pass
    over each class's contiguous plane, 3x faster on a CPU than argmax(0), which strides across the planes; a band
    of ARGMAX_ROWS rows at a time, so its temporaries do not grow with the strip."""
    labels = torch.zeros(total.shape[1:], dtype=torch.uint8, device=total.device)
    for y in range(0, total.shape[1], ARGMAX_ROWS):
        band, out = total[:, y:y + ARGMAX_ROWS], labels[y:y + ARGMAX_ROWS]
        best = band[0].clone()
        for k in range(1, band.shape[0]):
            better = band[k] > best
            out.masked_fill_(better, k)
            torch.maximum(best, band[k], out=best)
    return labels


class _Strip:
    """The running sums of one row of windows, held only where they are still needed.

    Windows of a row arrive left to right, so once window c is added, the columns left of window c+1 are complete
    for this row: their final rows (those no later row of windows touches) become labels at once, and their other
    rows (the overlap with the next row of windows) go to the carry. Only a band of columns under the windows being
    added is held whole: the float sums are K x (band + 2 x overlap rows) x W, not K x window height x W (12 classes
    at 518 on a 20,000-pixel-wide map: 0.15 GB instead of 0.5 GB). Each pixel's sum adds the same terms in the same
    order as a whole-strip sum would.
    """

    def __init__(self, grid: Grid, model: WindowModel):
        self.grid, self.h, self.w, self.k, self.device = grid, *grid.size, model.classes, model.device
        self.row_w = [torch.from_numpy(p).to(model.device) for p in grid.row_weights]
        self.col_w = [torch.from_numpy(p).to(model.device) for p in grid.col_weights]
        self.carry = torch.zeros(self.k, 0, grid.width, device=model.device)  # from the row of windows above
        self.band_width = min(2 * self.w, grid.width)
        self.r = None

    def rows(self, r: int) -> int:
        """Raster rows window row r covers (fewer than h only for a raster smaller than a window)."""
        return min(self.grid.rows[r] + self.h, self.grid.height) - self.grid.rows[r]

    def _start(self, r: int) -> None:
        """Begin window row r: an empty band at column 0, the labels and the next carry to fill."""
        self.r, n = r, self.rows(r)
        self.final = self.grid.final_after(r) - self.grid.rows[r]
        self.labels = torch.zeros(self.final, self.grid.width, dtype=torch.uint8, device=self.device)
        self.next_carry = torch.zeros(self.k, n - self.final, self.grid.width, device=self.device)
        self.band = torch.zeros(self.k, n, self.band_width, device=self.device)
        self.x0 = 0
        self._fill(0, self.band_width)

    def _fill(self, lo: int, hi: int) -> None:
        """Band columns lo:hi (band coordinates) start from the carry of the row above, zero below it."""
        x0, kept = self.x0, self.carry.shape[1]
        self.band[:, :, lo:hi] = 0
        right = min(x0 + hi, self.grid.width) - x0
        if kept and right > lo:
            self.band[:, :kept, lo:right] = self.carry[:, :, x0 + lo:x0 + right]

    def _flush(self, upto: int) -> None:
        """Columns x0:upto are complete: their final rows become labels, the rest goes to the next carry; the band
        then starts at `upto`."""
        count = upto - self.x0
        if count <= 0:
            return
        done = self.band[:, :, :count]
        self.labels[:, self.x0:upto] = class_argmax(done[:, :self.final])
        self.next_carry[:, :, self.x0:upto] = done[:, self.final:]
        rest = self.band_width - count
        if rest > 0:
            self.band[:, :, :rest] = self.band[:, :, count:].clone()  # overlapping ranges: a small temporary
        self.x0 = upto
        self._fill(max(rest, 0), self.band_width)

    def add(self, r: int, c: int, probs: torch.Tensor) -> None:
        """Add window (r, c)'s probabilities [K, h, w], weighted (windows of a row in column order)."""
        if self.r != r:
            self._start(r)
        x, n = self.grid.cols[c], self.rows(r)
        m = min(x + self.w, self.grid.width) - x
        while x + m > self.x0 + self.band_width:  # columns left of this window are complete (in band-wide steps
            self._flush(min(x, self.x0 + self.band_width))  # past windows skipped as outside the map)
        weight = self.row_w[r][:n, None] * self.col_w[c][None, :m]  # [n, m]
        self.band[:, :n, x - self.x0:x - self.x0 + m].addcmul_(probs[:, :n, :m], weight)  # in place

    def finish(self, r: int, valid: np.ndarray, nodata: int | None) -> np.ndarray:
        """Labels [f, W] of the rows final after window row r (valid [n, W]: its pixels inside the map; outside it
        `nodata`, unless None); the rows the next row of windows overlaps carry over."""
        if self.r != r:  # a row whose windows all lay outside the map
            self._start(r)
        while self.x0 < self.grid.width:
            self._flush(min(self.x0 + self.band_width, self.grid.width))
        labels = self.labels.cpu().numpy()
        if nodata is not None:
            labels[~valid[:self.final]] = nodata
        self.carry, self.r = self.next_carry, None
        return labels


@torch.no_grad()
def blend(reader, grid: Grid, model: WindowModel, nodata: int | None, batch_size: int,
          sink: Callable[[int, np.ndarray], None], progress: Callable[[int, int], None] | None = None,
          rows: range | None = None) -> int:
    """Predict every window of `grid` over `reader` (of the window rows `rows`, default all), blend, and hand final
    label rows to `sink(y0, labels [n, W])` in order, top to bottom; returns the windows predicted.

    Pixels outside the map get `nodata` (None: the argmax all the same, class 0 where no window lies). Each
    window's probabilities are weighted by `grid.weight` and summed per pixel; the label is the argmax of the
    sum, which is the argmax of the weighted mean (the weight sum is positive and the same for every class). Only
    one strip (the window height, the raster's width) is held: after row r of windows, rows before
    `grid.final_after(r)` are final, and the rows the next row of windows overlaps move to the strip's top.
    """
    strip, predicted, done = _Strip(grid, model), 0, 0
    total = len(grid) if rows is None else len(rows) * len(grid.cols)
    # closed on any exception here, so the reading thread has stopped before the caller closes the raster
    with contextlib.closing(_prefetched(_window_batches(reader, grid, model, batch_size, rows), PREFETCH)) as items:
        for item in items:
            if item[0] == "batch":
                _, r, cols, inputs = item
                for c, probs in zip(cols, model.run(inputs.to(model.device, non_blocking=True))):  # [K, h, w]
                    strip.add(r, c, probs)
                predicted += len(cols)
                continue
            _, r, valid = item
            sink(grid.rows[r], strip.finish(r, valid, nodata))
            done += len(grid.cols)
            if progress:
                progress(done, total)
    return predicted


def _shared_blend(reader, grid: Grid, model: WindowModel, nodata: int | None, batch_size: int,
                  sink: Callable[[int, np.ndarray], None], progress: Callable[[int, int], None] | None,
                  ctx, scratch: Path) -> int:
    """`blend`, its window rows split over the ranks of a torchrun job (`ctx`): each rank blends a contiguous block
    of window rows, plus the rows of windows above it that reach into its pixels (for their weights), and writes
    the label rows it owns to a part file in `scratch`; rank 0 then hands every part's rows to `sink` in order.
    Returns the windows predicted by all ranks; `sink` is called on rank 0 only."""
    if ctx is None or ctx.world == 1:
        return blend(reader, grid, model, nodata, batch_size, sink, progress)
    from rasterio.windows import Window
    blocks = [type(ctx)(rank=r, world=ctx.world).share(list(range(len(grid.rows)))) for r in range(ctx.world)]
    mine = blocks[ctx.rank]
    part = scratch / f".{grid.height}x{grid.width}.{ctx.job}.part{ctx.rank}.tif"
    error, windows = None, 0
    try:
        if mine:
            a, b = mine[0], mine[-1] + 1
            top = grid.rows[a] if a else 0  # the first label row this rank owns
            first = next(r for r in range(a + 1) if grid.rows[r] + grid.size[0] > top) if a else 0
            owned = grid.final_after(b - 1) - top
            writer = _GridRaster(part, SimpleNamespace(width=grid.width, height=owned, crs=None, transform=None))
            try:
                def keep(y0: int, rows: np.ndarray) -> None:
                    if y0 + len(rows) > top:
                        writer.add(max(y0, top) - top, rows[max(0, top - y0):])
                windows = blend(reader, grid, model, nodata, batch_size, keep, progress, range(first, b))
            finally:
                writer.close()
    except CachedsegError as exc:
        error = str(exc)
    outcomes = ctx.gather((error, windows))  # every rank waits here: the parts are complete
    errors = [e for e, _ in outcomes if e]
    if not errors and ctx.main:
        rasterio = _rasterio()
        for rank in range(ctx.world):
            path = part.with_name(part.name.replace(f".part{ctx.rank}.", f".part{rank}."))
            if not path.exists():
                continue
            start = grid.rows[blocks[rank][0]] if rank else 0
            with _quiet(), rasterio.open(path) as src:
                for y0 in range(0, src.height, BLOCK):
                    n = min(BLOCK, src.height - y0)
                    sink(start + y0, src.read(1, window=Window(0, y0, src.width, n)))
    ctx.barrier()  # rank 0 has read every part
    part.unlink(missing_ok=True)
    if errors:
        raise CachedsegError(errors[0])
    return sum(w for _, w in outcomes)


def map_labels(native: MapReader, model: WindowModel, overlap: int, nodata: int, batch_size: int,
               sink: Callable[[int, np.ndarray], None], progress: Callable[[int, int], None] | None = None,
               gsd: float | None = None, scratch: Path | None = None, ctx=None) -> int:
    """Predict a map by sliding windows on its grid, resampled to `gsd` first if given, and hand its labels on the
    map's own grid (`native`, read as it is) to `sink(y0, labels [n, W])` top to bottom; returns the windows
    predicted. Under torchrun (`ctx` of several ranks) the windows are split over the ranks (`_shared_blend`) and
    `sink` is called on rank 0 only.

    At a GSD the windows' labels go to a temporary GeoTIFF in `scratch` (default: beside the map), which is then
    read back warped onto the map's grid (nearest neighbour), a block row at a time, and nodata is set where the
    map itself has none, exactly: the resampled grid's own edge pixels (partly outside the map) keep their labels,
    so no pixel of the map is lost to resampling. Memory stays that of one strip.
    """
    scratch = scratch or native.path.parent
    if gsd is None:
        return _shared_blend(native, Grid(native.height, native.width, model.size, overlap), model, nodata,
                             batch_size, sink, progress, ctx, scratch)
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window
    rasterio = _rasterio()
    tmp = _temp(scratch / native.path.name, "gsd")
    reader = MapReader(native.path, gsd)
    try:
        writer = _GridRaster(tmp, reader) if ctx is None or ctx.main else None
        try:
            windows = _shared_blend(reader, Grid(reader.height, reader.width, model.size, overlap), model, None,
                                    batch_size, writer.add if writer else None, progress, ctx, scratch)
        finally:
            if writer:
                writer.close()
        if ctx is not None and not ctx.main:
            return windows
        with rasterio.open(tmp) as src, WarpedVRT(src, crs=native.crs, transform=native.transform,
                                                  width=native.width, height=native.height, add_alpha=True,
                                                  resampling=Resampling.nearest) as vrt:
            for y0 in range(0, native.height, BLOCK):
                n = min(BLOCK, native.height - y0)
                labels = vrt.read(1, window=Window(0, y0, native.width, n))
                _, valid = native.read(y0, y0 + n, pixels=False)
                labels[~valid] = nodata  # nodata exactly where the map has none, at its own resolution
                sink(y0, labels)
    finally:
        reader.close()
        tmp.unlink(missing_ok=True)
    return windows


def tiled_labels(image, model: WindowModel, overlap: int, batch_size: int, nodata: int,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Class indices [H, W] of a frame (a PIL RGB image) predicted by sliding windows (`predict --tile` on a
    frame): the same windows and blend as a map, the labels held whole."""
    reader = FrameReader(image)
    labels = np.empty((reader.height, reader.width), dtype=np.uint8)

    def keep(y0: int, rows: np.ndarray) -> None:
        labels[y0:y0 + len(rows)] = rows

    blend(reader, Grid(reader.height, reader.width, model.size, overlap), model, nodata, batch_size, keep, progress)
    return labels


def predict_map(path: str | Path, out: str | Path, model: WindowModel, classes: ClassSet, overlap: int,
                batch_size: int = 4, polygons: PolygonOptions | None = None,
                provenance: dict[str, str] | None = None,
                progress: Callable[[int, int], None] | None = None, gsd: float | None = None,
                ctx=None) -> MapPrediction:
    """Predict one GeoTIFF by sliding windows and write `OUT/<stem>_label.tif` (a COG), and with `polygons`
    `OUT/<stem>.gpkg`. Under torchrun every rank calls this with its `ctx` (`cachedseg.distributed.Context`):
    the windows are split over the ranks, and rank 0 writes the files (`OUT` must be a folder all ranks share).

    Args:
        path: The input raster: RGB or RGBA, 8-bit.
        out: Output folder (it exists).
        model: What predicts a window (`cachedseg.predict.window_model`).
        classes: The run's classes: colours, names, and the ignore label, which is the nodata value.
        overlap: Pixels shared by neighbouring windows.
        batch_size: Windows per forward pass.
        polygons: Also vectorise the labels, with these options.
        provenance: More metadata for the label raster (backbone, run, window).
        progress: Called as `progress(windows done, windows)`.
        gsd: Predict on the raster resampled to this many metres a pixel (the run's), then write the labels on the
            raster's own grid.
        ctx: This process's place in a torchrun job (None: alone).

    Returns:
        The files written.

    Raises:
        CachedsegError: For a raster that is unreadable, not RGB(A) or not 8-bit, a damaged block, or a missing
            maps extra.
    """
    path, out = Path(path), Path(out)
    label_path, gpkg_path = out / f"{path.stem}_label.tif", out / f"{path.stem}.gpkg"
    replaced = label_path.exists() or (polygons is not None and gpkg_path.exists())
    nodata, main = classes.ignore_index, ctx is None or ctx.main
    with gdal_env():
        reader = MapReader(path)
        outputs: list = []
        try:
            if main:
                outputs.append(LabelRaster(label_path, reader, classes, nodata, {
                    "SOURCE": path.name, "TILE_SIZE": f"{model.size[1]}x{model.size[0]}",
                    "TILE_OVERLAP": str(overlap), **({"GSD": f"{gsd:g}"} if gsd is not None else {}),
                    **(provenance or {})}))
            if polygons is not None and main:
                outputs.append(Polygons(gpkg_path, reader, classes, nodata, polygons))

            def emit(y0: int, labels: np.ndarray) -> None:
                for output in outputs:
                    output.add(y0, labels)

            blocks = _Blocks(emit)
            windows = map_labels(reader, model, overlap, nodata, batch_size, blocks.add, progress, gsd, out, ctx)
            blocks.close()
            reader.close()
            closed = [output.close() for output in outputs]  # the raster's, then the polygons' count
            features = closed[1] if len(closed) == 2 else 0
        except BaseException:
            for output in outputs:
                output.abort()
            raise
        finally:
            reader.close()
    return MapPrediction(path, label_path, gpkg_path if polygons is not None else None, windows, features, replaced)


