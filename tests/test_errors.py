"""Bad input at every entry point is one line on stderr, exit 1, naming what was given (README: "errors"): damaged
checkpoints and weights files, numeric options out of range, places that cannot be written, huge images."""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cachedseg.store import FeatureStore
from tests.conftest import SMALL, TRAIN, one_line_error, run_cli

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
SETPRIV = shutil.which("setpriv")
ROOT = os.geteuid() == 0  # root ignores file modes: its capabilities are dropped (setpriv) for the read-only tests


def image_of(dataset):
    """One image file of the dataset."""
    return sorted((dataset / "JPEGImages").glob("*.jpg"))[0]


# --- checkpoints: every command that reads one, every way it can be broken --------------------------------------

def _break_checkpoint(kind: str, good: bytes, path) -> None:
    """Write a `kind` of broken checkpoint at `path`."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "folder":
        path.mkdir()
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "foreign":
        torch.save({"model": torch.zeros(3)}, path)
    elif kind == "unsafe":
        torch.save({"format": "cachedseg-checkpoint", "extra": np.zeros(2)}, path)  # a pickle weights_only refuses
    elif kind == "decoder misfit":
        state = torch.load(io.BytesIO(good), weights_only=True)
        state["decoder"] = {k: torch.zeros(1) for k in state["decoder"]}
        torch.save(state, path)


CHECKPOINT_KINDS = ["empty", "text", "folder", "truncated", "foreign", "unsafe", "decoder misfit"]
# A fact the message must state besides the file: what it holds (size, a refused object), or None.
CHECKPOINT_FACT = {"empty": "0 bytes", "text": "17 bytes", "folder": "folder", "unsafe": "numpy"}


@pytest.fixture(scope="module")
def broken_runs(run32, tmp_path_factory):
    """One run folder per kind of broken checkpoint, best.pt and last.pt both broken that way."""
    root = tmp_path_factory.mktemp("broken")
    good = (run32 / "last.pt").read_bytes()
    runs = {}
    for kind in CHECKPOINT_KINDS:
        run = root / "runs" / kind.replace(" ", "-")
        run.mkdir(parents=True)
        for name in ("best.pt", "last.pt"):
            _break_checkpoint(kind, good, run / name)
        runs[kind] = run
    return runs


@pytest.mark.parametrize("command", ["evaluate", "predict", "info", "report", "train --resume"])
@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_a_broken_checkpoint_is_one_line_naming_it(dataset, store32, broken_runs, tmp_path, kind, command):
    run = broken_runs[kind]
    args = {"evaluate": ["evaluate", run, "--store", store32],
            "predict": ["predict", image_of(dataset), "--run", run, "--out", tmp_path / "p"],
            "info": ["info", run], "report": ["report", run, "--out", tmp_path / "r.html"],
            "train --resume": ["train", store32, "--run", run, "--resume", *TRAIN]}[command]
    name = "best.pt" if command in ("evaluate", "predict") else "last.pt"  # info, report and resume read last.pt
    message = one_line_error(run_cli(*args, ok=False), run / name)
    assert CHECKPOINT_FACT.get(kind, "") in message.replace(str(run), "")
    assert not (tmp_path / "p").exists() and not (tmp_path / "r.html").exists()


# --- backbone weights files -------------------------------------------------------------------------------------

def _weights(kind: str, folder, good_checkpoint):
    """A weights file (or folder) of `kind`; returns its path."""
    suffix = ".safetensors" if "safetensors" in kind else ".pth"
    path = folder / (kind.replace(" ", "-") + suffix)
    if kind.startswith("empty"):
        path.write_bytes(b"")
    elif kind.startswith("junk"):
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "truncated safetensors":
        from safetensors.torch import save_file
        save_file({"patch_embed.proj.weight": torch.zeros(384, 3, 14, 14)}, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "folder":
        path.mkdir()
    elif kind == "unknown suffix":
        path = folder / "weights.ckpt"
        torch.save({"patch_embed.proj.weight": torch.zeros(384, 3, 14, 14)}, path)
    elif kind == "a cachedseg checkpoint":
        shutil.copy(good_checkpoint, path)
    elif kind == "not a state dict":
        torch.save([1, 2, 3], path)
    elif kind == "not a ViT":
        torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.bias": torch.zeros(10)}, path)
    elif kind == "a ViT that does not fit":  # passes every check on the file; timm refuses the missing blocks
        torch.save({"patch_embed.proj.weight": torch.zeros(384, 3, 14, 14)}, path)
    return path


# kind -> a fact the message must state besides the file: its size, what it holds or lacks, where it belongs
WEIGHT_KINDS = {"empty safetensors": "0 bytes", "empty pth": "0 bytes", "junk safetensors": "5000 bytes",
                "junk pth": "5000 bytes", "truncated safetensors": "1000 bytes", "folder": "folder",
                "unknown suffix": ".ckpt", "a cachedseg checkpoint": "--run", "not a state dict": "list",
                "not a ViT": "conv1.weight", "a ViT that does not fit": "blocks."}


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_a_bad_weights_file_is_one_line_naming_it(dataset, run32, tmp_path, kind):
    weights = _weights(kind, tmp_path, run32 / "best.pt")
    result = run_cli("extract", dataset, "--store", tmp_path / "s.zarr", *SMALL[:4], "--weights", weights, ok=False)
    message = one_line_error(result, "--weights", weights)
    assert WEIGHT_KINDS[kind] in message.replace(str(weights), "")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("command", ["train --live", "evaluate --data", "predict"])
def test_every_command_that_builds_a_backbone_names_a_bad_weights_file(dataset, run32, tmp_path, command):
    weights = _weights("empty safetensors", tmp_path, None)
    args = {"train --live": ["train", "--live", dataset, "--run", tmp_path / "r", *SMALL[:4], *TRAIN],
            "evaluate --data": ["evaluate", run32, "--data", dataset],
            "predict": ["predict", image_of(dataset), "--run", run32, "--out", tmp_path / "p"]}[command]
    one_line_error(run_cli(*args, "--weights", weights, ok=False), weights)


# --- numeric options --------------------------------------------------------------------------------------------

def _option_cases():
    """(command line after the paths, the option the error must name) for values out of range."""
    cases = [(["train", "STORE", "--run", "OUT/r", *TRAIN, "--lr", v], "--lr") for v in ("nan", "inf", "-inf", "-1", "0", "1e400",
                                                                     "1e-4,nan")]
    cases += [(["train", "STORE", "--run", "OUT/r", *TRAIN, opt, v], opt) for opt, v in
              [("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0"), ("--layers", "0"), ("--layers", "-1"),
               ("--layers", "1,0"), ("--workers", "-1")]]
    cases += [(["extract", "DATA", "--store", "OUT/s.zarr", *SMALL, opt, v], opt) for opt, v in
              [("--batch-size", "0"), ("--workers", "-1"), ("--layers", "0"), ("--images-per-shard", "0")]]
    cases += [(["extract", "DATA", "--store", "OUT/s.zarr", *SMALL[:2], *SMALL[4:], "--short-side", v],
               "--short-side") for v in ("0", "-14")]
    cases += [(["synth", "OUT/d", opt, "0"], opt.lstrip("-")) for opt in ("--count", "--width", "--height")]
    cases += [(["evaluate", "RUN", "--store", "STORE", opt, v], opt) for opt, v in [("--batch-size", "0"),
                                                                                      ("--workers", "-1")]]
    cases += [(["predict", "IMAGE", "--run", "RUN", "--out", "OUT/p", opt, v], opt) for opt, v in
              [("--batch-size", "0"), ("--workers", "-1")]]
    cases += [(["report", "RUN", "--out", "OUT/r.html", "--samples", "-1"], "--samples")]
    demo = ["demo", "--out", "OUT/demo", "--backbone", "vit_small_patch14_dinov2", "--weights", "random",
            "--count", "8", "--epochs", "1"]
    cases += [([*demo, opt, v], opt) for opt, v in [("--count", "1"), ("--epochs", "0"), ("--layers", "0"),
                                                    ("--short-side", "0")]]
    return cases


@pytest.mark.parametrize("args,option", _option_cases(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_numeric_option_out_of_range_is_one_line_naming_it(dataset, store32, run32, tmp_path, args, option):
    where = {"STORE": store32, "DATA": dataset, "RUN": run32, "IMAGE": image_of(dataset)}
    args = [str(where.get(a, a)).replace("OUT", str(tmp_path)) for a in args]
    one_line_error(run_cli(*args, ok=False), option)
    assert not list(tmp_path.iterdir())  # refused before anything was written


# --- outputs that cannot be written, and read-only stores that still read ------------------------------------------

READ_ONLY = textwrap.dedent("""
    import json, os, sys
    from typer.testing import CliRunner
    from cachedseg.cli import app
    results = []
    for cwd, args in json.loads(sys.argv[1]):
        os.chdir(cwd)
        r = CliRunner().invoke(app, args)
        results.append({"code": r.exit_code, "stderr": r.stderr, "output": r.output,
                        "exception": None if r.exception is None or isinstance(r.exception, SystemExit)
                        else repr(r.exception)})
    print(json.dumps(results))
