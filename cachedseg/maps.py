"""Maps: orthomosaics predicted by sliding windows, in strips, to a cloud-optimised GeoTIFF and a GeoPackage.

The one owner of raster I/O. A GeoTIFF (RGB or RGBA, 8-bit; an alpha band, a nodata value or an internal mask
marks the pixels outside the map) is read one strip of windows at a time; each window is predicted as it is (the
backbone's input size, no resizing) and the windows' class probabilities are blended with the weights of
`cachedseg.tiles`. Rows that no later window touches are final: their labels are written, and only the rows the
next strip of windows overlaps are kept. Memory therefore grows with the raster's width (the strip: K classes x
window height x width float32, with the input strip and the prefetched windows), never with its height.

The labels go to a tiled, compressed GeoTIFF block row by block row, which is then copied into a COG (GDAL's COG
driver only copies; writing one directly would hold the whole raster in memory): uint8 class ids, the run's
ignore label as nodata where the input is nodata, the input's CRS, transform and size, the classes' colour table,
their names in the metadata. `--polygons` vectorises each finished block row and merges the regions that cross
block rows, so each connected region is one feature.

rasterio, pyogrio and shapely (the `maps` extra) are imported when a map is read or written, never before.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from cachedseg import __version__
from cachedseg.classes import ClassSet
from cachedseg.dataset import MAX_PIXELS, own_pixel_limit
from cachedseg.errors import CachedsegError, first_line
from cachedseg.tiles import Grid, RasterGrid

TIFF_SUFFIXES = (".tif", ".tiff")
SOFTWARE = f"cachedseg {__version__}"  # TIFFTAG_SOFTWARE of every label raster: it is never taken for an input
EXTRA = "pip install 'cachedseg[maps]'"
BLOCK = 512  # label raster tiles, and the rows vectorised at a time
GDAL_CACHE_MB = 256  # GDAL's block cache (default 5% of RAM, which a large map would fill)
POLYGON_BATCH = 10_000  # features written to the GeoPackage at a time
PREFETCH = 2  # batches of windows read and preprocessed ahead of the forward pass
_GEOTIFF_TAGS = (33550, 33922, 34264, 34735)  # ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory


def _module(name: str):
    """Import an optional dependency of the maps extra, or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise CachedsegError(f"GeoTIFF maps need {name.split('.')[0]}, which is not installed; {EXTRA}") from None


def _rasterio():
    """rasterio, with its submodules this module uses."""
    rasterio = _module("rasterio")
    for sub in ("rasterio.features", "rasterio.shutil", "rasterio.windows", "rasterio.errors"):
        importlib.import_module(sub)
    return rasterio


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
class PolygonOptions:
    """What `--polygons` writes.

    Attributes:
        min_area: Regions smaller than this are left out (m² for a georeferenced raster, else pixels); 0 keeps all.
        simplify: Douglas-Peucker tolerance in CRS units (pixels without a CRS); 0 keeps every vertex.
    """

    min_area: float = 0.0
    simplify: float = 0.0

    def __post_init__(self) -> None:
        if self.min_area < 0 or self.simplify < 0:
            raise CachedsegError(f"--min-area {self.min_area} / --simplify {self.simplify}: give 0 or more")


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


# --- inputs ------------------------------------------------------------------------------------------------------

def _pil_georeferenced(path: Path) -> bool:
    """Whether a TIFF's header has GeoTIFF tags or more than MAX_PIXELS (read by PIL, when rasterio is missing)."""
    from PIL import Image
    try:
        with own_pixel_limit(), Image.open(path) as img:
            tags = getattr(img, "tag_v2", {})
            return any(t in tags for t in _GEOTIFF_TAGS) or img.width * img.height > MAX_PIXELS
    except (OSError, ValueError, SyntaxError):
        return False  # not readable: loading it says so


