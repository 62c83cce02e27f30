"""What a newcomer meets first: the command an interrupted run names works, help tells the truth, paths print whole
(never wrapped), and `info` and the report say what the recorded settings mean."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import TRAIN, run_cli

ROOT = Path(__file__).resolve().parents[1]


def cli_process(*args, **kwargs) -> subprocess.Popen:
    """`cachedseg ARGS` as its own process (a real signal, a real pipe), importing this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "cachedseg", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_after_ctrl_c_the_command_train_names_continues_the_run(store32, tmp_path):
    run = tmp_path / "run"
    proc = cli_process("train", store32, "--run-dir", run, "--epochs", "40", "--workers", "0", "--device", "cpu")
    deadline = time.monotonic() + 120
    while not (run / "metrics.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first epoch is checkpointed: interrupt the second
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    first = json.loads((run / "metrics.json").read_text())
    assert 1 <= len(first) < 40 and "Traceback" not in err
    command = re.search(r"`(cachedseg [^`]+)`", err)
    assert command, err  # the message names a command, not "the same command"
    args = shlex.split(command.group(1))[1:]
    assert "--resume" in args
    args[args.index("--epochs") + 1] = str(len(first) + 1)  # the same run, one epoch further (keeps the test short)
    done = subprocess.run([sys.executable, "-m", "cachedseg", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == list(range(1, len(first) + 2))
    assert rows[:len(first)] == first  # continued, not started again
