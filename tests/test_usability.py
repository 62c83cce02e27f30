"""What a newcomer meets first: the command an interrupted run names works, help tells the truth, paths print whole
(never wrapped), and `info` and the report say what the recorded settings mean."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TRAIN, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _interruptible() -> None:
    """SIGINT to its default in the child, as a terminal's foreground process has it: a suite started in the
    background (`make test &`, nohup) ignores SIGINT, the child would inherit that, and Python then never raises
    KeyboardInterrupt (the cause of this file's Ctrl-C test ending with exit 0 in such runs)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_process(*args, **kwargs) -> subprocess.Popen:
    """`cachedseg ARGS` as its own process (a real signal, a real pipe), importing this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "cachedseg", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_interruptible, **kwargs)


@pytest.mark.subprocess
def test_after_ctrl_c_the_command_train_names_continues_the_run(store32, tmp_path):
    run = tmp_path / "run"
    proc = cli_process("train", store32, "--run-dir", run, "--epochs", "6", "--workers", "0", "--device", "cpu")
    deadline = time.monotonic() + 120
    while not (run / "metrics.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first epoch is checkpointed: interrupt the second
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    first = json.loads((run / "metrics.json").read_text())
    assert 1 <= len(first) < 6 and "Traceback" not in err
    command = re.search(r"`(cachedseg [^`]+)`", err)
    assert command, err  # the message names a command, not "the same command"
    args = shlex.split(command.group(1))[1:]
    assert "--resume" in args
    done = cli_process(*args)  # exactly the command named
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert rows[:len(first)] == first  # continued, not started again


def test_demo_help_states_the_short_side_the_demo_uses(monkeypatch, tmp_path):
    import typer.main

    from cachedseg import backbone, cli
    from cachedseg.errors import CachedsegError

    used = {}

    def stop(name, data, image_size, short_side, *rest):
        used["short_side"] = short_side
        raise CachedsegError("stop here")  # the size is all this test needs: no extraction
    monkeypatch.setattr(cli, "_synth", lambda *args: None)
    monkeypatch.setattr(backbone, "config_from_options", stop)
    run_cli("demo", "--out", tmp_path / "demo", "--weights", "random", "--device", "cpu", ok=False)
    params = {p.name: p for p in typer.main.get_command(cli.app).commands["demo"].params}
    stated = re.findall(r"[Dd]efault[^.\d]*(\d+)", params["short_side"].help)
    assert stated == [str(used["short_side"])], params["short_side"].help
    assert re.findall(r"[Dd]efault[^.\d]*(\d+)", params["image_size"].help) == stated


def test_info_says_what_unset_settings_meant_and_names_the_store(store32, tmp_path):
    run = tmp_path / "run"
    run_cli("train", store32, "--run", run, "--epochs", "1", "--device", "cpu")  # --workers and --data-seed unset
    out = run_cli("info", run).output
    assert "None" not in out, out
    assert str(Path(store32).resolve()) in out  # the store it was trained on


def test_evaluate_defaults_to_the_runs_own_store_as_report_does(dataset, store32, run32, tmp_path):
    run_cli("evaluate", run32, "--json", tmp_path / "own.json")
    run_cli("evaluate", run32, "--store", store32, "--json", tmp_path / "given.json")
    own, given = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("own", "given"))
    assert own == given and own["images"] == len((dataset / "ImageSets" / "val.txt").read_text().split())


def test_a_report_titles_a_run_folder_named_run_by_its_parent_too_and_spells_out_the_recipe(run32, tmp_path):
    run = tmp_path / "exp" / "run"
    shutil.copytree(run32, run)
    run_cli("report", run)
    page = (run / "report.html").read_text()
    title = re.search(r"<title>(.*?)</title>", page).group(1)
    assert "exp" in title  # not just "Run run"
    recipe = re.search(r"<th>recipe</th><td>(.*?)</td>", page).group(1)
    assert "None" not in recipe and "epochs 2" in recipe


def test_the_reports_legends_are_page_text_naming_each_class_of_the_panel(dataset, run32, tmp_path):
    import numpy as np
    from PIL import Image

    from cachedseg.dataset import AEROSCAPES

    run_cli("report", run32, "--out", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    legends = re.findall(r"<figcaption>([^:<]+): (label|prediction|overlay)</figcaption><div class=legend>(.*?)</div>",
                         page)
    assert legends and {what for _, what, _ in legends} == {"label", "prediction", "overlay"}
    for id_, what, keys in legends:
        names = re.findall(r"</span> ([^<]+)</span>", keys)
        assert names and set(names) <= set(AEROSCAPES.names)
        if what == "label":  # exactly the classes of its label PNG, in class order
            labels = np.unique(np.asarray(Image.open(dataset / "SegmentationClass" / f"{id_}.png")))
            assert names == [AEROSCAPES.names[c] for c in labels if c < len(AEROSCAPES)]


def whole_on_one_line(text: str, *paths) -> None:
    """Each path appears unbroken on one line of `text` (ANSI styles removed)."""
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).splitlines()
    for path in map(str, paths):
        assert any(path in line for line in lines), (path, text)


@pytest.mark.subprocess
def test_paths_a_user_copies_are_never_wrapped_on_a_narrow_terminal_or_in_a_pipe(dataset, store32, monkeypatch,
                                                                                tmp_path):
    import io

    from rich.console import Console

    from cachedseg import cli

    deep = tmp_path / ("p" * 90) / ("q" * 90) / ("r" * 60)  # longer than the 240 columns of a piped console
    run, sweep, image = deep / "run", deep / "sweep", next((dataset / "JPEGImages").glob("*.jpg"))

    def terminal(*args, paths):  # each command on a 60-column terminal (progress bars and all) names its paths whole
        out = io.StringIO()
        for name in ("console", "errors"):
            monkeypatch.setattr(cli, name, Console(file=out, width=60, force_terminal=True))
        run_cli(*args)
        whole_on_one_line(out.getvalue(), *paths)
    terminal("train", store32, "--run-dir", run, *TRAIN[2:], "--epochs", "1", paths=[run])
    terminal("train", store32, "--run-dir", sweep, *TRAIN[2:], "--epochs", "1", "--decoder", "linear", "--lr",
             "1e-4,1e-3", paths=[sweep, sweep / "sweep.json"])
    terminal("evaluate", run, "--store", store32, "--json", deep / "eval.json", paths=[deep / "eval.json"])
    terminal("predict", image, "--run-dir", run, "--out", deep / "predictions", "--device", "cpu",
             paths=[deep / "predictions"])
    terminal("report", run, "--out", deep / "report.html", paths=[deep / "report.html"])
    terminal("info", run, paths=[run, Path(store32).resolve()])
    terminal("info", store32, paths=[store32])
    terminal("demo", "--out", deep / "demo", "--count", "4", "--backbone", "vit_small_patch14_dinov2", "--image-size",
             "112", "--weights", "random", "--epochs", "1", "--device", "cpu",
             paths=[deep / "demo" / "run", deep / "demo" / "run" / "report.html", deep / "demo" / "predictions"])
    piped = cli_process("info", run)  # a real pipe: the console's own width for logs
    text, err = piped.communicate(timeout=120)
    assert piped.returncode == 0, err
    whole_on_one_line(text, run, Path(store32).resolve())


def test_after_ctrl_c_extract_names_itself_unchanged(dataset, monkeypatch, tmp_path):
    from cachedseg import cli

    args = ["extract", str(dataset), "--store", str(tmp_path / "s.zarr"), "--workers", "0"]

    def interrupted(*_, **__):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli._state, "argv", args)  # as main() records the command line
    monkeypatch.setattr(cli, "_extract", interrupted)
    result = run_cli(*args, ok=None)
    assert result.exit_code == 130
    assert f"`{shlex.join(['cachedseg', *args])}`" in result.stderr  # rerunning extract resumes it: no --resume