def is_map(path: str | Path, tile: bool = False) -> bool:
    """Whether `predict` takes the map path for this file: a TIFF with a CRS, or over MAX_PIXELS, or any TIFF with
    `tile`. Other images (and TIFFs no reader opens, which loading then reports) are frames.

    Raises:
        CachedsegError: For a map when the maps extra is not installed.
    """
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return False
    try:
        rasterio = _rasterio()
    except CachedsegError:
        if tile or _pil_georeferenced(path):
            raise
        return False
    try:
        with _quiet(), rasterio.open(path) as src:
            return tile or src.crs is not None or src.width * src.height > MAX_PIXELS
    except rasterio.errors.RasterioError:
        return tile


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """rasterio's warning about a raster without georeference off: such a TIFF is fine (pixels then)."""
    from rasterio.errors import NotGeoreferencedWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def _env():
    """The GDAL settings of map I/O: a bounded block cache."""
    return _rasterio().Env(GDAL_CACHEMAX=GDAL_CACHE_MB)


def _open_raster(path: Path, what: str = "raster"):
    """rasterio's dataset for a file, or one line saying it is unreadable."""
    rasterio = _rasterio()
    try:
        with _quiet():
            return rasterio.open(path)
    except rasterio.errors.RasterioError as exc:
        raise CachedsegError(f"{path} is not a readable {what} ({first_line(exc)}); replace or remove it") from None


def resampled_grid(src, gsd: float, path: Path) -> tuple[object, int, int]:
    """(transform, height, width) of a north-up raster resampled to `gsd` metres a pixel over the same extent.

    Raises:
        CachedsegError: For a raster without a CRS, in a geographic CRS (degrees) or rotated.
    """
    from affine import Affine
    if src.crs is None:
        raise CachedsegError(f"--gsd {gsd} resamples to metres a pixel, but {path} has no coordinate system; "
                             f"georeference it (gdal_edit.py -a_srs EPSG:... -a_ullr ... {path.name}) or leave --gsd out")
    if src.crs.is_geographic:
        raise CachedsegError(f"--gsd {gsd} is in metres, but {path}'s CRS is geographic (degrees); reproject it "
                             f"(gdalwarp -t_srs EPSG:<a UTM zone> {path.name} out.tif) or leave --gsd out")
    t = src.transform
    if t.b or t.d:
        raise CachedsegError(f"{path} is rotated (its transform has shear terms); warp it north-up first "
                             f"(gdalwarp {path.name} out.tif) to use --gsd")
    step = gsd / src.crs.linear_units_factor[1]  # in CRS units (metres, or feet for some CRSs)
    width = max(1, round(src.width * abs(t.a) / step))
    height = max(1, round(src.height * abs(t.e) / step))
    return Affine(step * np.sign(t.a), 0.0, t.c, 0.0, step * np.sign(t.e), t.f), height, width


def _warped(src, gsd: float, path: Path):
    """A WarpedVRT of an image `src` at `gsd` (bilinear). An alpha band is added to a source without one: GDAL's
    warper then gives the same pixels for any window read (without it, a nodata source's windows differ from a
    whole read by 1), and the alpha marks where the source had no data."""
    from rasterio.enums import ColorInterp, Resampling
    from rasterio.vrt import WarpedVRT
    transform, height, width = resampled_grid(src, gsd, path)
    return WarpedVRT(src, crs=src.crs, transform=transform, width=width, height=height,
                     resampling=Resampling.bilinear, add_alpha=src.colorinterp[-1] != ColorInterp.alpha)