""")


def run_unprivileged(calls: list[tuple], tmp_path) -> list:
    """Run `cachedseg ARGS` for each (cwd, args) in one process without root's capabilities (so file modes hold)."""
    calls = [(str(cwd), [str(a) for a in args]) for cwd, args in calls]
    drop = [SETPRIV, "--bounding-set", "-all", "--inh-caps", "-all", "--"] if ROOT else []
    proc = subprocess.run([*drop, sys.executable, "-c", READ_ONLY, json.dumps(calls)], env=ENV, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [_Result(r) for r in json.loads(proc.stdout.splitlines()[-1])]


class _Result:
    """A CLI result read back from the unprivileged process, shaped as `run_cli`'s."""

    def __init__(self, r: dict):
        self.exit_code, self.stderr, self.output, self.exception = r["code"], r["stderr"], r["output"], r["exception"]


def _read_only(path) -> None:
    """chmod a-w on a tree."""
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)


@pytest.mark.subprocess
@pytest.mark.skipif(ROOT and SETPRIV is None, reason="as root, needs setpriv to drop root's capabilities")
def test_places_that_cannot_be_written_are_named_and_read_only_stores_still_read(dataset, store32, run32, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copytree(store32, ro / "s.zarr")
    shutil.copytree(run32, ro / "run")
    shutil.copytree(store32, tmp_path / "partial.zarr")  # its folder read-only, the lock's folder writable
    import zarr
    done = zarr.open_group(str(tmp_path / "partial.zarr"), mode="r+")["done"]
    done[0] = 0
    shutil.copytree(tmp_path / "partial.zarr", ro / "partial.zarr")  # in a read-only folder
    _read_only(ro)
    _read_only(tmp_path / "partial.zarr")
    before = sorted(p.name for p in ro.rglob("*"))
    out = tmp_path / "out"
    small = [*SMALL, "--dtype", "float32", "--workers", "0"]
    refused = [  # (cwd, args, the path the error must name)
        (tmp_path, ["extract", dataset, "--store", ro / "s.zarr", *SMALL, "--workers", "0"], "s.zarr.lock"),  # float16
        (tmp_path, ["extract", dataset, "--store", ro / "partial.zarr", *small], "partial.zarr.lock"),
        (tmp_path, ["extract", dataset, "--store", tmp_path / "partial.zarr", *small], tmp_path / "partial.zarr"),
        (ro, ["extract", dataset, *SMALL, "--workers", "0"], "cache"),  # the default store folder, in a read-only cwd
        (tmp_path, ["train", store32, "--run", ro / "new", *TRAIN], ro / "new"),
        (tmp_path, ["train", store32, "--run", ro / "run", *TRAIN[2:], "--epochs", "3", "--resume"], ro / "run"),
        (tmp_path, ["report", ro / "run"], ro / "run" / "report.html"),
        (tmp_path, ["predict", image_of(dataset), "--run", run32, "--out", ro / "p"], ro / "p"),
        (tmp_path, ["evaluate", run32, "--store", store32, "--json", ro / "e.json"], ro / "e.json"),
        (tmp_path, ["synth", ro / "d", "--count", "2", "--width", "64", "--height", "64"], ro / "d"),
        (tmp_path, ["demo", "--out", ro / "demo", "--weights", "random"], ro / "demo"),
    ]
    reads = [  # a finished store in a read-only folder: nothing to write, so nothing refused
        (tmp_path, ["extract", dataset, "--store", ro / "s.zarr", *small]),
        (tmp_path, ["info", ro / "s.zarr"]), (tmp_path, ["info", ro / "run"]),
        (tmp_path, ["train", ro / "s.zarr", "--run", out / "r", *TRAIN]),
        (tmp_path, ["evaluate", ro / "run", "--store", ro / "s.zarr", "--json", out / "e.json"]),
        (tmp_path, ["report", ro / "run", "--store", ro / "s.zarr", "--out", out / "r.html", "--samples", "1"]),
    ]
    results = run_unprivileged([(cwd, args) for cwd, args, _ in refused] + reads, tmp_path)
    for (_, args, culprit), result in zip(refused, results):
        assert result.exception is None, (args, result.exception)
        one_line_error(result, culprit)
    for (_, args), result in zip(reads, results[len(refused):]):
        assert result.exit_code == 0, (args, result.output, result.exception)
    # extract found every image of the read-only store done: it wrote nothing (no file, no lock) and it is whole
    assert FeatureStore.open(ro / "s.zarr").describe()["done"] == len(FeatureStore.open(store32)) == 8
    assert (out / "r" / "best.pt").is_file() and (out / "e.json").is_file() and (out / "r.html").is_file()
    assert sorted(p.name for p in ro.rglob("*")) == before  # nothing written, no lock file left


def test_outputs_into_missing_folders_are_created_and_files_in_the_way_named(store32, run32, tmp_path):
    run_cli("evaluate", run32, "--store", store32, "--json", tmp_path / "new" / "deeper" / "e.json")
    scored = json.loads((tmp_path / "new" / "deeper" / "e.json").read_text())["images"]
    assert scored == FeatureStore.open(store32).splits.count("val")  # the default split, every image of it
    (tmp_path / "file").write_text("x")
    one_line_error(run_cli("evaluate", run32, "--store", store32, "--json", tmp_path / "file" / "e.json", ok=False),
                   tmp_path / "file")
    one_line_error(run_cli("evaluate", run32, "--store", store32, "--json", tmp_path, ok=False), "--json")
    one_line_error(run_cli("train", store32, "--run", tmp_path / "file", *TRAIN, ok=False), tmp_path / "file")
    one_line_error(run_cli("synth", tmp_path / "file", ok=False), tmp_path / "file")


# --- images and datasets ----------------------------------------------------------------------------------------

def _png_header(path, width: int, height: int) -> None:
    """A PNG that declares width x height but holds almost no pixel data: PIL's size checks run on the header."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("command", ["predict", "extract"])  # extract also reads the first frame's size first
@pytest.mark.parametrize("size", [(12000, 8000), (20000, 10000)])  # over PIL's warning (89 MP), over its error (179)
def test_huge_images_meet_our_pixel_limit_not_pils_warnings(dataset, run32, tmp_path, size, command):
    if command == "predict":
        image = tmp_path / "huge.png"
        args = ["predict", image, "--run", run32, "--out", tmp_path / "p"]
    else:  # the first trn image, a PNG under its .jpg name (PIL goes by the content), at the default input size
        data = tmp_path / "data"
        shutil.copytree(dataset, data)
        image = data / "JPEGImages" / f"{(data / 'ImageSets' / 'trn.txt').read_text().split()[0]}.jpg"
        args = ["extract", data, "--store", tmp_path / "s.zarr", *SMALL[:2], *SMALL[4:], "--workers", "0"]
    _png_header(image, *size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli(*args, ok=False)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    message = one_line_error(result, image)
    assert "decompression" not in message.lower()
    if size[0] * size[1] > 100_000_000:  # cachedseg.dataset.MAX_PIXELS: the one rule
        assert f"{size[0]}x{size[1]}" in message


@pytest.mark.parametrize("kind", ["image is a folder", "split file is a folder", "empty image"])
def test_a_folder_or_empty_file_in_the_dataset_is_named(dataset, tmp_path, kind):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    id_ = (data / "ImageSets" / "trn.txt").read_text().split()[0]
    culprit = {"image is a folder": data / "JPEGImages" / f"{id_}.jpg", "empty image": data / "JPEGImages" / f"{id_}.jpg",
               "split file is a folder": data / "ImageSets" / "val.txt"}[kind]
    if kind == "empty image":
        culprit.write_bytes(b"")
    else:
        culprit.unlink()
        culprit.mkdir()
    message = one_line_error(run_cli("extract", data, "--store", tmp_path / "s.zarr", *SMALL, ok=False), culprit)
    assert kind == "empty image" or "folder" in message.replace(str(tmp_path), "")
