"""Maps: GeoTIFFs predicted by sliding windows into a label COG and a GeoPackage (cachedseg.maps): georeference and
nodata kept, colours and class names recorded, a valid COG, no seams, memory flat in the raster's height, polygons
that add up to the labelled area, and one-line errors for rasters the model cannot read."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cachedseg import checkpoint, maps, rasters
from cachedseg.backbone import backbone_for
from cachedseg.data import preprocess_image
from cachedseg.map_outputs import PolygonOptions, Polygons, cog_problems
from cachedseg.maps import predict_map
from cachedseg.synth_maps import synth_map
from cachedseg.predict import segment_batch, window_model
from cachedseg.tiles import Grid
from tests.conftest import MIN_AGREEMENT, PEAK_GROWTH, damage_tile, one_line_error, run_cli

rasterio = pytest.importorskip("rasterio")  # the maps extra (in dev)
pyogrio = pytest.importorskip("pyogrio")
shapely = pytest.importorskip("shapely")

GSD = 0.05  # metres a pixel, as synth_map writes EPSG:32633
CPU = ["--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def orthos(tmp_path_factory):
    """Two generated 600x400 orthomosaics with a nodata border: one marked by an alpha band, one by the value 0."""
    folder = tmp_path_factory.mktemp("orthos")
    return [synth_map(folder / "alpha.tif", 600, 400, seed=1),
            synth_map(folder / "value.tif", 600, 400, seed=2, nodata="value")]


@pytest.fixture(scope="module")
def predicted(orthos, run32, tmp_path_factory):
    """`predict` of both maps with --polygons: the output folder."""
    out = tmp_path_factory.mktemp("maps-out")
    run_cli("predict", *orthos, "--run-dir", run32, "--out", out, "--polygons", *CPU)
    return out


def test_map_keeps_the_georeference_of_its_input(orthos, predicted):
    for ortho in orthos:
        with rasterio.open(ortho) as src, rasterio.open(predicted / f"{ortho.stem}_label.tif") as out:
            assert out.crs == src.crs and out.crs.to_epsg() == 32633
            assert out.transform == src.transform and out.transform.a == GSD
            assert (out.width, out.height) == (src.width, src.height) and out.bounds == src.bounds
            assert out.count == 1 and out.dtypes == ("uint8",)


def test_nodata_is_the_ignore_label_exactly_where_the_input_is_nodata(orthos, predicted, run32):
    ignore = checkpoint.load_run(run32).spec.ignore_index
    for ortho in orthos:
        with rasterio.open(ortho) as src, rasterio.open(predicted / f"{ortho.stem}_label.tif") as out:
            outside = src.dataset_mask() == 0
            labels = out.read(1)
            assert out.nodata == ignore
            assert 0 < outside.mean() < 0.5  # the fixture does have a border, and a map inside it
            assert np.array_equal(labels == ignore, outside)
            assert labels[~outside].max() < len(checkpoint.load_run(run32).spec.class_names)


def test_label_raster_has_the_run_colours_and_class_names(orthos, predicted, run32):
    classes = checkpoint.load_run(run32).spec.classes
    with rasterio.open(predicted / f"{orthos[0].stem}_label.tif") as out:
        table, tags = out.colormap(1), out.tags()
    for i, color in enumerate(classes.colors):
        assert table[i] == (*color, 255)
    assert table[classes.ignore_index][3] == 0  # nodata transparent
    assert json.loads(tags["CLASS_NAMES"]) == list(classes.names)
    assert all(tags[f"CLASS_{i}"] == name for i, name in enumerate(classes.names))
    assert tags["TIFFTAG_SOFTWARE"].startswith("cachedseg")


def test_label_raster_is_a_valid_cog(orthos, predicted):
    from rio_cogeo.cogeo import cog_validate  # rio-cogeo's own validator (dev), beside ours (no extra needed)
    for ortho in orthos:
        path = predicted / f"{ortho.stem}_label.tif"
        assert cog_problems(path) == []
        valid, errors, warnings = cog_validate(path, strict=True)
        assert valid and not errors and not warnings, (errors, warnings)
        with rasterio.open(path) as out:
            assert out.driver == "GTiff" and out.profile["tiled"] and out.profile["compress"] == "deflate"
            assert out.overviews(1) == [2]  # 600 px: one level below the 512 px tile
            assert out.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    assert [p.name for p in predicted.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_cog_validator_finds_a_plain_tiff_wanting(tmp_path):
    path = tmp_path / "plain.tif"
    with rasterio.open(path, "w", driver="GTiff", width=700, height=600, count=1, dtype="uint8") as dst:
        dst.write(np.zeros((1, 600, 700), np.uint8))
    problems = cog_problems(path)
    assert any("tiled" in p for p in problems) and any("overviews" in p for p in problems)
    from rio_cogeo.cogeo import cog_validate
    assert not cog_validate(path, quiet=True)[0]  # rio-cogeo agrees


def test_polygons_add_up_to_the_labelled_area(orthos, predicted, run32):
    classes = checkpoint.load_run(run32).spec.classes
    for ortho in orthos:
        with rasterio.open(predicted / f"{ortho.stem}_label.tif") as out:
            labels, crs = out.read(1), out.crs
        meta, _, geometry, (ids, names) = pyogrio.raw.read(predicted / f"{ortho.stem}.gpkg")
        assert rasterio.crs.CRS.from_user_input(meta["crs"]) == crs
        assert meta["fields"].tolist() == ["class_id", "class_name"]
        assert all(classes.names[i] == n for i, n in zip(ids, names))
        geoms = shapely.from_wkb(geometry)
        assert set(shapely.get_type_id(geoms)) == {3}  # polygons
        labelled = labels != classes.ignore_index
        assert shapely.area(geoms).sum() == pytest.approx(labelled.sum() * GSD ** 2, rel=1e-9)
        for i in np.unique(labels[labelled]):
            assert shapely.area(geoms[ids == i]).sum() == pytest.approx((labels == i).sum() * GSD ** 2, rel=1e-9)


def _regions(labels: np.ndarray, nodata: int) -> list:
    """The 4-connected regions of a whole label array: (class, polygon in pixels)."""
    from rasterio.features import shapes
    return [(int(v), shapely.geometry.shape(g)) for g, v in shapes(labels, mask=labels != nodata, connectivity=4)]


def test_polygons_are_merged_across_block_rows(tmp_path, run32):
    classes = checkpoint.load_run(run32).spec.classes
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 4, (12, 10), dtype=np.uint8)
    labels = np.kron(coarse, np.ones((17, 19), np.uint8))[:190, :181]  # blocks that cross any row cut
    labels[rng.random(labels.shape) < 0.01] = 255  # nodata specks, and holes in regions
    reader = SimpleNamespace(georeferenced=False, crs=None, transform=None, path=tmp_path / "x.tif")
    expected = _regions(labels, 255)
    for rows in (190, 37, 16):  # whole, and cut into strips that regions cross (and strips of one region row)
        polygons = Polygons(tmp_path / f"p{rows}.gpkg", reader, classes, 255, PolygonOptions())
        for y0 in range(0, len(labels), rows):
            polygons.add(y0, labels[y0:y0 + rows])
        assert polygons.close() == len(expected)
        _, _, geometry, (ids, _) = pyogrio.raw.read(tmp_path / f"p{rows}.gpkg")
        geoms = shapely.from_wkb(geometry)
        for cls in range(4):
            want = shapely.union_all([g for c, g in expected if c == cls])
            assert shapely.union_all(geoms[ids == cls]).symmetric_difference(want).area == 0
            assert sorted(shapely.area(geoms[ids == cls])) == sorted(g.area for c, g in expected if c == cls)


def test_min_area_and_simplify(orthos, predicted, run32, tmp_path):
    run_cli("predict", orthos[0], "--run-dir", run32, "--out", tmp_path, "--polygons", "--min-area", "0.5",
            "--simplify", "0.1", *CPU)
    every = shapely.from_wkb(pyogrio.raw.read(predicted / f"{orthos[0].stem}.gpkg")[2])
    kept = shapely.from_wkb(pyogrio.raw.read(tmp_path / f"{orthos[0].stem}.gpkg")[2])
    large = every[shapely.area(every) >= 0.5]  # m²: 200 pixels at 5 cm
    assert 0 < len(kept) == len(large) < len(every)
    assert shapely.get_num_coordinates(kept).sum() < shapely.get_num_coordinates(large).sum()
    assert shapely.area(kept).sum() == pytest.approx(shapely.area(large).sum(), rel=0.02)


def _window_model(run):
    """The run's window model, backbone and checkpoint, on the CPU."""
    ckpt = checkpoint.load_run(run)
    backbone = backbone_for(ckpt.spec, ckpt.weights, "cpu", ckpt.decoder_config.layers)
    decoder = ckpt.decoder()
    return window_model(backbone, ckpt.spec, decoder), backbone, decoder, ckpt


