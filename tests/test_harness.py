"""The harness in the candidate's process, on the CPU: data, the budget's clock, the loss check, the hand-over.

    python -m pytest tests/test_harness.py -q

Most tests build a Run in this process (`harness_env` gives it a trial's
environment: nothing is evaluated); the loss check's also runs as a process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scheduler import harness, protocol

from conftest import clean_env, run_python, train_only_folder


@pytest.fixture
def harness_env(monkeypatch, tmp_path):
    """An in-process harness environment: no SCHEDULER_* from outside, CPU, a trial (no hand-over to evaluation)."""
    for name in list(os.environ):
        if name.startswith("SCHEDULER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SCHEDULER_DEVICE", "cpu")
    monkeypatch.setenv("SCHEDULER_TRIAL", "1")
    monkeypatch.setenv("SCHEDULER_OUT", str(tmp_path / "out"))
    return monkeypatch


# ---------------------------------------------------------------------------- the loss check

NAN_SCRIPT = """
import torch
from scheduler import harness

run = harness.Run()
while not run.done():
    bad = run.steps >= {bad_from}
    run.step(torch.tensor(float("{value}") if bad else 1.0), tokens=1)
run.finish(torch.nn.Linear(1, 1))
"""


@pytest.mark.slow
@pytest.mark.parametrize("value,bad_from", [("nan", 0), ("inf", 20)])
def test_non_finite_loss_exits_with_exit_nan(tmp_path, data_dir, value, bad_from):
    """From the first step (checked at once) or after the warmup (checked at the next wait for the device), long
    before the default budget is spent: the timeout, a third of it, is what a loaded machine may need."""
    (tmp_path / "cand.py").write_text(NAN_SCRIPT.format(value=value, bad_from=bad_from))
    env = clean_env(SCHEDULER_TRAIN_DATA=data_dir / "train.bin", SCHEDULER_OUT=tmp_path / "out",
                    SCHEDULER_DEVICE="cpu")
    proc = run_python(["cand.py"], cwd=tmp_path, env=env, timeout=protocol.DEFAULT_BUDGET / 3)
    assert proc.returncode == protocol.EXIT_NAN, proc.stdout
    step = int(proc.stdout.split(f"FAIL: loss is {value} at step ")[1].split()[0])  # the harness's own count
    assert step == 1 if bad_from == 0 else step > bad_from
    assert not (tmp_path / "out" / protocol.PROGRAM_FILE).exists()


def test_nan_in_a_loop_that_never_asks_done(harness_env, data_dir):
    """A loop of run.step() calls without run.done() still has its loss checked (no TypeError)."""
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(data_dir / "train.bin"))
    run = harness.Run()
    with pytest.raises(SystemExit) as exit_info:
        for _ in range(10):
            run.step(torch.tensor(float("nan")), tokens=1)
    assert exit_info.value.code == protocol.EXIT_NAN


# ---------------------------------------------------------------------------- data: the train split only


def test_run_reads_only_the_train_split(harness_env, tmp_path, data_dir):
    folder = train_only_folder(tmp_path, data_dir)
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(folder / "train.bin"))
    read = []
    real_fromfile = np.fromfile
    harness_env.setattr(harness.np, "fromfile", lambda path, *a, **k: read.append(Path(path)) or real_fromfile(path, *a, **k))

    run = harness.Run()
    assert read == [folder / "train.bin"]
    train = np.fromfile(data_dir / "train.bin", dtype=np.uint8)
    assert run.train.numel() == train.size and run.train.device.type == "cpu"

    batch = run.batch(8, 64)
    assert batch.shape == (8, 65) and batch.dtype == torch.long
    haystack = train.tobytes()
    for row in batch:  # each row is a contiguous window of the train split
        assert bytes(row.to(torch.uint8).tolist()) in haystack


def test_run_without_train_split_says_how_to_fix(harness_env, tmp_path):
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(tmp_path / "nowhere" / "train.bin"))
    with pytest.raises(SystemExit) as exit_info:
        harness.Run()
    assert "prepare" in str(exit_info.value.code)


def test_batches_follow_the_seed(harness_env, data_dir):
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(data_dir / "train.bin"))
    harness_env.setenv("SCHEDULER_SEED", "7")
    a, b = harness.Run().batch(4, 32), harness.Run().batch(4, 32)
    harness_env.setenv("SCHEDULER_SEED", "8")
    c = harness.Run().batch(4, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------- the hand-over


class DataDependent(torch.nn.Module):
    """Branches on the data: torch.export cannot trace one graph for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x) if x.sum() > 0 else -self.emb(x)


