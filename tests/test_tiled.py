"""Tiled stores (extract --tile): every window of a map is a store item that knows where it lies; windows outside
the map store nothing and windows without labels stay out of training; a map predicted from the store's cached
windows equals the live map, with the input's georeference and nodata; evaluate counts each pixel of the stitched
map once; a GSD round trip lands on the input's grid; vector labels give the label rasters' masks; bad rasters
are one line each."""

import json

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import cachedseg.survey as survey_module
from cachedseg.backbone import BackboneConfig, build_backbone
from cachedseg.dataset import Dataset, open_dataset
from cachedseg.data import preprocess_image, preprocess_mask
from cachedseg.features import cached_source
from cachedseg.map_outputs import cog_problems
from cachedseg.maps import padded
from cachedseg.rasters import MapReader
from cachedseg.store import FeatureStore
from cachedseg.synth_maps import synth_map, synth_map_dataset
from cachedseg.tiles import Grid
from tests.conftest import (MIN_AGREEMENT, assert_features_close, damage_tile, one_line_error, run_cli,
                            torchrun, written_chunks)

rasterio = pytest.importorskip("rasterio")  # the maps extra (in dev)
pyogrio = pytest.importorskip("pyogrio")

TILE = ["--backbone", "vit_small_patch14_dinov2", "--tile", "112", "--weights", "random", "--workers", "0"]
CPU = ["--device", "cpu", "--workers", "0"]
BLANK = (98, 196)  # a window of the trn map whose labels are all erased: stored, kept out of training


@pytest.fixture(scope="module")
def maps_data(tmp_path_factory):
    """Two generated 600x400 maps (trn, val) with label rasters; one window of the trn map unlabelled."""
    root = tmp_path_factory.mktemp("tiled") / "maps"
    synth_map_dataset(root, count=2, width=600, height=400, seed=3)
    with rasterio.open(root / "labels" / "map_00.tif", "r+") as dst:
        labels = dst.read(1)
        labels[BLANK[0]:BLANK[0] + 112, BLANK[1]:BLANK[1] + 112] = 255
        dst.write(labels, 1)
    return root


