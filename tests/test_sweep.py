"""Sweeps: many heads trained in one pass over the cache, each equal to the same config trained alone."""

import json
from dataclasses import replace

import pytest
import torch

from cachedseg import checkpoint
from cachedseg.errors import CachedsegError
from cachedseg.features import cached_source
from cachedseg.train import train_heads
from tests.conftest import one_line_error, run_cli

SWEEP = ["--epochs", "2", "--workers", "0", "--device", "cpu"]


def test_a_sweep_trains_every_combination_and_ranks_them(store32, tmp_path):
    run = tmp_path / "sweep"
    run_cli("train", store32, "--run-dir", run, "--decoder", "conv,linear", "--lr", "1e-4,1e-3", "--seed", "0,1",
            *SWEEP)
    summary = json.loads((run / "sweep.json").read_text())
    assert len(summary["runs"]) == 8 and summary["best"] == summary["runs"][0]["name"]
    mious = [r["best_val_miou"] for r in summary["runs"]]
    assert mious == sorted(mious, reverse=True)
    for row in summary["runs"]:
        history = json.loads((run / row["name"] / "metrics.json").read_text())
        assert len(history) == 2 and max(r["val_miou"] for r in history) == row["best_val_miou"]
        assert row["config"]["data_seed"] == 0  # all shuffled alike: they shared the batches
    # a config inside the sweep ends exactly where the same config trained alone ends (same batches, one CPU)
    alone = tmp_path / "alone"
    run_cli("train", store32, "--run-dir", alone, "--decoder", "linear", "--lr", "1e-3", "--seed", "1",
            "--data-seed", "0", *SWEEP)
    a, b = checkpoint.load_run(alone, "last"), checkpoint.load_run(run / "linear-l0-lr0.001-s1", "last")
    assert a.metrics == [replace(r, seconds=a.metrics[i].seconds, train_seconds=a.metrics[i].train_seconds)
                         for i, r in enumerate(b.metrics)]
    assert all(torch.equal(a.decoder_state[k], b.decoder_state[k]) for k in a.decoder_state)


def test_a_killed_sweep_resumes(store32, tmp_path):
    run = tmp_path / "sweep"
    run_cli("train", store32, "--run-dir", run, "--decoder", "linear", "--lr", "1e-4,1e-3", "--epochs", "1",
            "--workers", "0")
    # as after a kill between two heads' checkpoints: one head is an epoch behind the other
    (run / "linear-l0-lr0.001-s0" / "last.pt").unlink()
    run_cli("train", store32, "--run-dir", run, "--decoder", "linear", "--lr", "1e-4,1e-3", "--resume", *SWEEP)
    straight = tmp_path / "straight"
    run_cli("train", store32, "--run-dir", straight, "--decoder", "linear", "--lr", "1e-4,1e-3", *SWEEP)
    for name in ("linear-l0-lr0.0001-s0", "linear-l0-lr0.001-s0"):
        a, b = checkpoint.load_run(run / name, "last"), checkpoint.load_run(straight / name, "last")
        assert a.epoch == b.epoch == 2
        assert all(torch.equal(a.decoder_state[k], b.decoder_state[k]) for k in a.decoder_state), name


def test_heads_that_do_not_fit_are_refused_up_front_with_the_numbers(store32, tmp_path, monkeypatch):
    import cachedseg.train
    monkeypatch.setattr(cachedseg.train, "free_memory", lambda device: 100e6)  # 0.1 GB free
    result = run_cli("train", store32, "--run-dir", tmp_path / "s", "--decoder", "linear,upconv", *SWEEP, ok=False)
    one_line_error(result, "upconv", "GB")
    assert not (tmp_path / "s").exists()