class MapReader:
    """An open RGB(A) GeoTIFF, read a strip of rows (or a window) at a time with its validity mask; with `gsd`,
    resampled (bilinear) to that many metres a pixel as it is read."""

    def __init__(self, path: str | Path, gsd: float | None = None):
        self.path, self.gsd = Path(path), gsd
        self.src = _open_raster(self.path)
        self.data = self.src  # what is read: the file, or its resampled view
        try:
            self._check()
            if gsd is not None:
                self.data = _warped(self.src, gsd, self.path)
        except BaseException:
            self.src.close()
            raise

    def _check(self) -> None:
        """Refuse what the model cannot read: other than 3 or 4 bands, a 4th band that is not alpha, not 8-bit."""
        from rasterio.enums import ColorInterp
        src = self.src
        if src.count not in (3, 4):
            raise CachedsegError(f"{self.path} has {src.count} band(s); a map must be RGB (3 bands) or RGBA "
                                 "(4, the 4th alpha)")
        if src.count == 4 and src.colorinterp[3] != ColorInterp.alpha:
            raise CachedsegError(f"{self.path}'s 4th band is {src.colorinterp[3].name}, not alpha; mark it "
                                 f"(gdal_edit.py -colorinterp_4 alpha {self.path.name}) or give the RGB bands only")
        if set(src.dtypes) != {"uint8"}:
            raise CachedsegError(f"{self.path} is {src.dtypes[0]}, but the model reads 8-bit RGB; convert it "
                                 f"(gdal_translate -ot Byte -scale {self.path.name} out.tif)")

    @property
    def height(self) -> int:
        return self.data.height

    @property
    def width(self) -> int:
        return self.data.width

    @property
    def crs(self):
        return self.src.crs

    @property
    def transform(self):
        """The affine pixel -> CRS transform of the grid read (the identity for a raster without georeference)."""
        return self.data.transform

    @property
    def georeferenced(self) -> bool:
        from affine import Affine
        return self.src.crs is not None or self.src.transform != Affine.identity()

    def grid(self, image: str) -> RasterGrid:
        """The grid read, as a tiled store records it for the image `image`."""
        return RasterGrid(image, self.height, self.width, self.crs.to_wkt() if self.crs is not None else None,
                          tuple(self.transform)[:6] if self.georeferenced else None, (self.src.height, self.src.width))

    def read(self, y0: int, y1: int, pixels: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """Rows y0:y1: RGB [n, W, 3] uint8 (None without `pixels`) and valid [n, W] bool (False outside the map)."""
        return self.window(y0, 0, y1 - y0, self.width, pixels)

    def window(self, y0: int, x0: int, height: int, width: int,
               pixels: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """The pixels inside the raster of the window at (y0, x0) of `height` x `width`: RGB [n, m, 3] uint8 (None
        without `pixels`) and valid [n, m] bool."""
        from rasterio.windows import Window
        window = Window(x0, y0, min(width, self.width - x0), min(height, self.height - y0))
        try:
            rgb = self.data.read((1, 2, 3), window=window) if pixels else None  # [3, n, m]
            valid = self.data.dataset_mask(window=window) > 0  # [n, m]: alpha, internal mask or nodata
        except _rasterio().errors.RasterioError as exc:
            raise CachedsegError(f"rows {y0}-{y0 + height} of {self.path} could not be read ({first_line(exc)}); the "
                                 "file is damaged: rebuild or replace it") from None
        return (None if rgb is None else np.ascontiguousarray(rgb.transpose(1, 2, 0))), valid

    def close(self) -> None:
        if self.data is not self.src:
            self.data.close()
        self.src.close()


class LabelReader:
    """A label raster (a GeoTIFF or any single-band raster of class indices; three bands for colour masks) read a
    window at a time on the grid of its image's `MapReader`: it must have the image's size (and transform, where
    both are georeferenced), and is resampled to the image's GSD by nearest neighbour. Its nodata pixels, and the
    image's, become the ignore label."""

    def __init__(self, path: str | Path, image: MapReader, decode: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 bands: int = 1):
        self.path, self.image, self.decode, self.bands = Path(path), image, decode, bands
        self.src = _open_raster(self.path, "label raster")
        self.data = self.src
        try:
            self._check()
            if image.gsd is not None:  # onto the image's resampled grid, whatever georeference the labels have
                from rasterio.enums import Resampling
                from rasterio.vrt import WarpedVRT
                img = image.src
                # an alpha band added, so the VRT has no nodata value of its own (0 by default: class 0 masked)
                self.data = WarpedVRT(self.src, src_crs=img.crs, src_transform=img.transform, crs=img.crs,
                                      transform=image.transform, width=image.width, height=image.height,
                                      resampling=Resampling.nearest, add_alpha=True)
        except BaseException:
            self.src.close()
            raise

    def _check(self) -> None:
        """Refuse a label raster that is not on its image's grid, or has too few bands."""
        src, img = self.src, self.image.src
        if (src.height, src.width) != (img.height, img.width):
            raise CachedsegError(f"the label raster {self.path} is {src.width}x{src.height}, its image "
                                 f"{self.image.path} {img.width}x{img.height}; labels must lie on the image's grid "
                                 f"(gdalwarp -te <the image's bounds> -ts {img.width} {img.height} -r near)")
        if src.crs is not None and img.crs is not None and (src.crs != img.crs or not src.transform.almost_equals(
                img.transform)):
            raise CachedsegError(f"the label raster {self.path} lies on another grid than its image {self.image.path} "
                                 f"(CRS or transform differ); warp it onto the image's grid (gdalwarp -t_srs ... -te "
                                 "... -ts ... -r near)")
        if src.count < self.bands:
            raise CachedsegError(f"the label raster {self.path} has {src.count} band(s); colour masks need 3")

    def window(self, y0: int, x0: int, height: int, width: int, valid: np.ndarray) -> np.ndarray:
        """Class indices [n, m] uint8 of the window (clipped to the raster as `MapReader.window` clips it), the
        ignore label where the label raster or the image (`valid` [n, m] False) has no data."""
        from rasterio.windows import Window
        window = Window(x0, y0, min(width, self.data.width - x0), min(height, self.data.height - y0))
        try:
            raw = self.data.read(tuple(range(1, self.bands + 1)), window=window)  # [bands, n, m]
            known = valid & (self.data.dataset_mask(window=window) > 0)
        except _rasterio().errors.RasterioError as exc:
            raise CachedsegError(f"rows {y0}-{y0 + height} of the label raster {self.path} could not be read "
                                 f"({first_line(exc)}); the file is damaged: rebuild or replace it") from None
        return self.decode(raw[0] if self.bands == 1 else raw.transpose(1, 2, 0), known)

    def close(self) -> None:
        if self.data is not self.src:
            self.data.close()
        self.src.close()


def map_size(path: str | Path, gsd: float | None = None) -> tuple[int, int]:
    """(height, width) of a map (resampled to `gsd`), checked as `MapReader` checks it (bands, alpha, 8-bit, a CRS
    for `gsd`), from its header."""
    with _env():
        reader = MapReader(path, gsd)
        size = reader.height, reader.width
        reader.close()
    return size


class FrameReader:
    """A decoded frame (a PIL image, RGB) read as a map: every pixel valid."""

    gsd = None
    georeferenced = False

    def __init__(self, image):
        self.pixels = np.asarray(image)  # [H, W, 3] uint8, a view of the image's memory
        self.height, self.width = self.pixels.shape[:2]

    def read(self, y0: int, y1: int, pixels: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """Rows y0:y1: RGB [n, W, 3] uint8 (None without `pixels`) and valid [n, W] bool (all True)."""
        return self.window(y0, 0, y1 - y0, self.width, pixels)

    def window(self, y0: int, x0: int, height: int, width: int,
               pixels: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """The pixels of a window inside the frame: RGB [n, m, 3] uint8 (None without `pixels`), valid (all True)."""
        rgb = self.pixels[y0:y0 + height, x0:x0 + width]
        return (rgb if pixels else None), np.ones(rgb.shape[:2], dtype=bool)

    def grid(self, image: str) -> RasterGrid:
        """The frame's grid, as a tiled store records it for the image `image` (no georeference)."""
        return RasterGrid(image, self.height, self.width, native=(self.height, self.width))

    def close(self) -> None:
        pass


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


def class_argmax(total: torch.Tensor) -> torch.Tensor:
    """argmax over the classes of [K, n, W] -> uint8 [n, W], the first class on ties (as torch.argmax): one pass
    over each class's contiguous plane, 3x faster on a CPU than argmax(0), which strides across the planes."""
    best, labels = total[0].clone(), torch.zeros(total.shape[1:], dtype=torch.uint8, device=total.device)
    for k in range(1, total.shape[0]):
        better = total[k] > best
        labels.masked_fill_(better, k)
        torch.maximum(best, total[k], out=best)
    return labels


class _Strip:
    """The rows of one row of windows: their weighted probability sums [K, h, W] (on the model's device) and
    validity; the rows the next row of windows overlaps carry over."""

    def __init__(self, grid: Grid, model: WindowModel):
        self.grid, self.h, self.w = grid, *grid.size
        rows = min(self.h, grid.height)
        self.total = torch.zeros(model.classes, rows, grid.width, device=model.device)
        self.valid = np.zeros((rows, grid.width), dtype=bool)
        self.row_w = [torch.from_numpy(p).to(model.device) for p in grid.row_weights]
        self.col_w = [torch.from_numpy(p).to(model.device) for p in grid.col_weights]

    def rows(self, r: int) -> int:
        """Raster rows window row r covers (fewer than h only for a raster smaller than a window)."""
        return min(self.grid.rows[r] + self.h, self.grid.height) - self.grid.rows[r]

    def add(self, r: int, c: int, probs: torch.Tensor) -> None:
        """Add window (r, c)'s probabilities [K, h, w], weighted."""
        x, n = self.grid.cols[c], self.rows(r)
        m = min(x + self.w, self.grid.width) - x
        weight = self.row_w[r][:n, None] * self.col_w[c][None, :m]  # [n, m]
        self.total[:, :n, x:x + m].addcmul_(probs[:, :n, :m], weight)  # in place: no [K, h, w] temporary

    def finish(self, r: int, valid: np.ndarray, nodata: int | None) -> np.ndarray:
        """Labels [f, W] of the rows final after window row r (valid [n, W]: its pixels inside the map; outside it
        `nodata`, unless None), and the overlapped rows moved to the top for the next row of windows."""
        n, final = self.rows(r), self.grid.final_after(r) - self.grid.rows[r]
        self.valid[:n] = valid
        labels = class_argmax(self.total[:, :final]).cpu().numpy()  # [final, W]
        if nodata is not None:
            labels[~self.valid[:final]] = nodata
        keep = n - final
        self.total[:, :keep] = self.total[:, final:final + keep].clone()
        self.total[:, keep:] = 0
        self.valid[:keep] = self.valid[final:final + keep]
        self.valid[keep:] = False
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


class _GridRaster:
    """Label rows written into a plain tiled GeoTIFF on a reader's grid: the labels predicted at a GSD, before
    they are warped back onto the map's own grid."""

    def __init__(self, path: Path, reader):
        rasterio = _rasterio()
        self.path = path
        with _quiet():
            self.dst = rasterio.open(path, "w", driver="GTiff", width=reader.width, height=reader.height, count=1,
                                     dtype="uint8", tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
                                     compress="deflate", BIGTIFF="IF_SAFER", crs=reader.crs,
                                     transform=reader.transform)

    def add(self, y0: int, labels: np.ndarray) -> None:
        from rasterio.windows import Window
        self.dst.write(labels, 1, window=Window(0, y0, labels.shape[1], labels.shape[0]))

    def close(self) -> None:
        self.dst.close()


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


# --- outputs -----------------------------------------------------------------------------------------------------

class _Blocks:
    """Label rows arriving in order, passed on in whole block rows of BLOCK (and the rest at the end)."""

    def __init__(self, emit: Callable[[int, np.ndarray], None]):
        self.emit, self.parts, self.start, self.rows = emit, [], 0, 0

    def add(self, y0: int, labels: np.ndarray) -> None:
        if y0 != self.start + self.rows:
            raise AssertionError(f"rows {y0}.. arrived after rows up to {self.start + self.rows}")
        self.parts.append(labels)
        self.rows += len(labels)
        if self.rows >= BLOCK:
            self._flush(self.rows - self.rows % BLOCK)

    def close(self) -> None:
        if self.rows:
            self._flush(self.rows)

    def _flush(self, count: int) -> None:
        rows = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        self.emit(self.start, rows[:count])
        rest = rows[count:]
        self.parts, self.start, self.rows = ([rest] if len(rest) else []), self.start + count, len(rest)


def _color_table(classes: ClassSet, nodata: int) -> dict[int, tuple[int, int, int, int]]:
    """The colour of each class id, opaque, and the nodata value transparent."""
    table = {i: (*color, 255) for i, color in enumerate(classes.colors)}
    table[nodata] = (0, 0, 0, 0)
    return table


def label_tags(classes: ClassSet, provenance: dict[str, str]) -> dict[str, str]:
    """The metadata of a label raster: the class names (a JSON list and CLASS_<id>), what made it."""
    tags = {"CLASS_NAMES": json.dumps(list(classes.names)), "TIFFTAG_SOFTWARE": SOFTWARE, **provenance}
    tags.update({f"CLASS_{i}": name for i, name in enumerate(classes.names)})
    return tags


def _temp(path: Path, what: str) -> Path:
    """A temporary file beside `path`, hidden, per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.{what}{path.suffix}")


class LabelRaster:
    """The label COG of a map, written block row by block row into a tiled GeoTIFF, copied into a COG on close."""

    def __init__(self, path: Path, reader, classes: ClassSet, nodata: int, provenance: dict[str, str]):
        rasterio = _rasterio()
        self.path, self.tmp = path, _temp(path, "strips")
        profile = dict(driver="GTiff", width=reader.width, height=reader.height, count=1, dtype="uint8",
                       nodata=nodata, tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate",
                       BIGTIFF="IF_SAFER")
        if getattr(reader, "georeferenced", False):
            profile.update(crs=reader.crs, transform=reader.transform)
        with _quiet():
            self.dst = rasterio.open(self.tmp, "w", **profile)
        self.dst.write_colormap(1, _color_table(classes, nodata))
        self.dst.update_tags(**label_tags(classes, provenance))
        self.dst.set_band_description(1, "class")

    def add(self, y0: int, labels: np.ndarray) -> None:
        """Write rows y0.. (whole block rows but the last) of labels [n, W]."""
        from rasterio.windows import Window
        self.dst.write(labels, 1, window=Window(0, y0, labels.shape[1], labels.shape[0]))

    def close(self) -> None:
        """Finish the GeoTIFF and copy it into the COG at `path` (through a temporary file, so a kill never
        leaves half a COG there)."""
        rasterio = _rasterio()
        self.dst.close()
        cog = _temp(self.path, "cog")
        try:
            with _quiet():
                rasterio.shutil.copy(self.tmp, cog, driver="COG", compress="DEFLATE", blocksize=BLOCK,
                                     overview_resampling="NEAREST", bigtiff="IF_SAFER", num_threads="ALL_CPUS")
            os.replace(cog, self.path)
        finally:
            for f in (self.tmp, cog):
                f.unlink(missing_ok=True)

    def abort(self) -> None:
        """Remove what was written."""
        self.dst.close()
        self.tmp.unlink(missing_ok=True)


def _pixel_area_units(reader) -> float:
    """What one pixel's area is in --min-area's units: m² for a georeferenced raster, else 1 (pixels)."""
    if not getattr(reader, "georeferenced", False) or reader.crs is None:
        return 1.0
    t = reader.transform
    if reader.crs.is_geographic:
        raise CachedsegError(f"--min-area is in m², but {reader.path.name}'s CRS is geographic (degrees); "
                             "reproject it to a projected CRS (gdalwarp -t_srs EPSG:...) or leave --min-area out")
    metres = reader.crs.linear_units_factor[1]
    return abs(t.a * t.e - t.b * t.d) * metres ** 2


class Polygons:
    """One GeoPackage feature per connected region of a class (4-connected), built from finished block rows of
    labels: regions that cross from one block row into the next are merged, so a region is never cut."""

    def __init__(self, path: Path, reader, classes: ClassSet, nodata: int, options: PolygonOptions):
        self.shapely = _module("shapely")
        self.pyogrio = _module("pyogrio")
        _module("pyogrio.raw")
        self.path, self.tmp, self.classes, self.nodata, self.options = path, _temp(path, "part"), classes, nodata, options
        self.min_pixels = options.min_area / _pixel_area_units(reader) if options.min_area else 0.0
        t = reader.transform if getattr(reader, "georeferenced", False) else None
        # pixel (col, row) -> CRS (x, y) as a matrix product: [col, row] @ [[a, d], [b, e]] + [c, f]
        self.affine = None if t is None else (np.array([[t.a, t.d], [t.b, t.e]]), np.array([t.c, t.f]))
        self.crs = reader.crs.to_wkt() if getattr(reader, "crs", None) is not None else None
        self.open: list[tuple[int, object]] = []  # (class, polygon in pixels) touching the last block row's bottom
        self.bottom = 0  # the row where the open polygons end
        self.pending: list[tuple[int, object]] = []
        self.written, self.appending = 0, False

    def add(self, y0: int, labels: np.ndarray) -> None:
        """Vectorise rows y0.. of labels [n, W] (the rows right after the previous ones)."""
        from affine import Affine
        from rasterio.features import shapes
        shape = self.shapely.geometry.shape
        found = [(int(v), shape(g)) for g, v in shapes(labels, mask=labels != self.nodata, connectivity=4,
                                                         transform=Affine.translation(0, y0))]
        y1 = y0 + len(labels)
        top = [i for i, (_, g) in enumerate(found) if g.bounds[1] == y0]
        merged = self._merge(found, top, y0)
        still_open = []
        for cls, geom in merged:
            (still_open if geom.bounds[3] == y1 else self.pending).append((cls, geom))
        self.open, self.bottom = still_open, y1
        if len(self.pending) >= POLYGON_BATCH:
            self._write()

    def _merge(self, found: list, top: list[int], y0: int) -> list:
        """`found` with each polygon touching row y0 joined to the open ones of its class it shares an edge with
        (union-find over both), and the open polygons that join none finished."""
        if not self.open or self.bottom != y0:
            self.pending += self.open
            return found
        parent = list(range(len(self.open) + len(found)))  # open polygons first, then the new ones

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        tree = self.shapely.STRtree([g for _, g in self.open])
        for j in top:
            cls, geom = found[j]
            for i in tree.query(geom):
                other_cls, other = self.open[i]
                if other_cls == cls and geom.intersection(other).length > 0:  # an edge, not a corner
                    parent[root(len(self.open) + j)] = root(int(i))
        groups: dict[int, list[int]] = {}
        for i in range(len(parent)):
            groups.setdefault(root(i), []).append(i)
        every = self.open + found
        out = []
        for members in groups.values():
            if len(members) == 1 and members[0] < len(self.open):
                self.pending.append(self.open[members[0]])  # joined nothing below: finished
                continue
            geoms = [every[i][1] for i in members]
            out.append((every[members[0]][0], geoms[0] if len(geoms) == 1 else self.shapely.union_all(geoms)))
        return out

    def _write(self) -> None:
        """Write the finished polygons: small ones left out, mapped to the CRS, simplified."""
        shapely = self.shapely
        keep = [(c, g) for c, g in self.pending if g.area >= self.min_pixels]
        self.pending = []
        if not keep and self.appending:
            return
        geoms = np.array([g for _, g in keep] or [], dtype=object)
        if len(geoms) and self.affine is not None:
            matrix, offset = self.affine
            geoms = shapely.transform(geoms, lambda xy: xy @ matrix + offset)
        if len(geoms) and self.options.simplify:
            geoms = shapely.simplify(geoms, self.options.simplify, preserve_topology=True)
        parts = [(c, p) for (c, _), g in zip(keep, geoms)
                 for p in (g.geoms if g.geom_type == "MultiPolygon" else [g]) if not p.is_empty]
        with warnings.catch_warnings():  # pyogrio's warning about a layer without CRS: a raster without one
            warnings.simplefilter("ignore", UserWarning)
            self._append(parts)

    def _append(self, parts: list) -> None:
        """Append (class, polygon) features to the GeoPackage."""
        shapely = self.shapely
        self.pyogrio.raw.write(
            self.tmp, geometry=np.array(shapely.to_wkb([p for _, p in parts]), dtype=object),
            field_data=[np.array([c for c, _ in parts], dtype=np.int32),
                        np.array([self.classes.names[c] for c, _ in parts], dtype=object)],
            fields=["class_id", "class_name"], driver="GPKG", geometry_type="Polygon", crs=self.crs,
            layer=self.path.stem, append=self.appending)
        self.written += len(parts)
        self.appending = True

    def close(self) -> int:
        """Write what is left and move the GeoPackage into place; returns the features written."""
        self.pending += self.open
        self.open = []
        self._write()
        os.replace(self.tmp, self.path)
        return self.written

    def abort(self) -> None:
        """Remove what was written."""
        self.tmp.unlink(missing_ok=True)


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
    with _env():
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


def cog_problems(path: str | Path) -> list[str]:
    """Why a file is not a valid cloud-optimised GeoTIFF (empty when it is), checked as rio-cogeo's `cog_validate`
    and GDAL's validate_cloud_optimized_geotiff.py check: a GeoTIFF, internal overviews, tiled, the main IFD first
    (within the COG driver's ghost header), the overviews' IFDs after it in order, and the image data from the
    smallest overview up to the full resolution last."""
    rasterio = _rasterio()
    problems = []
    with _quiet(), rasterio.open(path) as src:
        if src.driver != "GTiff":
            return [f"driver {src.driver}, not GTiff"]
        if any(f.endswith(".ovr") for f in src.files):
            problems.append("overviews in an external .ovr file")
        overviews = src.overviews(1)
        if max(src.width, src.height) > BLOCK:
            if not src.profile.get("tiled"):
                problems.append("larger than 512 px but not tiled")
            if not overviews:
                problems.append("larger than 512 px but no overviews")
        if src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG":
            problems.append("no LAYOUT=COG in IMAGE_STRUCTURE")
        if overviews != sorted(overviews) or any(d <= 1 for d in overviews):
            problems.append(f"overview factors {overviews} not increasing from 2")
        ifds = [int(src.get_tag_item("IFD_OFFSET", "TIFF", bidx=1))]
        if ifds[0] >= 300:
            problems.append(f"main IFD at byte {ifds[0]}, not at the start")
        data = [int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1) or 0)]
        for i in range(len(overviews)):
            ifds.append(int(src.get_tag_item("IFD_OFFSET", "TIFF", bidx=1, ovr=i)))
            data.append(int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1, ovr=i) or 0))
        if ifds != sorted(ifds):
            problems.append(f"IFDs at {ifds}, not in increasing order")
        if not data[0]:
            problems.append("no first block")
        elif data[-1] < ifds[-1]:
            problems.append("the smallest level's data lies before its IFD")
        if any(data[i] < data[i + 1] for i in range(len(data) - 1)):
            problems.append(f"image data at {data}: not from the smallest overview up to the full resolution")
    return problems
