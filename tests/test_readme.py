"""Every code block of the README works: python blocks run on a small store, every `cachedseg` line of a bash
block parses against the real CLI (commands and options exist), `make` lines name real targets and variables, and
the "Using it" block runs for real, scaled down (the substitutions are in USING_IT_SCALED)."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer.main

from cachedseg.cli import app
from tests.conftest import SMALL, one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CLI = typer.main.get_command(app)

# The "Using it" block at test size: (README text, what the test runs instead). Each must occur in the block.
DEFAULT_STORE = "cache/synth-vit_base_patch14_dinov2-924x518-float16.zarr"
SMALL_STORE = "cache/synth-vit_small_patch14_dinov2-112x112-float16.zarr"  # extract's default name for SMALL
USING_IT_SCALED = [
    ("--count 200", "--count 6 --width 160 --height 120"),
    ("extract data/synth", "extract data/synth " + " ".join(SMALL) + " --workers 0"),
    (DEFAULT_STORE, SMALL_STORE),
    ("--run-dir runs/conv\n", "--run-dir runs/conv --epochs 1 --workers 0 --device cpu\n"),  # train's line
]


def blocks(language: str, text: str = README) -> list[str]:
    """The code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """The shell commands of a block: continuation lines joined, comments dropped, split as the shell would."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def cachedseg_args(words: list[str]) -> list[str] | None:
    """The arguments after `cachedseg` (or `-m cachedseg` under torchrun/srun), or None for another program."""
    if words[0] == "cachedseg":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i:i + 2] == ["-m", "cachedseg"]:
            return words[i + 2:]
    return None


def parses(args: list[str]) -> None:
    """The command exists and click accepts every option and argument (nothing runs)."""
    name, rest = args[0], args[1:]
    assert name in CLI.commands, f"no command {name!r}"
    command = CLI.commands[name]
    try:
        command.make_context(name, list(rest))
    except Exception as exc:  # noqa: BLE001 - the errors of the click that typer bundles
        if type(exc).__name__ == "Exit":  # --help
            return
        if not hasattr(exc, "format_message"):
            raise
        pytest.fail(f"cachedseg {shlex.join(args)}: {exc.format_message()}")


def section(title: str) -> str:
    """The README text under one `## ` heading."""
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_has_the_blocks_this_test_checks():
    assert len(blocks("bash")) >= 5 and len(blocks("python")) >= 1
    assert sum(cachedseg_args(w) is not None for b in blocks("bash") for w in commands(b)) >= 20


def test_every_cachedseg_line_of_the_readme_parses_against_the_cli():
    for block in blocks("bash"):
        for words in commands(block):
            if (args := cachedseg_args(words)) is not None:
                parses(args)


@pytest.mark.subprocess
def test_every_make_line_names_a_target_and_variables_of_the_makefile(tmp_path):
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    lines = [w for b in blocks("bash") for w in commands(b) if w[0] == "make"]
    assert any("=" in w for words in lines for w in words)  # the CPU-only torch line
    for words in lines:
        goals = [w for w in words[1:] if "=" not in w]
        assert goals and set(goals) <= targets, words
        for assignment in (w for w in words[1:] if "=" in w):
            name, value = assignment.split("=", 1)
            # dry run (-n) of the whole recipe (-B): the value reaches a command, e.g. pip's --index-url
            shown = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), *words[1:]], capture_output=True, text=True,
                                   check=True).stdout
            assert re.search(rf"^[^#]*{re.escape(value)}", shown, re.M), (name, shown)


def test_zarr_dask_xarray_and_tensorstore_read_every_array(store16):
    """The store format section's claim."""
    import dask.array as da
    import numpy as np
    import tensorstore as ts
    import xarray as xr
    import zarr

    group = zarr.open_group(store16, mode="r")
    names = sorted(name for name, _ in group.arrays())
    assert names == ["done", "features", "ids", "masks", "sources", "split"]
    ds = xr.open_zarr(store16, consolidated=False)
    for name in names:
        want = group[name][...]
        np.testing.assert_array_equal(da.from_zarr(str(store16), component=name).compute(), want)
        np.testing.assert_array_equal(ds[name].values, want)
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store16 / name)}}
        np.testing.assert_array_equal(ts.open(spec).result().read().result(), want)


