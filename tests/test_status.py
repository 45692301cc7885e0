"""`status` and its live view `status --watch`: built from the files under results/, drawn without scrolling."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime, timezone

import pytest

from scheduler import presence, queue, results, status
from scheduler.layout import Layout


@pytest.fixture
def busy_root(tmp_path):
    """Two trials running on GPUs 0 and 3 (one training, one just started), twelve queued, one promotion, and a
    launch holding the root (this test process, through the lock and heartbeat a launch takes)."""
    layout = Layout.at(tmp_path)
    layout.make()
    layout.baseline.write_text("def build_model():\n    pass\n")
    held = presence.Presence.claim(layout)
    held.announce()
    for i in range(14):
        queue.push(layout, queue.Entry(trial_id=f"c{i}-r1", candidate_id=f"c{i}", kind="candidate",
                                       source_sha256="0" * 64, agent=f"agent-{i % 2}", description=f"idea {i}"))
    training, starting = queue.take(layout), queue.take(layout)
    layout.live.mkdir(parents=True, exist_ok=True)
    (layout.live / f"{training.trial_id}.json").write_text(json.dumps(
        {"started": time.time() - 42, "phase": "train", "step": 310, "loss": 1.2345, "progress": 0.5,
         "tok_s": 900000, "gpu": "3"}))
    (layout.live / f"{starting.trial_id}.json").write_text(json.dumps({"started": time.time(), "phase": "starting"}))
    results.write_promotion(layout.results, {
        "promoted_at": datetime(2026, 11, 25, 9, 30, tzinfo=timezone.utc), "candidate_id": "p1", "agent": "agent-0",
        "description": "a longer learning-rate warmup", "gain": 0.0123, "old_mean": 1.0, "new_mean": 0.9877})
    yield layout
    held.release()


def test_snapshot_has_gpu_progress_queue_and_promotions(busy_root):
    state = status.snapshot(busy_root)
    assert [r["gpu"] for r in state["running"]] == [None, "3"]  # sorted by GPU; the starting one has none yet
    trained = next(r for r in state["running"] if r["gpu"] == "3")
    assert (trained["loss"], trained["fraction"], trained["elapsed"] >= 42) == (1.2345, 0.5, True)
    assert len(state["queued"]) == 12 and state["promotions"][0]["candidate_id"] == "p1"


def test_render_fits_the_terminal(busy_root):
    state = status.snapshot(busy_root)
    lines = status.render(state, width=200, height=40)
    bar = next(line for line in lines if line.startswith("GPU   3"))
    assert "[" + "#" * 10 + "." * 10 + "]" in bar and "loss 1.2345" in bar and "42s" in bar
    assert "  ... and 4 more" in lines and any("p1 (agent-0) gain 0.0123" in line for line in lines)
    small = status.render(state, width=30, height=8)
    assert len(small) == 8 and all(len(line) <= 30 for line in small)
    assert small[-1].startswith("... ")  # says what did not fit instead of scrolling


def test_watch_redraws_in_place(busy_root):
    out = io.StringIO()
    status.watch(busy_root, interval=0, out=out, frames=3)
    text = out.getvalue()
    assert text.startswith(status.ENTER) and text.endswith(status.LEAVE)
    frames = text[len(status.ENTER):-len(status.LEAVE)].split(status.HOME)[1:]
    assert len(frames) == 3
    for frame in frames:  # each frame overwrites the last: no screen clear, never a line feed past the last line
        assert "\x1b[2J" not in frame and frame.endswith(status.CLEAR_BELOW)
        assert frame.count("\n") < 24  # shutil's fallback terminal in tests is 80x24