@pytest.mark.parametrize("width,height", [(504, 308), (600, 400)])  # windows that fit exactly, and shifted ones
def test_no_seams_a_window_alone_predicts_its_centre(run32, tmp_path, width, height):
    ortho = synth_map(tmp_path / "m.tif", width, height, seed=3)
    model, backbone, decoder, ckpt = _window_model(run32)
    overlap = 14
    written = predict_map(ortho, tmp_path, model, ckpt.spec.classes, overlap, batch_size=3)
    with rasterio.open(written.label) as out, rasterio.open(ortho) as src:
        tiled, pixels, valid = out.read(1), src.read((1, 2, 3)).transpose(1, 2, 0), src.dataset_mask() > 0
    grid = Grid(height, width, model.size, overlap)
    h, w = model.size
    covered = np.zeros((height, width), np.int32)
    for y in grid.rows:
        for x in grid.cols:
            covered[y:y + h, x:x + w] += 1
    agree = total = 0
    for y in grid.rows:
        for x in grid.cols:
            window = pixels[y:y + h, x:x + w]
            alone = segment_batch(preprocess_image(Image.fromarray(window), backbone.preprocess)[None], [(h, w)],
                                  backbone, ckpt.spec, decoder)[0]
            centre = (covered[y:y + h, x:x + w] == 1) & valid[y:y + h, x:x + w]  # no other window there
            if width == 504:  # regular steps: the centre is everything at least `overlap` from the window's edges
                inner = np.zeros((h, w), bool)
                inner[overlap:h - overlap, overlap:w - overlap] = True
                assert not (inner & (covered[y:y + h, x:x + w] > 1)).any()
            agree += int((tiled[y:y + h, x:x + w][centre] == alone[centre]).sum())
            total += int(centre.sum())
    assert total > 0.3 * valid.sum()
    assert agree / total >= MIN_AGREEMENT
    inside = sum(valid[y:y + h, x:x + w].any() for y in grid.rows for x in grid.cols)
    assert written.windows == inside  # the windows wholly outside the map were skipped