def test_configs_that_cannot_share_batches_are_refused(store32, tmp_path):
    from cachedseg.train import TrainConfig
    plans = [(tmp_path / "a", TrainConfig(epochs=1)), (tmp_path / "b", TrainConfig(epochs=2))]
    with pytest.raises(CachedsegError, match="--epochs"):
        train_heads(cached_source(store32), plans)
    assert not any(run.exists() for run, _ in plans)  # refused before any run folder is made
    one_line_error(run_cli("train", store32, "--run-dir", tmp_path / "c", "--lr", "1e-4,x", ok=False), "--lr")


def test_the_gpu_speed_options_run_and_are_recorded(store32, tmp_path):
    # Written for GPUs (measured there when one is available); on the CPU they must run and stay faithful:
    # channels-last changes only the convolution kernels' order of summation.
    plain, last, bf16 = tmp_path / "plain", tmp_path / "last", tmp_path / "bf16"
    run_cli("train", store32, "--run-dir", plain, "--epochs", "1", "--workers", "0")
    run_cli("train", store32, "--run-dir", last, "--epochs", "1", "--workers", "0", "--channels-last")
    run_cli("train", store32, "--run-dir", bf16, "--epochs", "1", "--workers", "0", "--decoder-precision", "bfloat16")
    a, b, c = (checkpoint.load_run(r, "last") for r in (plain, last, bf16))
    assert b.train_config.channels_last and c.train_config.decoder_precision == "bfloat16"
    assert b.metrics[0].train_loss == pytest.approx(a.metrics[0].train_loss, rel=1e-4)
    assert c.metrics[0].train_loss == pytest.approx(a.metrics[0].train_loss, rel=5e-2)  # bfloat16: 8-bit mantissa
    run_cli("evaluate", last, "--store", store32)  # the checkpoints load and run in plain float32
    one_line_error(run_cli("train", store32, "--run-dir", tmp_path / "x", "--decoder-precision", "float8", ok=False),
                   "--decoder-precision")


def test_options_plan_one_run_or_a_sweep_of_every_combination(tmp_path):
    from cachedseg import sweep
    from cachedseg.runs import default_run
    from cachedseg.train import TrainConfig
    base = TrainConfig(epochs=3)
    one = sweep.plan(base, "3e-4", "linear", "2", store="cache/s.zarr")
    assert not one.is_sweep and one.run == default_run("cache/s.zarr", None, "linear")
    assert one.configs == [replace(base, lr=3e-4, decoder="linear", seed=2)]  # its own seed shuffles (no data_seed)
    assert one.max_layers == 1  # all the store holds: a live backbone returns one
    many = sweep.plan(base, "1e-4, 3e-4", "conv,linear", "0,1", "1,4", live=tmp_path, run=tmp_path / "s")
    assert many.is_sweep and many.run == tmp_path / "s" and many.max_layers == 4
    assert len(many.configs) == 16 and len({sweep.name(c) for c in many.configs}) == 16
    assert {c.data_seed for c in many.configs} == {0}  # they share batches: the first seed shuffles
    assert sweep.plan(replace(base, data_seed=5), "1e-4", "conv", "1", store="s.zarr").configs[0].data_seed == 5


@pytest.mark.parametrize("option,lists", [
    ("--lr", dict(lr="x")), ("--lr", dict(lr="0")), ("--lr", dict(lr="nan")), ("--lr", dict(lr="1e-4,inf")),
    ("--seed", dict(seed="1.5")), ("--decoder", dict(decoder=",")), ("--layers", dict(layers="0")),
    ("--layers", dict(layers="two"))])
def test_options_that_do_not_parse_are_refused_by_name(option, lists):
    from cachedseg import sweep
    from cachedseg.train import TrainConfig
    options = dict(lr="1e-4", decoder="conv", seed="0") | lists
    with pytest.raises(CachedsegError, match=f"^{option} "):
        sweep.plan(TrainConfig(), **options, store="s.zarr")


def test_lists_that_repeat_a_value_are_refused():
    from cachedseg import sweep
    from cachedseg.train import TrainConfig
    with pytest.raises(CachedsegError):  # each value parses: the list itself is refused
        sweep.plan(TrainConfig(), "1e-4,0.0001", "conv", "0", store="s.zarr")
