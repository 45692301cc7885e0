"""`python train.py` as a user and as a trial run it, on the CPU: training, the hand-over, then the evaluation.

    python -m pytest tests/test_end_to_end.py -q

Each test trains a tiny variant of train.py for a second or two in a subprocess.
The harness's own tests are in test_harness.py, the evaluation's in
test_evaluate.py, the hand-over's in test_handover.py.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from scheduler import harness, protocol

from conftest import clean_env, run_python, train_only_folder

SUMMARY_KEYS = (
    "val_bpc", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
    "total_tokens_M", "num_steps", "num_params_M", "depth", "precision",
)

pytestmark = pytest.mark.slow


def summary_block(output: str) -> list[tuple[str, str]]:
    """The (key, value) lines after the last `---` line of the output."""
    lines = output.splitlines()
    start = len(lines) - 1 - lines[::-1].index("---")
    pairs = []
    for line in lines[start + 1 :]:
        key, _, value = line.partition(":")
        pairs.append((key, value.strip()))
    return pairs


def test_train_py_trains_and_is_scored(tmp_path, tiny_train, data_dir):
    """`python train.py` outside the scheduler: trains for the budget, then hands over to the evaluation."""
    out = tmp_path / "out"
    env = clean_env(SCHEDULER_TRAIN_DATA=data_dir / "train.bin", SCHEDULER_OUT=out,
                    SCHEDULER_BUDGET=2, SCHEDULER_DEVICE="cpu")
    proc = run_python(["train.py"], cwd=tmp_path, env=env, timeout=90)
    assert proc.returncode == 0, proc.stdout

    block = summary_block(proc.stdout)
    assert [key for key, _ in block] == list(SUMMARY_KEYS), proc.stdout
    printed = dict(block)
    assert printed["precision"] == "fp32" and printed["depth"] == "2"
    assert printed["total_seconds"] != "n/a"  # the hand-over passes the run's start

    result = json.loads((out / protocol.RESULT_FILE).read_text())  # a standalone run's figures: in out/
    stats = json.loads((out / protocol.STATS_FILE).read_text())
    assert math.isfinite(result["val_bpc"]) and result["val_bpc"] > 0
    if stats["num_steps"] >= 20:  # ~60 on an idle 2-core machine; an untrained model scores ~8.1
        assert result["val_bpc"] < 8.0, proc.stdout
    assert float(printed["val_bpc"]) == pytest.approx(result["val_bpc"], abs=1e-6)
    assert stats["precision"] == "fp32" and stats["depth"] == 2
    assert stats["training_seconds"] >= 2.0
    assert stats["num_steps"] > harness.WARMUP_STEPS
    assert stats["total_tokens"] == stats["num_steps"] * 4 * 256
    assert stats["check_seconds"] > 0 and stats["export_seconds"] > 0
    assert result["bytes_scored"] == (data_dir / "val.bin").stat().st_size - 1
    assert result["parameters"] == stats["num_params"] + 16  # the weights add the rotary frequencies (a buffer)
    assert result["total_seconds"] >= stats["training_seconds"]
    assert (out / protocol.PROGRAM_FILE).is_file() and (out / protocol.WEIGHTS_FILE).is_file()


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if text in cmdline and entry.name != str(os.getpid()):
            found.append(cmdline)
    return found


PEEKING_BUILD = '''
class Peeks(torch.nn.Module):
    """The model plus a confident guess of the byte it predicts, read from the input itself."""

    def __init__(self):
        super().__init__()
        self.inner = _build()

    def forward(self, x):
        return self.inner(x) + 20.0 * F.one_hot(torch.roll(x, -1, dims=1), 256).to(torch.float32)

    def muon_parameters(self):
        return self.inner.muon_parameters()


_build = build_model
build_model = Peeks

if __name__ == "__main__":
    main()'''


def test_standalone_run_exits_with_the_evaluations_code(tmp_path, tiny_train, data_dir):
    """`python train.py` hands over to the evaluation it started beside training; when the evaluation refuses
    the model (here: it reads the byte it predicts), the run's exit code says so."""
    tiny_train.write_text(tiny_train.read_text().replace('if __name__ == "__main__":\n    main()', PEEKING_BUILD))
    env = clean_env(SCHEDULER_TRAIN_DATA=data_dir / "train.bin", SCHEDULER_OUT=tmp_path / "out",
                    SCHEDULER_BUDGET=1, SCHEDULER_DEVICE="cpu")
    proc = run_python(["train.py"], cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == protocol.EXIT_REFUSED, proc.stdout
    assert f"{protocol.REFUSED_TAG}not causal" in proc.stdout
    assert (tmp_path / "out" / protocol.PROGRAM_FILE).is_file()
    assert not (tmp_path / "out" / protocol.RESULT_FILE).exists()


def test_standalone_run_that_crashes_leaves_no_evaluation_behind(tmp_path, tiny_train, data_dir):
    """Training that fails before finish(): the waiting evaluation sees its input close and exits."""
    tiny_train.write_text(tiny_train.read_text().replace("    run = harness.Run()\n",
                                                         "    run = harness.Run()\n    raise SystemExit(7)\n"))
    env = clean_env(SCHEDULER_TRAIN_DATA=data_dir / "train.bin", SCHEDULER_OUT=tmp_path / "out",
                    SCHEDULER_BUDGET=1, SCHEDULER_DEVICE="cpu")
    proc = run_python(["train.py"], cwd=tmp_path, env=env, timeout=90)
    assert proc.returncode == 7, proc.stdout
    deadline = time.time() + 30
    while processes_mentioning(str(tmp_path / "out")) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_mentioning(str(tmp_path / "out"))


def test_trial_saves_only_and_evaluation_is_deterministic(tmp_path, tiny_train, data_dir):
    """Under the scheduler (SCHEDULER_TRIAL) training only hands over, from a folder holding nothing but
    the train split; the evaluation, a separate process, gives the same figure every time (each in its own
    secret window order)."""
    out = tmp_path / "out"
    env = clean_env(SCHEDULER_TRAIN_DATA=train_only_folder(tmp_path, data_dir) / "train.bin",
                    SCHEDULER_OUT=out, SCHEDULER_BUDGET=1, SCHEDULER_DEVICE="cpu", SCHEDULER_TRIAL=1)
    proc = run_python(["train.py"], cwd=tmp_path, env=env, timeout=90)
    assert proc.returncode == 0, proc.stdout
    assert "val_bpc" not in proc.stdout and "---" not in proc.stdout.splitlines()
    assert sorted(p.name for p in out.iterdir()) == sorted([protocol.PROGRAM_FILE, protocol.WEIGHTS_FILE,
                                                            protocol.STATS_FILE])
    stats = json.loads((out / protocol.STATS_FILE).read_text())
    assert stats["precision"] == "fp32" and stats["training_seconds"] >= 1.0

    scores = []
    tiny_train.unlink()  # the evaluation never needs the candidate's file
    for i in range(2):
        result_file = tmp_path / f"result{i}.json"
        proc = run_python(protocol.evaluation_command(out, result_file, data_dir, "cpu")[1:], cwd=tmp_path,
                          env=clean_env(), timeout=120)
        assert proc.returncode == 0, proc.stdout
        block = dict(summary_block(proc.stdout))
        assert list(block) == list(SUMMARY_KEYS)
        assert block["num_steps"] == str(stats["num_steps"])  # the training's claims are shown
        result = json.loads(result_file.read_text())
        assert "num_steps" not in result  # and not recorded as figures
        scores.append(result["val_bpc"])
    assert math.isfinite(scores[0]) and scores[0] > 0
    assert scores[0] == scores[1]  # CPU: bit-identical, whatever order the windows went in