class Noisy(DataDependent):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x) + torch.randn(x.shape[0], x.shape[1], 256)


@pytest.mark.parametrize("model,reason", [(DataDependent(), "data-dependent"), (Noisy(), "aten.randn.default")])
def test_watch_fails_fast_for_a_model_that_cannot_be_handed_over(harness_env, data_dir, capsys, model, reason):
    """Right after build_model(), not after training: one EXPORT_FAILED line with the exporter's reason."""
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(data_dir / "train.bin"))
    run = harness.Run()
    with pytest.raises(SystemExit) as exit_info:
        run.watch(model, seq_len=64)
    assert exit_info.value.code == protocol.EXIT_EXPORT
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(protocol.EXPORT_TAG)]
    assert len(lines) == 1 and reason.lower() in lines[0].lower(), lines


def test_a_source_handed_over_before_skips_the_early_check_not_the_export(harness_env, data_dir):
    """The trial sets SCHEDULER_EXPORTED=1 for a control run or rerun of a source already scored: watch() skips
    the check (it only saves a failing model its budget), and the hand-over at the end still exports and checks."""
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(data_dir / "train.bin"))
    harness_env.setenv("SCHEDULER_EXPORTED", "1")
    run = harness.Run()
    run.watch(DataDependent(), seq_len=64)  # not exportable, and not looked at
    assert run.num_params == 256 * 256 and run.check_seconds < 0.05
    with pytest.raises(SystemExit) as exit_info:
        run.finish(DataDependent())
    assert exit_info.value.code == protocol.EXIT_EXPORT


def test_finish_hands_the_model_over_as_data(harness_env, tmp_path, data_dir):
    """finish(): the graph and the weights (no pickle anywhere), the statistics with the export's seconds."""
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(data_dir / "train.bin"))
    run = harness.Run()
    model = torch.nn.Sequential(torch.nn.Embedding(256, 32), torch.nn.Linear(32, 256))
    run.watch(model, seq_len=64)
    run.step(torch.tensor(1.0), tokens=64)
    run.finish(model, precision="fp32")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([protocol.PROGRAM_FILE, protocol.WEIGHTS_FILE,
                                                            protocol.STATS_FILE])
    stats = json.loads((out / protocol.STATS_FILE).read_text())
    assert stats["check_seconds"] > 0 and stats["export_seconds"] > 0 and stats["num_params"] == 256 * 32 * 2 + 256
    program = json.loads((out / protocol.PROGRAM_FILE).read_text())
    assert [node["op"] for node in program["nodes"]] == ["aten.embedding.default", "aten.linear.default"]
    assert sorted(program["weights"]) == ["0.weight", "1.bias", "1.weight"]


# ---------------------------------------------------------------------------- the budget's clock and FLOPs


