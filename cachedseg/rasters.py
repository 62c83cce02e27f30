"""Rasters in: GeoTIFFs (and frames) read a strip of rows or a window at a time, with their validity, resampled to a
ground sample distance as they are read; label rasters on an image's grid. The one owner of raster reading.

A map is RGB or RGBA, 8-bit; an alpha band, a nodata value or an internal mask (GDAL's `dataset_mask`) marks the
pixels outside it. With a GSD, a WarpedVRT resamples the raster (bilinear; labels nearest) over the same extent,
window by window: the same pixels as a whole-raster warp (an alpha band is added to a source without one, which
makes GDAL's warper give equal results for any window).

rasterio (the `maps` extra) is imported when a raster is read, never before.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cachedseg.dataset import MAX_PIXELS, own_pixel_limit
from cachedseg.errors import CachedsegError, first_line
from cachedseg.tiles import RasterGrid

TIFF_SUFFIXES = (".tif", ".tiff")
EXTRA = "pip install 'cachedseg[maps]'"
# GDAL's block cache (default 5% of RAM, which a large map would fill): a strip of windows touches about three rows
# of a map's blocks, 60 MB at 20,000 px wide in 256-px RGBA blocks
GDAL_CACHE_MB = 128
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


def gdal_env():
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
    with gdal_env():
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
