"""Maps out: the label raster (a cloud-optimised GeoTIFF) and the polygons (a GeoPackage) of a map's labels, written
block row by block row as the labels arrive, top to bottom.

The labels go to a tiled, compressed GeoTIFF block row by block row, which is then copied into a COG (GDAL's COG
driver only copies; writing one directly would hold the whole raster in memory): uint8 class ids, the run's
ignore label as nodata where the input is nodata, the input's CRS, transform and size, the classes' colour table,
their names in the metadata. `--polygons` vectorises each finished block row and merges the regions that cross
block rows, so each connected region is one feature.

rasterio, pyogrio and shapely (the `maps` extra) are imported when a map is written, never before.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cachedseg import __version__
from cachedseg.classes import ClassSet
from cachedseg.errors import CachedsegError
from cachedseg.rasters import _module, _quiet, _rasterio

SOFTWARE = f"cachedseg {__version__}"  # TIFFTAG_SOFTWARE of every label raster: it is never taken for an input
BLOCK = 512  # label raster tiles, and the rows vectorised at a time
POLYGON_BATCH = 10_000  # features written to the GeoPackage at a time


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