@pytest.mark.slow
def test_budget_counts_training_time_only(harness_env, tmp_path, data_dir):
    """First steps that take 0.3 s each (a "compilation") are warmup; the loop stops after ~1 s counted."""
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(data_dir / "train.bin"))
    harness_env.setenv("SCHEDULER_BUDGET", "1")
    run = harness.Run()
    model = torch.nn.Embedding(256, 256)  # LongTensor[B, T] -> logits[B, T, 256]: a model that can be handed over
    progress = []
    started = time.perf_counter()
    while not run.done():
        time.sleep(0.3 if run.steps < harness.WARMUP_STEPS else 0.002)
        progress.append(run.progress)
        run.step(torch.tensor(1.0), tokens=10)
    wall = time.perf_counter() - started
    run.finish(model, precision="fp32")

    stats = json.loads((tmp_path / "out" / protocol.STATS_FILE).read_text())
    # it stops at the first check past the budget: one step late at most, however slow a loaded machine is
    assert 1.0 <= stats["training_seconds"] <= 2.0
    assert stats["warmup_seconds"] >= 0.85  # three 0.3 s steps, not counted
    assert wall >= stats["training_seconds"] + stats["warmup_seconds"] - 0.01
    assert stats["num_steps"] > harness.WARMUP_STEPS + 10  # hundreds on an idle machine
    assert stats["total_tokens"] == 10 * stats["num_steps"]
    assert stats["budget"] == 1.0 and stats["precision"] == "fp32" and stats["gpu_name"] == "cpu"
    assert progress[: harness.WARMUP_STEPS] == [0.0] * harness.WARMUP_STEPS
    assert progress == sorted(progress) and 0.5 < progress[-1] <= 1.0
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / protocol.WEIGHTS_FILE)
    assert torch.equal(saved["weight"], model.weight.detach()) and list(saved) == ["weight"]
    assert model.training  # the export traced it in eval mode and put it back


def test_attention_backward_counts_twice_the_forward():
    """MFU's FLOPs: a fused attention backward counts twice its forward, whatever kernel recomputes inside."""
    from torch.utils.flop_counter import sdpa_flop_count

    q, k, v = (2, 6, 1024, 64), (2, 6, 1024, 64), (2, 6, 1024, 32)
    assert harness.attention_backward_flops(q, q, k, v) == 2 * sdpa_flop_count(q, k, v)


