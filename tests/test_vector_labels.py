"""Vector labels (cachedseg.vector_labels): class polygons rasterised onto an image's grid give back the label
raster they were drawn from, windows agree with the whole, other CRSs are reprojected, and bad files are one line."""

import numpy as np
import pytest

from cachedseg.classes import ClassSet
from cachedseg.errors import CachedsegError
from cachedseg.synth_maps import synth_map
from cachedseg.vector_labels import VectorLabels

rasterio = pytest.importorskip("rasterio")  # the maps extra (in dev)
pyogrio = pytest.importorskip("pyogrio")
shapely = pytest.importorskip("shapely")

CLASSES = ClassSet(("ground", "road", "building", "water"), ((0, 0, 0), (128, 128, 128), (200, 0, 0), (0, 0, 255)))
SIZE = (130, 170)  # height, width


def _labels(seed: int = 0) -> np.ndarray:
    """Blocky class indices with a strip of ignore, as an annotator's polygons would give."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, len(CLASSES), (SIZE[0] // 10 + 1, SIZE[1] // 10 + 1))
    labels = np.kron(coarse, np.ones((10, 10), int))[:SIZE[0], :SIZE[1]].astype(np.uint8)
    labels[:, :7] = CLASSES.ignore_index  # unlabelled: no polygon there
    return labels


def _write_polygons(path, labels: np.ndarray, transform, crs, names: bool = False, to_crs=None) -> None:
    """The regions of `labels` (not the ignore label) as a vector file with a `class` field."""
    from rasterio.features import shapes
    from rasterio.warp import transform_geom
    geoms, values = [], []
    for shape, value in shapes(labels, mask=labels != CLASSES.ignore_index, transform=transform):
        geoms.append(shapely.geometry.shape(transform_geom(crs, to_crs, shape) if to_crs else shape))
        values.append(CLASSES.names[int(value)] if names else int(value))
    field = np.array(values, dtype=object if names else np.int32)
    pyogrio.raw.write(path, geometry=shapely.to_wkb(geoms), field_data=[field], fields=["class"],
                      geometry_type="Polygon", crs=str(to_crs or crs), driver="GPKG" if str(path).endswith("gpkg")
                      else "GeoJSON")


@pytest.fixture(scope="module")
def ortho(tmp_path_factory):
    """A generated georeferenced image of SIZE and its transform and CRS."""
    path = synth_map(tmp_path_factory.mktemp("vector") / "ortho.tif", SIZE[1], SIZE[0], seed=3)
    with rasterio.open(path) as src:
        return path, src.transform, src.crs


@pytest.mark.parametrize("names, suffix", [(False, "gpkg"), (True, "geojson")])
def test_polygons_rasterise_back_to_the_labels_they_were_drawn_from(ortho, tmp_path, names, suffix):
    path, transform, crs = ortho
    labels = _labels()
    _write_polygons(tmp_path / f"labels.{suffix}", labels, transform, crs, names=names)
    got = VectorLabels(tmp_path / f"labels.{suffix}", "class", CLASSES).labels_of(path)
    assert got.dtype == np.uint8 and got.shape == SIZE
    np.testing.assert_array_equal(got, labels)


def test_a_window_is_the_crop_of_the_whole(ortho, tmp_path):
    path, transform, crs = ortho
    _write_polygons(tmp_path / "labels.gpkg", _labels(1), transform, crs)
    vectors = VectorLabels(tmp_path / "labels.gpkg", "class", CLASSES)
    whole = vectors.labels_of(path)
    for y0, x0, h, w in [(0, 0, 56, 56), (37, 91, 56, 79), (74, 114, 56, 56)]:
        np.testing.assert_array_equal(vectors.labels_of(path, (y0, x0, h, w)), whole[y0:y0 + h, x0:x0 + w])


def test_polygons_in_another_crs_are_reprojected_onto_the_image(ortho, tmp_path):
    path, transform, crs = ortho
    labels = _labels(2)
    _write_polygons(tmp_path / "wgs84.gpkg", labels, transform, crs, to_crs="EPSG:4326")
    got = VectorLabels(tmp_path / "wgs84.gpkg", "class", CLASSES).labels_of(path)
    # Reprojecting each vertex moves edges by a fraction of a pixel: at most a pixel's ring of changes.
    assert (got == labels).mean() > 0.97


def test_bad_vector_labels_are_one_line_each(ortho, tmp_path):
    path, transform, crs = ortho
    labels = _labels()
    _write_polygons(tmp_path / "labels.gpkg", labels, transform, crs)
    with pytest.raises(CachedsegError, match="label_field"):
        VectorLabels(tmp_path / "labels.gpkg", "klass", CLASSES).check()
    with pytest.raises(CachedsegError, match="missing"):
        VectorLabels(tmp_path / "none.gpkg", "class", CLASSES).check()
    (tmp_path / "junk.gpkg").write_text("not a geopackage")
    with pytest.raises(CachedsegError, match="vector file"):
        VectorLabels(tmp_path / "junk.gpkg", "class", CLASSES).check()
    few = ClassSet(CLASSES.names[:2], CLASSES.colors[:2])  # the file names classes 2 and 3 too
    with pytest.raises(CachedsegError, match="names no class"):
        VectorLabels(tmp_path / "labels.gpkg", "class", few).labels_of(path)
    frame = tmp_path / "frame.png"
    from PIL import Image
    Image.new("RGB", SIZE[::-1]).save(frame)
    with pytest.raises(CachedsegError, match="coordinate system"):
        VectorLabels(tmp_path / "labels.gpkg", "class", CLASSES).labels_of(frame)