def test_the_python_blocks_run_on_a_small_store(store16, dataset):
    first_id = (dataset / "ImageSets" / "trn.txt").read_text().split()[0]
    for block in blocks("python", section("The feature store format (version 2)")):
        code = block.replace("cache/x.zarr", str(store16))
        assert code != block  # the block reads the store this test gives it
        assert first_id in code, "the block selects an id that the generated datasets have"
        exec(compile(code, "README.md", "exec"), {})


@pytest.mark.subprocess
def test_the_using_it_block_runs_as_written_scaled_down(tmp_path, monkeypatch):
    (block,) = blocks("bash", section("Using it"))
    assert "--weights random" in block  # the step says what to add on a machine without the hub
    for text, _ in USING_IT_SCALED:
        assert text in block, text
    monkeypatch.chdir(tmp_path)
    lines = commands(block)
    assert lines[0] == ["source", ".venv/bin/activate"]  # the test runs this checkout's CLI in-process instead
    as_written = {tuple(words) for words in lines}
    for text, scaled in USING_IT_SCALED:
        block = block.replace(text, scaled)
    for words in commands(block)[1:]:
        args = cachedseg_args(words)
        parses(args)
        if args[0] == "upgrade":  # needs a store written by cachedseg 0.1.0: parsed only
            continue
        if args[0] == "extract":
            # offline, extract as written (pretrained weights) fails within seconds, naming the option to add
            import huggingface_hub.constants
            monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "no-hf-cache"))
            written = ["extract", "data/synth"]
            assert ("cachedseg", *written) in as_written
            one_line_error(run_cli(*written, ok=False), "--weights random")
        if args[0] == "predict":
            folder = Path("some/folder")
            folder.mkdir(parents=True)
            shutil.copy(next(Path("data/synth/JPEGImages").glob("*.jpg")), folder / "frame.jpg")
        run_cli(*args)
        if args[0] == "extract":
            assert Path(SMALL_STORE).is_dir()  # the default store name, as the README's arrow says
    assert Path("eval.json").is_file() and len(list(Path("predictions").glob("*_label.png"))) == 2


def test_the_toml_blocks_are_dataset_files_this_cachedseg_reads(tmp_path):
    from cachedseg.dataset_file import load_dataset_file

    (block,) = blocks("toml")
    (tmp_path / "dataset.toml").write_text(block)
    data = load_dataset_file(tmp_path / "dataset.toml")
    assert data.mask_encoding == "rgb" and data.classes.names == ("ground", "building")


MAPS_SCALED = [
    ("--width 3000 --height 2000", "--width 300 --height 200"),
    ("--tile 518", "--tile 112 --backbone vit_small_patch14_dinov2 --weights random --workers 0"),
    ("--run-dir runs/maps\n", "--run-dir runs/maps --epochs 1 --workers 0 --device cpu\n"),
]


@pytest.mark.subprocess
def test_the_maps_block_runs_as_written_scaled_down(tmp_path, monkeypatch):
    pytest.importorskip("rasterio")
    block = blocks("bash", section("Maps"))[0]
    for text, scaled in MAPS_SCALED:
        assert text in block, text
        block = block.replace(text, scaled)
    monkeypatch.chdir(tmp_path)
    for words in commands(block):
        if (args := cachedseg_args(words)) is not None:
            run_cli(*args)
    assert Path("maps-eval.json").is_file()
    assert Path("out/live/map_13_label.tif").is_file() and Path("out/cached/map_13.gpkg").is_file()
    import rasterio
    with rasterio.open("out/live/map_13_label.tif") as live, rasterio.open("out/cached/map_13_label.tif") as cached:
        assert (live.read(1) == cached.read(1)).all()


@pytest.mark.subprocess
def test_the_python_api_blocks_run(dataset, run32, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(dataset, "data/synth")
    shutil.copytree(run32, "runs/conv")
    api = blocks("python", section("Python API"))
    assert len(api) == 2 and "000001_001" in api[0]
    for block in api:
        exec(compile(block, "README.md", "exec"), {})
    assert Path("runs/api/best.pt").is_file() and Path("cache/api.zarr").is_dir()