def test_a_progress_line_carries_the_mean_loss_of_the_steps_since_the_last(monkeypatch, capsys):
    """The early-stop curve averages every counted step, not the one step a sync happens to land on: with a
    clock that moves 0.1 s per step, a line every 0.5 s carries the mean of the 5 steps' losses before it."""
    now = [1000.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(harness.time, "time", lambda: now[0])
    clock = harness.Clock(budget=20.0, device=torch.device("cpu"))  # lines and syncs every 0.5 s
    losses = [float(i) for i in range(1, 24)]
    for loss in losses:
        clock.step(torch.tensor(loss), tokens=1)
        now[0] += 0.1
    lines = [json.loads(line[len(protocol.PROGRESS_TAG):]) for line in capsys.readouterr().out.splitlines()
             if line.startswith(protocol.PROGRESS_TAG)]
    counted = losses[harness.WARMUP_STEPS:]
    assert len(lines) >= 3
    means, start = [], 0
    for line in lines:
        end = line["step"] - harness.WARMUP_STEPS
        means.append(sum(counted[start:end]) / (end - start))
        start = end
    assert [line["loss"] for line in lines] == pytest.approx(means)
    assert all(b["step"] - a["step"] > 1 for a, b in zip(lines, lines[1:]))  # a line's mean is of several steps


# ---------------------------------------------------------------------------- the held-out curve


def held_out_split(folder: Path, size: int = 40_000) -> Path:
    """A train split whose held-out windows (on the CPU, the last 257 bytes of each of 2 equal pieces) are all
    255, the rest never 255: a byte 255 in a batch is a held-out byte drawn. The first piece's bytes are below
    128, the second's from 128: a batch shows which pieces it drew from."""
    pieces, length = harness.HELDOUT["cpu"]
    data = np.random.default_rng(0).integers(0, 127, size, dtype=np.uint8)
    data[size // pieces:] += 128
    for end in range(size // pieces, size + 1, size // pieces):
        data[end - length - 1:end] = 255
    path = folder / "train.bin"
    data.tofile(path)
    return path


def test_batches_never_draw_the_held_out_windows(harness_env, tmp_path):
    """Held out: the end of each piece of the split; drawn: everything else, from every piece."""
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(held_out_split(tmp_path)))
    run = harness.Run()
    pieces, length = harness.HELDOUT["cpu"]
    assert run._heldout.shape == (pieces, length + 1) and bool((run._heldout == 255).all())
    batches = torch.cat([run.batch(64, 256) for _ in range(50)])  # 3,200 windows of 257 bytes
    assert int(batches.max()) < 255
    first_piece = (batches < 128).all(dim=1)
    assert 0.4 < float(first_piece.float().mean()) < 0.6  # evenly from both pieces, none across their border
    assert bool(((batches >= 128).all(dim=1) | first_piece).all())


def test_a_split_too_small_to_spare_holds_nothing_out(harness_env, tmp_path):
    pieces, length = harness.HELDOUT["cpu"]
    size = harness.HELDOUT_MIN_SPLIT * pieces * (length + 1) - 1
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(held_out_split(tmp_path, size)))
    run = harness.Run()
    assert run._heldout is None and run.measure() == {}
    assert int(torch.cat([run.batch(64, 256) for _ in range(50)]).max()) == 255  # every byte may be drawn
    with pytest.raises(SystemExit, match="shorter seq_len"):
        run.batch(1, size)


class SlowInEval(torch.nn.Module):
    """LongTensor[B, T] -> logits; in eval mode each forward moves the test's clock `seconds`."""

    def __init__(self, now: list[float], seconds: float) -> None:
        super().__init__()
        self.emb, self.now, self.seconds, self.evals = torch.nn.Embedding(256, 256), now, seconds, 0
        self.frozen = torch.nn.Dropout(0.5).eval()  # a submodule the candidate keeps in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.now[0] += self.seconds
            self.evals += 1
        return self.emb(x)


def measured_run(harness_env, tmp_path, monkeypatch, capsys,
                 seconds: float) -> tuple[harness.Run, SlowInEval, list, str]:
    """A 20 s budget (windows of 1 s; lines every 0.5 s), steps of 0.1 s on the test's clock, a model whose
    measurement takes `seconds`: the run, the model, the progress lines that carry a held-out figure, the output."""
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(held_out_split(tmp_path)))
    harness_env.setenv("SCHEDULER_BUDGET", "20")
    now = [1000.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(harness.time, "time", lambda: now[0])
    run = harness.Run()
    model = SlowInEval(now, seconds)
    model.train()
    model.frozen.eval()
    run._model = model  # as watch() leaves it (watch's export check and FLOP count are tested above)
    while not run.done():
        run.step(torch.tensor(1.0), tokens=1)
        now[0] += 0.1
    out = capsys.readouterr().out
    lines = [json.loads(line[len(protocol.PROGRESS_TAG):]) for line in out.splitlines()
             if line.startswith(protocol.PROGRESS_TAG)]
    return run, model, [line for line in lines if "heldout" in line], out


def test_the_held_out_loss_is_measured_once_a_window_outside_the_counted_time(harness_env, tmp_path, monkeypatch,
                                                                             capsys):
    """One held-out figure per window, at its first line; the 0.05 s each measurement takes count neither in the
    lines' training seconds nor toward the budget, and every module's training flag is as the candidate left it."""
    run, model, measured, _ = measured_run(harness_env, tmp_path, monkeypatch, capsys, seconds=0.05)
    windows = [int(line["training_seconds"] / 20 * 20) for line in measured]
    assert windows == list(range(20)) and model.evals == 20
    assert all(line["heldout"] > 0 for line in measured)
    assert 20.0 <= run.training_seconds <= 20.2 and run.heldout_seconds == pytest.approx(1.0)
    assert model.training and not model.frozen.training and model.emb.training


def test_measuring_stops_past_its_time_limit(harness_env, tmp_path, monkeypatch, capsys):
    """The trial's clock counts the measurements in its 10 s margin: past HELDOUT_MAX_SECONDS (a model that takes
    0.7 s a measurement: 3 of them) the harness measures no more, rather than get an honest slow model stopped.
    (A candidate that lifts the limit gains up to that margin: test_attacks.py, the held-out measurement.)"""
    run, model, measured, out = measured_run(harness_env, tmp_path, monkeypatch, capsys, seconds=0.7)
    assert len(measured) == model.evals == 3 and run.heldout_seconds == pytest.approx(2.1)
    assert out.count("held-out loss took 2.1 s, past its limit (HELDOUT_MAX_SECONDS = 2 s); not measured again") == 1
