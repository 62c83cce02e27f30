"""The benchmark script runs end to end and reports every figure it promises (a smoke test, not a timing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess  # each runs a benchmark script

KEYS = ["backbone_floor_img_s", "extract_img_s", "decoder_floor_epoch_s", "cached_epoch_s", "cached_inmem_epoch_s",
        "live_epoch_s", "speedup", "ideal_speedup", "cache_overhead", "extract_efficiency", "break_even_epochs",
        "agreement", "agreement_differ", "agreement_pixels", "cache_mb_per_image", "peak_rss_mb", "epoch_s_by_trn_images", "device", "torch", "timm", "zarr",
        "settings"]


def test_benchmark_quick_writes_every_figure(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "cached_vs_live.py"
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--images", "8", "--image-size", "56",
                           "--image-width", "160", "--image-height", "120", "--scales", "1,2", "--decoder", "linear",
                           "--json", str(out), "--results", str(tmp_path / "results")],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert set(KEYS) <= set(result)
    assert result["agreement_pixels"] > 0 and result["agreement_differ"] <= 1e-4 * result["agreement_pixels"]
    assert len(result["epoch_s_by_trn_images"]) == 2
    assert result["settings"]["decoder"] == "linear" and result["settings"]["image_size"] == "56x56"
    table = next((tmp_path / "results").glob("*.md")).read_text()
    assert "| linear | float16 |" in table


def test_quality_benchmark_quick_scores_every_recipe_asked(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "quality.py"
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--recipes", "seed,conv-aspect-flip-tta",
                           "--json", str(out), "--results", str(tmp_path / "results")],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert set(result["recipes"]) == {"seed", "conv-aspect-flip-tta"}
    # --quick trains one seed: one score of each kind per recipe
    assert all(len(row["miou"]) == len(row["pixel_acc"]) == 1 for row in result["recipes"].values())
    assert result["recipes"]["conv-aspect-flip-tta"]["input"] == "70x56"  # 160x120 frames, short side 56
    assert len(result["costs"]) == 2 and "| conv-aspect-flip-tta |" in (tmp_path / "results" / "quality.md").read_text()


def test_large_frame_benchmark_reports_every_figure(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "large_frame.py"
    out = tmp_path / "large.json"
    proc = subprocess.run([sys.executable, str(script), "--width", "400", "--height", "300", "--json", str(out),
                           "--results", str(tmp_path / "results")],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    for key in ("predict_peak_mb", "predict_s", "evaluate_peak_mb", "evaluate_s", "floor_peak_mb"):
        assert result[key] > 0, key
    assert result["predict_peak_mb"] >= result["floor_peak_mb"] * 0.9 and result["frame"] == "400x300"
    assert "| 400x300 |" in (tmp_path / "results" / "large_frame.md").read_text()


def test_imbalance_benchmark_quick_scores_every_variant_per_class(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "imbalance.py"
    out = tmp_path / "imbalance.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--decoder", "linear", "--json", str(out),
                           "--results", str(tmp_path / "results")],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    names = list(result["auto_weights"])
    assert len(result["variants"]) == 4 and {row["loss"] for row in result["variants"].values()} == {"ce", "dice-ce"}
    for row in result["variants"].values():
        assert list(row["iou"]) == names and len(row["miou"]) == 1 and 0 <= row["rare_miou"] <= 1
    assert sum(result["trn_pixel_share"].values()) == pytest.approx(1)
    assert "| dice-ce + auto weights |" in (tmp_path / "results" / "imbalance.md").read_text()


def test_ortho_benchmark_reports_every_figure(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "ortho.py"
    out = tmp_path / "ortho.json"
    proc = subprocess.run([sys.executable, str(script), "--sizes", "200,300", "--image-size", "112",
                           "--polygons-size", "200", "--store-sizes", "300", "--json", str(out),
                           "--results", str(tmp_path / "results")],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["side"] for r in rows] == [200, 300]
    for row in rows:
        for key in ("windows", "map_s", "map_win_s", "floor_win_s", "model_win_s", "ratio", "peak_mb", "s_per_mp"):
            assert row[key] > 0, key
    assert rows[0]["features"] > 0 and "features" not in rows[1]
    assert (tmp_path / "results" / "ortho.md").read_text().count("| 112 (overlap 14) |") == 2
    (store,) = json.loads(out.read_text())["store_rows"]
    for key in ("windows", "extract_s", "extract_peak_mb", "live_s", "store_s", "speedup", "store_peak_mb"):
        assert store[key] > 0, key
    assert store["agreement"] >= 0.9999 and (tmp_path / "results" / "ortho-store.md").read_text().count("| 300² |") == 1


@pytest.mark.subprocess
def test_cpu_speed_benchmark_quick_measures_every_path(tmp_path):
    pytest.importorskip("onnxruntime")
    script = Path(__file__).parents[1] / "benchmarks" / "cpu_speed.py"
    out = tmp_path / "cpu.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out), "--results", str(tmp_path)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "CACHEDSEG_ONNX_CACHE": str(tmp_path / "onnx")},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert [r["path"] for r in result["rows"]] == ["float32", "bfloat16", "onnxruntime", "onnxruntime-int8"]
    for row in result["rows"]:
        assert row["img_s"] > 0 and row["gflop_s"] > 0 and 0 <= row["agreement"] <= 1
    assert result["rows"][2]["feature_rel"] < 1e-4  # the same float32 computation, other kernels
    assert (tmp_path / "cpu-speed.md").read_text().count("| onnxruntime |") == 1
