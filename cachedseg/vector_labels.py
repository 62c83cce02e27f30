"""Vector labels: class polygons in a GeoPackage or GeoJSON, rasterised onto an image's grid.

A dataset file may give its labels as one vector file instead of mask images (`labels = "labels.gpkg"`,
`label_field = "class"`): each feature is a polygon of one class, its field holding the class index or the class
name. For every image (or window of one) the polygons that touch it are read (by bounding box, so a GeoPackage's
spatial index keeps this fast on large files), reprojected to the image's CRS if theirs differs, and burnt into
class indices at pixel centres (GDAL's rule: a pixel is a polygon's if its centre lies inside), later features
over earlier ones; pixels no polygon covers get the ignore label. A polygons file that `cachedseg predict
--polygons` wrote is a valid labels file (`class_id`), so a corrected prediction can become training labels.

Needs the `maps` extra (rasterio, pyogrio, shapely), imported only when a vector file is read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cachedseg.classes import ClassSet
from cachedseg.errors import CachedsegError

VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".fgb")
POLYGONAL = {"Polygon", "MultiPolygon", "Polygon Z", "MultiPolygon Z", "Unknown", "Geometry"}


def _modules():
    """rasterio, pyogrio and shapely, or one line saying how to get them."""
    try:
        import pyogrio
        import rasterio
        import shapely
    except ImportError:
        raise CachedsegError("vector labels need the maps extra: pip install 'cachedseg[maps]'") from None
    return rasterio, pyogrio, shapely


@dataclass(frozen=True)
class VectorLabels:
    """A vector file of class polygons, and how its features name their class.

    Attributes:
        path: The GeoPackage, GeoJSON (or any OGR vector file) holding the polygons.
        field: The attribute that holds each feature's class: an index (0..K-1, or the ignore label) or a name.
        classes: The dataset's classes (the names a string field may use; the ignore label for uncovered pixels).
    """

    path: Path
    field: str
    classes: ClassSet

    def check(self) -> None:
        """Refuse, in one line each, a file that is missing or unreadable, lacks the field or holds no polygons."""
        self._info()

    @functools.cached_property
    def _meta(self) -> tuple[str | None, str]:
        """(CRS as GDAL's user input, geometry type) of the first layer, read once."""
        return self._info()

    def _info(self) -> tuple[str | None, str]:
        """(CRS, geometry type) of the file's first layer, checked."""
        _, pyogrio, _ = _modules()
        if not self.path.is_file():
            raise CachedsegError(f"{self.path} (the dataset's labels) is missing; add it or fix `labels` in the "
                                 "dataset file")
        try:
            info = pyogrio.read_info(self.path)
        except Exception as exc:  # pyogrio raises its own DataSourceError and friends
            raise CachedsegError(f"{self.path} is not a readable vector file ({exc}); give a GeoPackage or "
                                 "GeoJSON of class polygons") from None
        fields = list(info["fields"])
        if self.field not in fields:
            raise CachedsegError(f"{self.path} has no field {self.field!r} (its fields: {', '.join(fields) or 'none'}); "
                                 "set label_field in the dataset file to the one that holds the class")
        if info["geometry_type"] not in POLYGONAL:
            raise CachedsegError(f"{self.path} holds {info['geometry_type']} features; labels must be polygons")
        return info["crs"], info["geometry_type"]

    def _value(self, raw) -> int | None:
        """The class index a field value names (None: not a class)."""
        if isinstance(raw, (bytes, str)):
            text = raw.decode() if isinstance(raw, bytes) else raw
            if text in self.classes.names:
                return self.classes.names.index(text)
            raw = int(text) if text.strip().lstrip("-").isdigit() else None
        if raw is None or (isinstance(raw, float) and not float(raw).is_integer()):
            return None
        value = int(raw)
        return value if 0 <= value < len(self.classes) or value == self.classes.ignore_index else None

    def rasterize(self, transform, shape: tuple[int, int], crs=None) -> np.ndarray:
        """The class indices [H, W] uint8 of the grid `transform` (an affine of the image or a window of it) and
        `shape` (height, width), in `crs` (None: the image has none; the polygons are then taken as pixel or map
        coordinates of that grid as they are).

        Raises:
            CachedsegError: If the file is unreadable, a feature names no class, or the CRSs cannot be matched.
        """
        rasterio, pyogrio, shapely = _modules()
        from rasterio.features import rasterize
        from rasterio.transform import array_bounds
        from rasterio.warp import transform_bounds, transform_geom

        vector_crs, _ = self._meta
        height, width = shape
        bounds = array_bounds(height, width, transform)  # (west, south, east, north)
        reproject = False
        if vector_crs is not None and crs is not None:
            target, source = rasterio.crs.CRS.from_user_input(crs), rasterio.crs.CRS.from_user_input(vector_crs)
            reproject = target != source
            if reproject:
                bounds = transform_bounds(target, source, *bounds)
        elif vector_crs is not None and crs is None:
            raise CachedsegError(f"{self.path} is in {vector_crs} but its image has no coordinate system; give "
                                 "georeferenced images (GeoTIFFs) or labels without a CRS in pixel coordinates")
        try:
            _, _, wkb, (values,) = pyogrio.raw.read(self.path, columns=[self.field], bbox=tuple(bounds))
        except Exception as exc:
            raise CachedsegError(f"{self.path} could not be read ({exc})") from None
        fill = self.classes.ignore_index
        if len(values) == 0:
            return np.full(shape, fill, np.uint8)
        pairs = []
        for geometry, raw in zip(shapely.from_wkb(wkb), values):
            value = self._value(raw)
            if value is None:
                raise CachedsegError(f"{self.path}: a feature's {self.field} is {raw!r}, which names no class (give "
                                     f"0..{len(self.classes) - 1}, {fill} to ignore, or one of "
                                     f"{', '.join(self.classes.names)})")
            if geometry is None or geometry.is_empty:
                continue
            shape_ = shapely.geometry.mapping(geometry)
            pairs.append((transform_geom(vector_crs, crs, shape_) if reproject else shape_, value))
        if not pairs:
            return np.full(shape, fill, np.uint8)
        return rasterize(pairs, out_shape=shape, transform=transform, fill=fill, dtype="uint8")

    def labels_of(self, image: str | Path, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """The class indices [H, W] uint8 of an image (its own grid, read from its header) or of a window of it,
        (y0, x0, height, width) in its pixels."""
        rasterio, _, _ = _modules()
        import warnings

        from affine import Affine
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # frames: pixel coordinates
                with rasterio.open(image) as src:
                    transform, crs, size = src.transform, src.crs, (src.height, src.width)
        except rasterio.errors.RasterioIOError as exc:
            raise CachedsegError(f"{image} is not a readable image ({exc}); replace or remove it") from None
        if window is None:
            return self.rasterize(transform, size, crs)
        y0, x0, height, width = window
        return self.rasterize(transform @ Affine.translation(x0, y0), (height, width), crs)


def is_vector_file(path: str | Path) -> bool:
    """Whether a path names a vector file (by its suffix)."""
    return Path(path).suffix.lower() in VECTOR_SUFFIXES
