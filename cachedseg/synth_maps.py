"""Generated orthomosaics: `cachedseg.synth` scenes tiled over georeferenced GeoTIFFs with a nodata footprint, their
label rasters or vector labels, and a dataset file (`cachedseg synth DIR --maps`; tests, benchmarks, the README).

Needs the `maps` extra (rasterio; pyogrio and shapely for vector labels).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import numpy as np

from cachedseg.dataset import AEROSCAPES
from cachedseg.map_outputs import BLOCK
from cachedseg.rasters import gdal_env, _quiet, _rasterio
from cachedseg.synth import render_scene

MAPS_FILE = """# Generated orthomosaics (cachedseg synth --maps): extract them with --tile
name = "generated maps"
images = "maps/*.tif"
{labels}
[splits]
trn = "map_0*"
val = "map_1*"
"""


def synth_map(path: str | Path, width: int, height: int, seed: int = 0, gsd: float = 0.05, crs: str = "EPSG:32633",
              nodata: str = "alpha", scene: int = 256, labels: str | Path | None = None,
              origin: tuple[float, float] = (500_000.0, 5_500_000.0)) -> Path:
    """Write a generated orthomosaic (tests, benchmarks, the README's example): `cachedseg.synth` scenes of
    `scene` pixels tiled over a `width` x `height` GeoTIFF at `gsd` metres a pixel in `crs` (None: no
    georeference), its top-left corner at `origin`, written strip by strip; outside a footprint (a border and a
    cut corner) it is nodata, marked by an alpha band (`nodata="alpha"`) or by the value 0 (`"value"`, valid
    pixels then at least 1). With `labels`, the scenes' class indices go to that label raster too (same grid,
    uint8, 255 outside the footprint, which is its nodata value).
    """
    from affine import Affine
    from rasterio.windows import Window

    rasterio, path = _rasterio(), Path(path)
    rng = np.random.default_rng(seed)
    alpha = nodata == "alpha"
    profile = dict(driver="GTiff", width=width, height=height, count=4 if alpha else 3, dtype="uint8", tiled=True,
                   blockxsize=BLOCK // 2, blockysize=BLOCK // 2, compress="deflate", BIGTIFF="IF_SAFER")
    if alpha:
        profile["photometric"] = "RGB"
    else:
        profile["nodata"] = 0
    if crs is not None:
        profile.update(crs=crs, transform=Affine(gsd, 0, origin[0], 0, -gsd, origin[1]))
    label_profile = {**{k: v for k, v in profile.items() if k != "photometric"}, "count": 1, "nodata": 255}
    border = max(2, min(width, height) // 20)
    with contextlib.ExitStack() as files:
        files.enter_context(gdal_env())
        files.enter_context(_quiet())
        dst = files.enter_context(rasterio.open(path, "w", **profile))
        lab = files.enter_context(rasterio.open(labels, "w", **label_profile)) if labels is not None else None
        if alpha:
            from rasterio.enums import ColorInterp
            dst.colorinterp = (ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha)
        for y0 in range(0, height, scene):
            n = min(scene, height - y0)
            scenes = [render_scene(rng, scene, scene, oblique=False) for _ in range(0, width, scene)]
            rgb = np.concatenate([np.asarray(img)[:n, :min(scene, width - x)]
                                  for (img, _), x in zip(scenes, range(0, width, scene))], axis=1)  # [n, W, 3]
            rows, cols = np.mgrid[y0:y0 + n, 0:width]
            inside = ((rows >= border) & (rows < height - border) & (cols >= border) & (cols < width - border)
                      & (rows + cols >= (width + height) // 4))  # the top-left corner cut off diagonally
            if alpha:
                bands = np.concatenate([rgb.transpose(2, 0, 1), (inside * 255).astype(np.uint8)[None]])
            else:
                bands = np.where(inside[None], np.maximum(rgb.transpose(2, 0, 1), 1), 0).astype(np.uint8)
            dst.write(bands, window=Window(0, y0, width, n))
            if lab is not None:
                classes = np.concatenate([lbl[:n, :min(scene, width - x)]
                                          for (_, lbl), x in zip(scenes, range(0, width, scene))], axis=1)
                lab.write(np.where(inside, classes, 255).astype(np.uint8), 1, window=Window(0, y0, width, n))
    return path


def synth_map_dataset(root: str | Path, count: int = 2, width: int = 600, height: int = 400, seed: int = 0,
                      gsd: float = 0.05, vector_labels: bool = False,
                      progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write `count` generated orthomosaics `maps/map_<i>.tif` (RGBA, EPSG:32633, `gsd` metres a pixel, side by
    side), their labels and a `dataset.toml` into `root`: label rasters `labels/map_<i>.tif` (nodata 255
    outside the footprint), or with `vector_labels` one GeoPackage `labels.gpkg` of class polygons (a `class`
    field holding the class name). The first half of the maps (at least one) go to trn, the rest to val: map ids
    `map_0<i>` and `map_1<i>`.

    Returns:
        The orthomosaics written.
    """
    root = Path(root)
    (root / "maps").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    written, label_files = [], []
    trn = max(1, count // 2)
    for i in range(count):
        name = f"map_{0 if i < trn else 1}{i}"
        labels = root / "labels" / f"{name}.tif"
        written.append(synth_map(root / "maps" / f"{name}.tif", width, height, seed=seed * 1000 + i, gsd=gsd,
                                 labels=labels, origin=(500_000.0 + i * (width * gsd + 100), 5_500_000.0)))
        label_files.append(labels)
        if progress:
            progress(1)
    if vector_labels:
        polygons_of(label_files, root / "labels.gpkg")
        for f in label_files:
            f.unlink()
        (root / "labels").rmdir()
    classes = "".join(f'\n[[classes]]\nname = "{n}"\ncolor = {list(c)}\n'
                      for n, c in zip(AEROSCAPES.names, AEROSCAPES.colors))
    labels = ('labels = "labels.gpkg"\nlabel_field = "class"' if vector_labels else
              'masks = "labels/{stem}.tif"')
    (root / "dataset.toml").write_text(MAPS_FILE.format(labels=labels) + classes)
    return written


def polygons_of(label_rasters: list[Path], path: Path) -> Path:
    """One GeoPackage of the class regions of label rasters (all in one CRS), a `class` field naming each class:
    vector labels that rasterise back to the rasters exactly."""
    import pyogrio.raw
    import shapely
    from rasterio.features import shapes

    rasterio = _rasterio()
    geoms, names, crs = [], [], None
    for raster in label_rasters:
        with rasterio.open(raster) as src:
            labels, crs = src.read(1), src.crs
            for shape, value in shapes(labels, mask=labels != 255, connectivity=4, transform=src.transform):
                geoms.append(shapely.geometry.shape(shape))
                names.append(AEROSCAPES.names[int(value)])
    pyogrio.raw.write(path, geometry=np.array(shapely.to_wkb(geoms), dtype=object),
                      field_data=[np.array(names, dtype=object)], fields=["class"], driver="GPKG",
                      geometry_type="Polygon", crs=crs.to_wkt())
    return path