def test_a_raster_smaller_than_a_window(run32, tmp_path):
    ortho = synth_map(tmp_path / "tiny.tif", 90, 70, seed=4)
    run_cli("predict", ortho, "--run-dir", run32, "--out", tmp_path / "out", *CPU)
    with rasterio.open(tmp_path / "out" / "tiny_label.tif") as out, rasterio.open(ortho) as src:
        assert (out.width, out.height) == (90, 70) and out.transform == src.transform
        assert np.array_equal(out.read(1) == 255, src.dataset_mask() == 0)


@pytest.mark.subprocess
def test_peak_memory_does_not_grow_with_the_height_of_the_map(run32, tmp_path):
    # A raster 4x as tall: a whole-raster buffer of probabilities would be 12 x 1792 x 336 x 4 B = 29 MB more, a
    # labels buffer 0.6 MB; strips keep the peak where it was. Measured in a fresh process (see PEAK_GROWTH), after
    # one run of each (allocator pools, GDAL, the model); the least of two runs each, as a first run after a
    # reset of the peak can read up to 15 MB higher either way.
    code = PEAK_GROWTH + textwrap.dedent(f"""
        from pathlib import Path
        from tests.test_maps import _window_model
        from cachedseg.maps import predict_map
        from cachedseg.synth_maps import synth_map
        model, _, _, ckpt = _window_model({str(run32)!r})
        out = Path({str(tmp_path)!r})
        short, tall = synth_map(out / "short.tif", 336, 448, seed=5), synth_map(out / "tall.tif", 336, 1792, seed=6)
        run = lambda path: predict_map(path, out, model, ckpt.spec.classes, 14, batch_size=4)
        run(short), run(tall)
        peaks = [grown(lambda: run(path))[0] for path in (short, tall, short, tall)]
        print(min(peaks[0::2]), min(peaks[1::2]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    short, tall = map(int, proc.stdout.split())
    assert tall - short < 12, f"peak grew by {short} MB for the short map, {tall} MB for the one 4x as tall"


def test_a_tiff_without_crs_stays_a_frame_unless_tile(run32, tmp_path):
    plain = tmp_path / "plain.tif"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(plain)
    run_cli("predict", plain, "--run-dir", run32, "--out", tmp_path / "frames", *CPU)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [
        "plain_color.png", "plain_label.png", "plain_overlay.png"]
    run_cli("predict", plain, "--run-dir", run32, "--out", tmp_path / "tiled", "--tile", *CPU)
    with rasterio.open(tmp_path / "tiled" / "plain_label.tif") as out:
        assert (out.width, out.height) == (160, 120) and out.crs is None and cog_problems(out.name) == []


def test_tile_on_a_frame_writes_its_pngs_at_its_size(dataset, run32, tmp_path):
    frame = sorted((dataset / "JPEGImages").glob("*.jpg"))[0]
    run_cli("predict", frame, "--run-dir", run32, "--out", tmp_path, "--tile", "--tile-overlap", "28", *CPU)
    labels = np.asarray(Image.open(tmp_path / f"{frame.stem}_label.png"))
    assert labels.shape == (120, 160) and labels.max() < 12
    assert Image.open(tmp_path / f"{frame.stem}_overlay.png").width == 160


def test_tile_lifts_the_pixel_limit_for_frames(dataset, run32, tmp_path, monkeypatch):
    import cachedseg.dataset
    import cachedseg.predict
    for module in (cachedseg.dataset, cachedseg.predict, rasters):
        monkeypatch.setattr(module, "MAX_PIXELS", 10_000)  # 160x120 frames are then "too large"
    frame = sorted((dataset / "JPEGImages").glob("*.jpg"))[0]
    one_line_error(run_cli("predict", frame, "--run-dir", run32, "--out", tmp_path, *CPU, ok=False), "--tile",
                   frame.name)
    run_cli("predict", frame, "--run-dir", run32, "--out", tmp_path, "--tile", *CPU)
    assert (tmp_path / f"{frame.stem}_label.png").exists()


def test_predict_never_reads_its_own_label_rasters(orthos, run32, tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    (folder / orthos[0].name).write_bytes(orthos[0].read_bytes())
    run_cli("predict", folder, "--run-dir", run32, "--out", folder, *CPU)
    again = run_cli("predict", folder, "--run-dir", run32, "--out", folder, *CPU)
    assert f"{orthos[0].stem}_label.tif" in again.output  # left out, named
    assert sorted(p.name for p in folder.iterdir()) == [orthos[0].name, f"{orthos[0].stem}_label.tif"]


def _raster(path: Path, count: int, dtype: str = "uint8", **extra) -> Path:
    """A small georeferenced raster of `count` bands."""
    from affine import Affine
    with rasterio.open(path, "w", driver="GTiff", width=64, height=48, count=count, dtype=dtype, crs="EPSG:32633",
                       transform=Affine(GSD, 0, 500_000, 0, -GSD, 5_500_000), **extra) as dst:
        dst.write(np.ones((count, 48, 64), dtype=dtype))
    return path


@pytest.mark.parametrize("kind", ["two bands", "five bands", "16-bit", "fourth band not alpha"])
def test_a_raster_the_model_cannot_read_is_one_line(run32, tmp_path, kind):
    path = tmp_path / f"{kind.replace(' ', '_')}.tif"
    {"two bands": lambda: _raster(path, 2), "five bands": lambda: _raster(path, 5),
     "16-bit": lambda: _raster(path, 3, "uint16"), "fourth band not alpha": lambda: _raster(path, 4, photometric="MINISBLACK")}[kind]()  # RGB + near infrared, say
    result = run_cli("predict", path, "--run-dir", run32, "--out", tmp_path / "out", *CPU, ok=False)
    one_line_error(result, path.name)
    assert not (tmp_path / "out" / f"{path.stem}_label.tif").exists()


def test_an_unreadable_file_and_a_damaged_tile_are_one_line(run32, tmp_path):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    one_line_error(run_cli("predict", garbage, "--run-dir", run32, "--out", tmp_path / "out", "--tile", *CPU,
                           ok=False), garbage.name)
    damaged = synth_map(tmp_path / "damaged.tif", 600, 400, seed=7)
    damage_tile(damaged)
    out = tmp_path / "out"
    one_line_error(run_cli("predict", damaged, "--run-dir", run32, "--out", out, *CPU, ok=False), damaged.name)
    assert not list(out.glob("*damaged*")) and not list(out.glob(".*"))  # nothing half-written left behind


def test_the_maps_extra_is_named_when_missing(monkeypatch, orthos, run32, tmp_path):
    real = rasters.importlib.import_module

    def missing(name, *args):
        if name.split(".")[0] in ("rasterio", "pyogrio", "shapely"):
            raise ImportError(name)
        return real(name, *args)
    monkeypatch.setattr(rasters.importlib, "import_module", missing)
    one_line_error(run_cli("predict", orthos[0], "--run-dir", run32, "--out", tmp_path, *CPU, ok=False),
                   "cachedseg[maps]")


def test_windows_are_batched(run32, tmp_path):
    ortho = synth_map(tmp_path / "m.tif", 300, 200, seed=8)
    model, *_, ckpt = _window_model(run32)
    sizes = []
    counted = maps.WindowModel(model.size, model.classes, model.prepare,
                               lambda x: sizes.append(len(x)) or model.run(x), model.device)
    written = predict_map(ortho, tmp_path, counted, ckpt.spec.classes, 14, batch_size=3)
    assert max(sizes) == 3 and sum(sizes) == written.windows
    assert torch.is_tensor(model.run(torch.zeros(1, 3, *model.size)))


@pytest.mark.parametrize("height, width, size, overlap", [(300, 1000, (112, 112), 14), (90, 70, (112, 112), 14),
                                                          (500, 777, (98, 140), 28)])
def test_the_strip_holds_only_a_band_yet_sums_as_the_whole_raster(height, width, size, overlap):
    """The strip keeps a band of columns and a carry, not the whole strip: its labels are the argmax of the weighted
    sums over the whole raster, with windows skipped here and there (outside the map)."""
    grid, k = Grid(height, width, size, overlap), 5
    strip = maps._Strip(grid, maps.WindowModel(size, k, None, None, torch.device("cpu")))
    rng = np.random.default_rng(0)
    whole, labels = torch.zeros(k, height, width), np.zeros((height, width), np.uint8)
    for r, y in enumerate(grid.rows):
        n = min(y + size[0], height) - y
        for c, x in enumerate(grid.cols):
            if rng.random() < 0.3:
                continue  # a window wholly outside the map: never added
            probs, m = torch.rand(k, *size), min(x + size[1], width) - x
            strip.add(r, c, probs)
            whole[:, y:y + n, x:x + m] += probs[:, :n, :m] * torch.from_numpy(grid.weight(r, c)[:n, :m])
        final = grid.final_after(r) - y
        labels[y:y + final] = strip.finish(r, np.ones((n, width), bool), 255)
    assert np.array_equal(labels, whole.argmax(0).numpy())
    assert strip.band.shape[2] <= 2 * size[1]  # a band of two windows' width, whatever the raster's
