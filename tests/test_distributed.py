"""Jobs of several processes: real `torchrun --standalone` runs with the gloo backend on the CPU, as the README
shows them (with only the process counts changed)."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import typer.main
import zarr

from cachedseg import checkpoint
from cachedseg.cli import app
from cachedseg.locks import writer_lock
from tests.conftest import (SMALL, TORCHRUN, assert_same_store, chunk_file, extract_one_thread, one_thread_env,
                            run_cli, torchrun, written_chunks)

pytestmark = pytest.mark.subprocess  # torchrun jobs

env = one_thread_env  # offline, one thread per rank (two ranks on two cores)


def test_two_ranks_write_one_sharded_store_equal_to_a_one_process_store(dataset, store32_one_thread, tmp_path):
    store = tmp_path / "two.zarr"
    proc = torchrun("extract", dataset, "--store", store, *SMALL, "--dtype", "float32", "--batch-size", "1",
                    "--workers", "0", "--images-per-shard", "2")
    assert proc.stdout.count("feature store") == 1  # reported once, for the whole job
    assert_same_store(store, store32_one_thread)
    assert zarr.open_group(str(store)).attrs["images_per_shard"] == 2
    assert len([p for p in (store / "features").iterdir() if p.name.startswith("c.")]) == 4  # 8 images, 4 files


def test_a_killed_job_resumes_with_another_number_of_processes(dataset, store32_one_thread, tmp_path):
    store = tmp_path / "killed.zarr"
    cmd = [*TORCHRUN, "-m", "cachedseg", "extract", str(dataset), "--store", str(store), *SMALL,
           "--dtype", "float32", "--batch-size", "1", "--workers", "0"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and len(written_chunks(store, "done")) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks at once
    proc.wait()
    done = zarr.open_group(str(store))["done"][:]
    assert 0 < done.sum() < len(done)
    finished = {p: p.stat().st_mtime_ns for p in (chunk_file(store, "features", i) for i in np.flatnonzero(done))}
    extract_one_thread(dataset, store)  # one process finishes it
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # only the missing images were computed
    assert_same_store(store, store32_one_thread)


def test_a_second_job_is_refused_once_with_the_holder_named(dataset, tmp_path):
    store = tmp_path / "locked.zarr"
    with writer_lock(store, "the-other-job"):
        proc = torchrun("extract", dataset, "--store", store, *SMALL, "--workers", "0", check=False)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "the-other-job" in line]
    assert len(ours) == 1 and f"pid {os.getpid()}" in ours[0]
    assert not store.exists()


def test_two_ranks_train_like_one_process_with_the_whole_batch_and_resume(store32, tmp_path):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    recipe = ["--decoder", "conv", "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    run_cli("train", store32, "--run-dir", one, "--epochs", "2", *recipe)
    torchrun("train", store32, "--run-dir", two, "--epochs", "2", *recipe)
    torchrun("train", store32, "--run-dir", resumed, "--epochs", "1", *recipe)
    torchrun("train", store32, "--run-dir", resumed, "--epochs", "2", "--resume", *recipe)
    a = checkpoint.load_run(one, "last")
    steps = 2 * 3  # 6 trn images, global batch 2, 2 epochs
    for run in (two, resumed):
        b = checkpoint.load_run(run, "last")
        assert [r.train_loss for r in b.metrics] == pytest.approx([r.train_loss for r in a.metrics], rel=1e-5)
        assert [r.val_miou for r in b.metrics] == pytest.approx([r.val_miou for r in a.metrics], abs=1e-4)
        diff = torch.cat([(a.decoder_state[k].float() - b.decoder_state[k].float()).abs().flatten()
                          for k in a.decoder_state if a.decoder_state[k].is_floating_point()])
        # Ranks sum gradients and batch-norm statistics in another order, so float32 rounding differs. Adam turns
        # that into visible differences only for weights whose gradient is near zero (m / sqrt(v) is ill-conditioned
        # there), and moves any weight by at most about lr per step. Measured over 1.48M weights: AVX2 kernels max
        # 1.8e-5 and 0.0004% over 1e-6; default kernels (ATEN_CPU_CAPABILITY=default) max 3.3e-5 and 0.089% over
        # 1e-6. Training at another batch composition (one process at batch 1, as unsynchronised batch norm or a
        # per-rank batch would) leaves 99.8% of the weights over 1e-6 apart, max 0.42.
        assert diff.max() <= 0.25 * 1e-4 * steps
        assert (diff > 1e-6).float().mean() <= 1e-2


def test_no_option_of_any_command_collides_with_torchrun():
    # torchrun parses every argument that looks like an option, even after the script: a prefix of one of its
    # options is taken silently, of several is an error ("--run could match --run-path, --run_path").
    from torch.distributed.run import get_args_parser
    theirs = {o for action in get_args_parser()._actions for o in action.option_strings}
    single_process_only = {"--run"}  # kept for one-process use; `--run-dir` is the name to use under torchrun
    click_app = typer.main.get_command(app)
    for name, command in click_app.commands.items():
        for param in command.params:
            for option in [*param.opts, *param.secondary_opts]:
                if option in single_process_only:
                    assert any(o not in single_process_only for o in param.opts), (name, option)
                    continue
                assert not any(t.startswith(option) for t in theirs), (name, option)


def test_the_rank_is_read_from_torchruns_environment(monkeypatch):
    from cachedseg import distributed
    from cachedseg.errors import CachedsegError
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.rank() == 0
    monkeypatch.setenv("RANK", "3")
    assert distributed.rank() == 3
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK")
    with pytest.raises(CachedsegError, match="RANK"):  # a job without its rank is refused, not run as rank 0
        distributed.context("cpu")