@pytest.fixture(scope="module")
def tiled_store(maps_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiled-stores") / "maps.zarr"
    run_cli("extract", maps_data, "--store", path, *TILE, "--dtype", "float32")
    return path


@pytest.fixture(scope="module")
def tiled_run(tiled_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("tiled-runs") / "conv"
    run_cli("train", tiled_store, "--run", run, "--epochs", "1", *CPU)
    return run


def test_every_window_is_an_item_that_knows_where_it_lies(maps_data, tiled_store):
    cache = FeatureStore.open(tiled_store)
    assert cache.spec.tiled and cache.spec.tile_overlap == 14 and cache.spec.gsd is None
    tiles, flags, labelled = cache.tiles(), cache.flags(), cache.labelled()
    backbone = build_backbone(BackboneConfig("vit_small_patch14_dinov2", (112, 112)), "random")
    seen_empty = 0
    for k, raster in enumerate(cache.rasters):
        with rasterio.open(maps_data / "maps" / f"{raster.image}.tif") as src:
            assert (raster.height, raster.width) == (src.height, src.width) == raster.native
            assert rasterio.crs.CRS.from_wkt(raster.crs) == src.crs and raster.transform == tuple(src.transform)[:6]
            mask = src.dataset_mask() > 0
        grid = Grid(raster.height, raster.width, (112, 112), 14)
        mine = tiles[tiles[:, 0] == k]
        assert [tuple(t[1:]) for t in mine] == [(y, x) for y in grid.rows for x in grid.cols]
        for i in np.flatnonzero(tiles[:, 0] == k):
            y, x = tiles[i, 1:]
            assert cache.ids[i] == f"{raster.image}@{y}_{x}"
            inside = mask[y:y + 112, x:x + 112].any()
            assert (flags[i] == 3) == (not inside)  # empty: no valid pixel, nothing stored
            seen_empty += not inside
    assert seen_empty >= 2  # the maps' cut-off corner leaves whole windows outside
    blank = cache.ids.index(f"map_00@{BLANK[0]}_{BLANK[1]}")
    assert flags[blank] == 1 and not labelled[blank] and labelled[flags == 1].sum() == (flags == 1).sum() - 1
    # a window's features are the backbone's on its pixels, as predict reads them (up to float32 rounding)
    reader = MapReader(maps_data / "maps" / "map_11.tif")
    i = cache.ids.index("map_11@98_98")
    rgb, _ = reader.window(98, 98, 112, 112)
    reader.close()
    with torch.no_grad():
        live = backbone(preprocess_image(Image.fromarray(padded(rgb, (112, 112))), backbone.preprocess)[None])
    assert_features_close(cache.read(i)[0], live[0].numpy())


def test_windows_without_labels_or_pixels_stay_out_of_training(tiled_store):
    source = cached_source(tiled_store)
    flags, labelled = FeatureStore.open(tiled_store).flags(), FeatureStore.open(tiled_store).labelled()
    for split, f, has in zip(source.splits, flags, labelled):
        assert (split in ("trn", "val")) == (f == 1 and has)
    assert source.splits.count("unlabelled") == 1 and source.splits.count("skipped") == int((flags == 3).sum())


def test_a_map_from_the_store_is_the_live_map_on_the_input_grid(maps_data, tiled_store, tiled_run, tmp_path):
    ortho = maps_data / "maps" / "map_11.tif"
    run_cli("predict", ortho, "--run-dir", tiled_run, "--out", tmp_path / "live", *CPU)
    run_cli("predict", ortho, "--run-dir", tiled_run, "--out", tmp_path / "cached", "--store", tiled_store,
            "--polygons", *CPU)
    with rasterio.open(ortho) as src, rasterio.open(tmp_path / "live" / "map_11_label.tif") as live, \
            rasterio.open(tmp_path / "cached" / "map_11_label.tif") as cached:
        for out in (live, cached):
            assert out.crs == src.crs and out.transform == src.transform and out.shape == src.shape
            assert np.array_equal(out.read(1) == 255, src.dataset_mask() == 0)
        agree = (live.read(1) == cached.read(1)).mean()
        assert cached.tags()["STORE"] == str(tiled_store)
    assert agree >= MIN_AGREEMENT, agree
    assert cog_problems(tmp_path / "cached" / "map_11_label.tif") == []
    from rio_cogeo.cogeo import cog_validate
    assert cog_validate(tmp_path / "cached" / "map_11_label.tif", strict=True)[0]
    info = pyogrio.read_info(tmp_path / "cached" / "map_11.gpkg")
    assert info["features"] > 0 and info["crs"].endswith("32633")


def test_predict_from_a_store_refuses_a_map_it_does_not_hold(maps_data, tiled_store, tiled_run, tmp_path):
    other = synth_map(tmp_path / "other.tif", 200, 150, seed=9)
    one_line_error(run_cli("predict", other, "--run-dir", tiled_run, "--out", tmp_path, "--store", tiled_store,
                           *CPU, ok=False), "other.tif", "--store")
    one_line_error(run_cli("predict", maps_data / "maps" / "map_11.tif", "--run-dir", tiled_run, "--out", tmp_path,
                           "--store", tiled_store, "--tile-overlap", "28", *CPU, ok=False), "--tile-overlap")


def test_evaluate_counts_each_pixel_of_the_stitched_map_once(maps_data, tiled_store, tiled_run, tmp_path):
    run_cli("evaluate", tiled_run, "--store", tiled_store, "--compare-live", "--json", tmp_path / "e.json", *CPU)
    result = json.loads((tmp_path / "e.json").read_text())
    with rasterio.open(maps_data / "labels" / "map_11.tif") as labels, \
            rasterio.open(maps_data / "maps" / "map_11.tif") as src:
        scored = int(((labels.read(1) != 255) & (src.dataset_mask() > 0)).sum())
    assert np.array(result["confusion"]).sum() == scored  # not the windows' pixels, with their overlaps twice
    assert result["images"] == 1 and result["agreement"]["ratio"] >= MIN_AGREEMENT
    run_cli("evaluate", tiled_run, "--data", maps_data, "--json", tmp_path / "live.json", *CPU)
    live = json.loads((tmp_path / "live.json").read_text())
    assert np.array(live["confusion"]).sum() == scored
    assert abs(live["miou"] - result["miou"]) < 1e-3


def test_a_gsd_round_trip_lands_on_the_input_grid(maps_data, tmp_path):
    store, run = tmp_path / "gsd.zarr", tmp_path / "run"
    run_cli("extract", maps_data, "--store", store, *TILE, "--gsd", "0.08")
    cache = FeatureStore.open(store)
    assert cache.spec.gsd == 0.08 and (cache.rasters[0].height, cache.rasters[0].width) == (250, 375)
    assert cache.rasters[0].native == (400, 600) and cache.rasters[0].transform[0] == 0.08
    run_cli("train", store, "--run", run, "--epochs", "1", *CPU)
    ortho = maps_data / "maps" / "map_11.tif"
    run_cli("predict", ortho, "--run-dir", run, "--out", tmp_path / "live", *CPU)
    run_cli("predict", ortho, "--run-dir", run, "--out", tmp_path / "cached", "--store", store, *CPU)
    with rasterio.open(ortho) as src, rasterio.open(tmp_path / "live" / "map_11_label.tif") as live, \
            rasterio.open(tmp_path / "cached" / "map_11_label.tif") as cached:
        assert live.shape == src.shape and live.transform == src.transform and live.tags()["GSD"] == "0.08"
        assert np.array_equal(live.read(1) == 255, src.dataset_mask() == 0)  # nodata at the input's resolution
        assert (live.read(1) == cached.read(1)).mean() >= MIN_AGREEMENT


def test_vector_labels_give_the_masks_of_the_label_rasters(tmp_path):
    rasters, vectors = tmp_path / "rasters", tmp_path / "vectors"
    synth_map_dataset(rasters, count=2, width=300, height=200, seed=5)
    synth_map_dataset(vectors, count=2, width=300, height=200, seed=5, vector_labels=True)
    assert (vectors / "labels.gpkg").is_file() and not (vectors / "labels").exists()
    for data in (rasters, vectors):
        run_cli("extract", data, "--store", tmp_path / f"{data.name}.zarr", *TILE)
    a, b = (FeatureStore.open(tmp_path / f"{name}.zarr") for name in ("rasters", "vectors"))
    assert a.ids == b.ids and np.array_equal(a.group["masks"][:], b.group["masks"][:])
    assert np.array_equal(a.labelled(), b.labelled())


def test_bad_rasters_are_one_line_each(maps_data, tmp_path):
    plain = tmp_path / "plain"
    synth_map_dataset(plain, count=2, width=200, height=150, seed=6)
    for i, tif in enumerate(sorted((plain / "maps").glob("*.tif"))):  # the images without georeference
        synth_map(tif, 200, 150, seed=i, crs=None)
    one_line_error(run_cli("extract", plain, "--store", tmp_path / "a.zarr", *TILE, "--gsd", "0.1", ok=False),
                   "coordinate system", "map_")
    shifted = tmp_path / "shifted"
    synth_map_dataset(shifted, count=2, width=200, height=150, seed=6)
    synth_map(tmp_path / "small.tif", 180, 150, seed=1, labels=shifted / "labels" / "map_11.tif")
    one_line_error(run_cli("extract", shifted, "--store", tmp_path / "b.zarr", *TILE, ok=False),
                   "map_11.tif", "grid")
    damaged = tmp_path / "damaged"
    synth_map_dataset(damaged, count=2, width=600, height=400, seed=6)
    damage_tile(damaged / "maps" / "map_00.tif")
    one_line_error(run_cli("extract", damaged, "--store", tmp_path / "c.zarr", *TILE, ok=False), "map_00.tif")
    one_line_error(run_cli("extract", maps_data, "--store", tmp_path / "d.zarr", *TILE, "--image-size", "224",
                           ok=False), "--tile")
    one_line_error(run_cli("extract", maps_data, "--store", tmp_path / "e.zarr", *TILE[:3], "113", *TILE[4:],
                           ok=False), "--tile 113")
    one_line_error(run_cli("extract", maps_data, "--store", tmp_path / "f.zarr", "--gsd", "0.1", ok=False),
                   "--tile")


def test_info_counts_the_labels_of_maps_a_band_of_rows_at_a_time(maps_data, tmp_path, monkeypatch):
    monkeypatch.setattr(survey_module, "BAND_PIXELS", 600 * 37)  # bands of 37 rows: 11 per map, the last short
    vectors = tmp_path / "vectors"
    synth_map_dataset(vectors, count=2, width=600, height=400, seed=3, vector_labels=True)
    rasters = tmp_path / "rasters"
    synth_map_dataset(rasters, count=2, width=600, height=400, seed=3)
    rows, decode = [], Dataset.decode_labels
    monkeypatch.setattr(Dataset, "decode_labels", lambda self, raw, *a: rows.append(len(raw)) or decode(self, raw, *a))
    for data in (rasters, vectors):
        result = survey_module.survey(open_dataset(data))
        assert result.sizes == {(600, 400): 2} and not result.problems
        for split, name in (("trn", "map_00.tif"), ("val", "map_11.tif")):
            with rasterio.open(rasters / "labels" / name) as src:
                whole = np.bincount(src.read(1).ravel(), minlength=256)
            assert result.class_pixels[split] == whole[:len(result.classes)].tolist()
            assert result.ignored_pixels[split] == whole[255]
    assert max(rows) == 37 and sum(rows) == 2 * 400  # never a whole map decoded at once
    synth_map(tmp_path / "small.tif", 180, 150, seed=1, labels=rasters / "labels" / "map_11.tif")
    run_cli("info", rasters, "--json", tmp_path / "s.json")
    problems = json.loads((tmp_path / "s.json").read_text())["problems"]
    assert len(problems) == 1 and "map_11.tif" in problems[0] and "\n" not in problems[0]


def test_one_map_split_by_blocks_never_trains_on_a_val_label(tmp_path):
    data, store, fresh, run = tmp_path / "one", tmp_path / "s.zarr", tmp_path / "fresh.zarr", tmp_path / "run"
    synth_map_dataset(data, count=1, width=600, height=400, seed=4)
    toml = data / "dataset.toml"
    toml.write_text(toml.read_text().replace('trn = "map_0*"\nval = "map_1*"', "val_fraction = 0.3\nblock = 150"))
    overlap = ("--tile-overlap", "28")
    run_cli("extract", data, "--store", store, *TILE, *overlap)
    with rasterio.open(data / "labels" / "map_00.tif") as src, rasterio.open(data / "maps" / "map_00.tif") as img:
        truth = np.where(img.dataset_mask() > 0, src.read(1), 255)  # outside the map: never a label
    dataset = open_dataset(data)
    val = dataset.region("val", "map_00", 0, 0, 400, 600)
    assert 0 < val.mean() < 0.5  # both splits in the one map

    def check(path):
        cache = FeatureStore.open(path)
        masks, tiles, flags = cache.group["masks"][:], cache.tiles(), cache.flags()
        assert {"trn", "val"} <= set(cache.splits)
        for mask, (_, y, x), split, flag in zip(masks, tiles, cache.splits, flags):
            if flag != 1:
                continue
            own = (val if split == "val" else ~val)[y:y + 112, x:x + 112]
            window = np.full((112, 112), 255, dtype=np.uint8)  # the other split's blocks: no labels at all
            window[:own.shape[0], :own.shape[1]] = np.where(own, truth[y:y + 112, x:x + 112], 255)
            assert np.array_equal(mask, preprocess_mask(window, cache.spec.mask_size))
        return cache
    check(store)
    survey = survey_module.survey(dataset)
    assert survey.by_blocks and survey.total == 1 and survey.images == {"trn": 1, "val": 1}
    for split, region in (("val", val), ("trn", ~val)):
        whole = np.bincount(truth[region], minlength=256)
        assert survey.class_pixels[split] == whole[:len(survey.classes)].tolist()
    run_cli("train", store, "--run", run, "--epochs", "1", *CPU)
    run_cli("evaluate", run, "--json", tmp_path / "e.json", *CPU)
    scored = np.array(json.loads((tmp_path / "e.json").read_text())["confusion"]).sum()
    assert scored == int((val & (truth != 255)).sum())  # the val blocks' labelled pixels, once each
    run_cli("evaluate", run, "--data", data, "--json", tmp_path / "live.json", *CPU)
    assert np.array(json.loads((tmp_path / "live.json").read_text())["confusion"]).sum() == scored
    assert "block" in run_cli("info", store).output
    # another block size: the windows' splits and masks follow it, without the backbone
    features = {p.name: p.stat().st_mtime_ns for p in written_chunks(store, "features")}
    toml.write_text(toml.read_text().replace("block = 150", "block = 200"))
    one_line_error(run_cli("evaluate", run, "--json", tmp_path / "e.json", *CPU, ok=False), "extract")
    run_cli("extract", data, "--store", store, *TILE, *overlap)
    assert {p.name: p.stat().st_mtime_ns for p in written_chunks(store, "features")} == features
    run_cli("extract", data, "--store", fresh, *TILE, *overlap)
    a, b = FeatureStore.open(store), FeatureStore.open(fresh)
    val = open_dataset(data).region("val", "map_00", 0, 0, 400, 600)
    assert a.splits == b.splits and np.array_equal(a.group["masks"][:], b.group["masks"][:])
    assert np.array_equal(a.labelled(), b.labelled())
    check(store)
    one_line_error(run_cli("extract", data, "--store", tmp_path / "whole.zarr", "--backbone",
                           "vit_small_patch14_dinov2", "--weights", "random", ok=False), "--tile")
    one_line_error(run_cli("train", "--live", data, "--backbone", "vit_small_patch14_dinov2", "--weights", "random",
                           "--run", tmp_path / "live", *CPU, ok=False), "--tile")
    toml.write_text(toml.read_text().replace("block = 200", "block = 10000"))  # one block, in trn: no val at all
    one_line_error(run_cli("extract", data, "--store", tmp_path / "one-block.zarr", *TILE, ok=False), "block = 10000")


def test_large_frames_tile_too_and_keep_their_pngs(dataset, tmp_path):
    store, run = tmp_path / "frames.zarr", tmp_path / "run"
    run_cli("extract", dataset, "--store", store, "--backbone", "vit_small_patch14_dinov2", "--tile", "70",
            "--weights", "random", "--workers", "0")
    cache = FeatureStore.open(store)
    assert len(cache) == 6 * 8 and cache.rasters[0].crs is None and (cache.flags() == 1).all()
    run_cli("train", store, "--run", run, "--epochs", "1", *CPU)
    frame = next((dataset / "JPEGImages").iterdir())
    for out, extra in ((tmp_path / "live", ()), (tmp_path / "cached", ("--store", store))):
        run_cli("predict", frame, "--run-dir", run, "--out", out, *extra, *CPU)
    live, cached = (np.array(Image.open(tmp_path / d / f"{frame.stem}_label.png")) for d in ("live", "cached"))
    assert live.shape == (120, 160) and (live == cached).mean() >= MIN_AGREEMENT


def test_a_rerun_follows_the_label_rasters(maps_data, tmp_path):
    data, store = tmp_path / "data", tmp_path / "s.zarr"
    shutil.copytree(maps_data, data)
    run_cli("extract", data, "--store", store, *TILE)
    again = run_cli("extract", data, "--store", store, *TILE)
    assert "0 extracted" in again.output
    before = FeatureStore.open(store).group["masks"][:]
    with rasterio.open(data / "labels" / "map_11.tif", "r+") as dst:
        labels = dst.read(1)
        labels[labels == 9] = 10  # vegetation relabelled road
        dst.write(labels, 1)
    changed = run_cli("extract", data, "--store", store, *TILE)
    assert "0 extracted" in changed.output  # masks rewritten, no backbone pass
    after = FeatureStore.open(store).group["masks"][:]
    val = [i for i, s in enumerate(FeatureStore.open(store).splits) if s == "val"]
    assert (after[val] == 9).sum() == 0 and (before[val] == 9).sum() > 0
    trn = [i for i, s in enumerate(FeatureStore.open(store).splits) if s == "trn"]
    assert np.array_equal(after[trn], before[trn])


@pytest.mark.subprocess
def test_two_ranks_extract_the_windows_and_predict_one_map_as_one_process(maps_data, tiled_store, tiled_run,
                                                                          tmp_path):
    store = tmp_path / "ranks.zarr"
    torchrun("extract", maps_data, "--store", store, *TILE, "--dtype", "float32", "--device", "cpu")
    a, b = FeatureStore.open(tiled_store), FeatureStore.open(store)
    assert a.ids == b.ids and a.rasters == b.rasters and np.array_equal(a.tiles(), b.tiles())
    assert np.array_equal(a.flags(), b.flags()) and np.array_equal(a.labelled(), b.labelled())
    assert np.array_equal(a.group["masks"][:], b.group["masks"][:])
    done = a.flags() == 1
    assert_features_close(a.group["features"][:][done], b.group["features"][:][done])
    ortho = maps_data / "maps" / "map_11.tif"
    torchrun("predict", ortho, "--run-dir", tiled_run, "--out", tmp_path / "ranks", "--polygons", *CPU)
    run_cli("predict", ortho, "--run-dir", tiled_run, "--out", tmp_path / "one", *CPU)
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == ["map_11.gpkg", "map_11_label.tif"]
    assert cog_problems(tmp_path / "ranks" / "map_11_label.tif") == []
    from rio_cogeo.cogeo import cog_validate
    assert cog_validate(tmp_path / "ranks" / "map_11_label.tif", strict=True)[0]
    with rasterio.open(tmp_path / "ranks" / "map_11_label.tif") as ranks, \
            rasterio.open(tmp_path / "one" / "map_11_label.tif") as one:
        assert ranks.profile["transform"] == one.profile["transform"] and ranks.crs == one.crs
        assert (ranks.read(1) == one.read(1)).mean() >= MIN_AGREEMENT


def test_report_and_info_describe_a_tiled_run_and_store(tiled_store, tiled_run, tmp_path):
    run_cli("report", tiled_run, "--out", tmp_path / "r.html", "--device", "cpu")
    assert 'id=best-miou' in (tmp_path / "r.html").read_text()
    described = FeatureStore.open(tiled_store).describe()
    assert described["empty"] >= 2 and described["unlabelled"] == 1 and len(described["rasters"]) == 2
    assert "windows" in run_cli("info", tiled_store).output and "windows" in run_cli("info", tiled_run).output
