"""`cachedseg report`, checked in a real browser: headless Chromium loads the page, every embedded image decodes,
and the numbers shown are the ones in metrics.json and sweep.json."""

import json
import re
import shutil
import subprocess

import pytest

from tests.conftest import one_line_error, run_cli

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(page, tmp_path) -> str:
    """The page's DOM after Chromium loaded it (and its image check ran)."""
    if BROWSER is None:
        pytest.skip("no Chromium here: .ci/run installs the Debian package chromium; install it to run this test")
    proc = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def cells(dom: str, table: str) -> list[list[str]]:
    """The text of each data row of the table with this id."""
    body = re.search(rf'<table id="{table}">(.*?)</table>', dom, re.S).group(1)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]]


@pytest.mark.subprocess
def test_a_run_report_shows_the_runs_numbers_and_every_image_loads(dataset, store32, run32, tmp_path):
    run_cli("report", run32, "--out", tmp_path / "run.html")
    dom = render(tmp_path / "run.html", tmp_path)
    loaded, total = map(int, re.search(r'data-images="(\d+)/(\d+)"', dom).groups())
    val = len((dataset / "ImageSets" / "val.txt").read_text().split())
    assert total == 1 + 4 * min(4, val) and loaded == total  # the confusion matrix, 4 panels per val image
    assert dom.count("<svg") >= 2  # the curves and the per-class bars
    metrics = json.loads((run32 / "metrics.json").read_text())
    shown = cells(dom, "metrics")
    assert [row[:4] for row in shown] == [[str(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['val_miou']:.4f}",
                                          f"{r['val_pixel_acc']:.4f}"] for r in metrics]
    assert re.search(r'id="best-miou">([\d.]+)<', dom).group(1) == f"{max(r['val_miou'] for r in metrics):.4f}"
    assert len(cells(dom, "classes")) == 12


@pytest.mark.subprocess
def test_a_sweep_report_compares_the_configs_and_links_each_report(store32, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("train", store32, "--run-dir", sweep, "--decoder", "linear,conv", "--epochs", "1", "--workers", "0")
    run_cli("report", sweep)
    dom = render(sweep / "report.html", tmp_path)
    summary = json.loads((sweep / "sweep.json").read_text())
    rows = cells(dom, "sweep")
    assert [re.sub(r"<.*?>", "", row[0]) for row in rows] == [r["name"] for r in summary["runs"]]
    assert [row[5] for row in rows] == [f"{r['best_val_miou']:.4f}" for r in summary["runs"]]
    links = [re.search(r'href="([^"]+)"', row[0]).group(1) for row in rows]
    assert len(links) == 2 and all((sweep / link).is_file() for link in links)  # each sub-run got its own report


def test_report_errors_name_what_is_missing(run32, tmp_path):
    one_line_error(run_cli("report", tmp_path / "nothing", ok=False), tmp_path / "nothing")
    copy = tmp_path / "moved"
    shutil.copytree(run32, copy)
    one_line_error(run_cli("report", copy, "--store", tmp_path / "gone.zarr", ok=False), tmp_path / "gone.zarr")
