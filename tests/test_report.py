import random
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scheduler.report import FAILED, write_report
from scheduler.results import write_promotion, write_row

T0 = datetime(2025, 1, 1, 22, 0, tzinfo=timezone.utc)
WALL = timedelta(hours=12)  # every synthetic trial lies in [T0, T0 + WALL]; GPU n2/9 is busy half of it
AGENTS = ("claude-1", "claude-2", "codex-1", "gemini-1")
FAILURES = ("crash", "oom", "timeout", "nan", "eval_failed", "rejected", "interrupted")
N_TRIALS = 480
NEAR_MISS_BPC = 1.1234  # below every other non-promoted score


def _row(trial_id: str, candidate_id: str, kind: str, agent: str, status: str, bpc: float | None,
         start: datetime | None, finish: datetime, gpu: str | None, node: str | None, description: str) -> dict:
    return {
        "trial_id": trial_id, "candidate_id": candidate_id, "kind": kind, "agent": agent, "status": status,
        "val_bpc": bpc, "description": description, "gpu_id": gpu, "node": node,
        "submitted_at": (start or finish) - timedelta(seconds=30), "started_at": start, "finished_at": finish,
        "total_seconds": (finish - start).total_seconds() if start else 0.0,
    }


def build_results(results: Path) -> dict:
    """Hundreds of trials on 4 GPUs of node n1, a baseline that improves at 5 promotions, failures of every kind,
    one planted near miss, and GPU n2/9 with known overlapping intervals. Returns what the summary must show."""
    rng = random.Random(0)
    promotion_slots = {20: 1.280, 45: 1.262, 70: 1.245, 95: 1.231, 115: 1.220}  # slot -> new baseline mean
    baseline, rows, promotions = 1.300, [], []
    baseline_id, test_scored = "b0", set()
    for i in range(N_TRIALS):
        gpu, slot = i % 4, i // 4
        start = T0 + timedelta(seconds=60 + slot * 340 + gpu * 7)
        finish = start + timedelta(seconds=300 + rng.uniform(5, 30))
        agent = AGENTS[rng.randrange(len(AGENTS))]
        kind, cid = "candidate", f"c{i:03d}"
        if i % 25 == 0:
            kind, agent, cid = "control", "scheduler", baseline_id
        elif i % 7 == 0:
            kind, cid = "confirm", f"c{i - 1:03d}"
        status, bpc = "ok", None
        if kind != "control" and rng.random() < 0.15:
            status = FAILURES[rng.randrange(len(FAILURES))]
        elif kind == "control":
            bpc = baseline + rng.gauss(0, 0.008)
        else:
            bpc = baseline + abs(rng.gauss(0.025, 0.03))
            if rng.random() < 0.01:
                bpc = 8.0  # a diverged run that still scored
        if status == "rejected":
            start = None
        rows.append(_row(f"{cid}-r{i}", cid, kind, agent, status, bpc, start, finish, str(gpu), "n1",
                         f"idea {i}: " + rng.choice(["GQA with 2 kv heads", "rotary embeddings, base 50000",
                                                    "muon lr 0.02 on all feed-forward weights and attention"])))
        if kind == "control" and baseline_id not in test_scored and promotion_slots:  # the last is never tested
            rows[-1]["test_bpc"] = bpc + 0.01
            test_scored.add(baseline_id)
        if slot in promotion_slots and gpu == 3:
            new = promotion_slots.pop(slot)
            cid = f"p{slot}"
            winner = dict(rows[-1], trial_id=f"{cid}-r0", candidate_id=cid, kind="candidate", status="ok",
                          val_bpc=new - 0.003, description=f"promoted idea {slot}: a much longer description "
                          "that the picture must truncate")
            rows[-1] = winner
            promotions.append({
                "promoted_at": finish + timedelta(seconds=5), "candidate_id": cid, "agent": winner["agent"],
                "description": winner["description"], "old_mean": baseline, "new_mean": new,
                "gain": baseline - new, "n_candidate": 3, "n_baseline": 5, "sigma": 0.009, "threshold": 0.006,
                "gpu_name": "H100", "old_baseline": baseline_id, "new_baseline": f"b{len(promotions) + 1}",
            })
            baseline, baseline_id = new, f"b{len(promotions)}"
    # the planted near miss, and GPU n2/9: [0, 3h] + [1.5h, 2.4h] (inside it) + [9h, 12h] = 6h busy of 12h wall
    rows.append(_row("near-r0", "near", "candidate", "codex-1", "ok", NEAR_MISS_BPC, T0 + timedelta(hours=3.5),
                     T0 + timedelta(hours=3.6), "0", "n3", "the planted near miss"))
    for n, (a, b) in enumerate([(0, 3), (1.5, 2.4), (9, 12)]):
        rows.append(_row(f"g9-{n}", f"g9-{n}", "candidate", "gemini-1", "crash", None, T0 + timedelta(hours=a),
                         T0 + timedelta(hours=b), "9", "n2", "slow crash"))
    for row in rows:
        write_row(results, row)
    for event in promotions:
        write_promotion(results, event)
    return {"rows": rows, "promotions": promotions}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    data = build_results(results)
    return results, data, write_report(results)


def _size(png: Path) -> tuple[int, int]:
    with Image.open(png) as image:
        return image.size


def _section(text: str, heading: str) -> str:
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _table_rows(section: str) -> list[list[str]]:
    lines = [l for l in section.splitlines() if l.startswith("|")][2:]  # skip header and rule
    return [[c.strip() for c in l.strip("|").split(" | ")] for l in lines]


def test_picture_is_1600x900_and_not_blank(built):
    results, _, report = built
    assert report["png"] == results / "report" / "progress.png"
    with Image.open(report["png"]) as png:
        image = np.asarray(png.convert("RGB"))
    assert image.shape == (900, 1600, 3)
    assert image.std() > 20
    colours = {tuple(c) for c in image.reshape(-1, 3)[::7]}
    assert len(colours) > 50


def test_counts_returned(built):
    _, data, report = built
    rows = data["rows"]
    assert report["trials"] == len(rows) > 400
    assert report["promotions"] == len(data["promotions"]) == 5
    assert report["failed"] == sum(r["status"] != "ok" for r in rows)
    assert report["best_bpc"] == pytest.approx(min(r["val_bpc"] for r in rows if r["val_bpc"] is not None))


def test_summary_sections_and_numbers(built):
    _, data, report = built
    text = report["summary"].read_text()
    for heading in ("Lineage", "Agents", "Near misses", "GPU busy share"):
        assert f"\n## {heading}\n" in text

    lineage = _table_rows(_section(text, "Lineage"))
    assert len(lineage) == len(data["promotions"])
    assert lineage[0][5] == "+0.0200"  # gain 1.300 -> 1.280
    tests = {r["candidate_id"]: r["test_bpc"] for r in data["rows"] if r.get("test_bpc") is not None}
    assert len(tests) == len(data["promotions"])  # every baseline but the last was scored on test
    assert lineage[0][7] == f"{tests['b1']:.4f}" and lineage[0][8] == f"{tests['b0'] - tests['b1']:+.4f}"
    assert lineage[-1][7] == "not scored" and lineage[-1][8] == "not scored"

    agents = {r[0]: r for r in _table_rows(_section(text, "Agents"))}
    assert set(agents) == set(AGENTS) | {"scheduler"}
    for agent in agents:
        own = [r for r in data["rows"] if r["agent"] == agent]
        assert int(agents[agent][1]) == len(own)
        assert int(agents[agent][2]) == sum(r["status"] == "ok" for r in own)
        assert int(agents[agent][3 + FAILED.index("crash")]) == sum(r["status"] == "crash" for r in own)
        assert int(agents[agent][3 + len(FAILED)]) == sum(p["agent"] == agent for p in data["promotions"])
        assert float(agents[agent][4 + len(FAILED)]) == pytest.approx(sum(r["total_seconds"] for r in own) / 3600, abs=0.006)

    near = _table_rows(_section(text, "Near misses"))
    assert len(near) == 10
    assert near[0][1] == "near" and near[0][4] == f"{NEAR_MISS_BPC:.4f}"
    assert not any(r[1].startswith("p") or r[1].startswith("b") for r in near)  # promoted and controls excluded

    gpus = {(r[0], r[1]): r for r in _table_rows(_section(text, "GPU busy share"))}
    assert gpus[("n2", "9")][3:] == ["6.00", "50.0%"]
    assert gpus[("n1", "0")][4].endswith("%") and 80 < float(gpus[("n1", "0")][4][:-1]) < 100


def test_empty_results(tmp_path):
    report = write_report(tmp_path / "results", tmp_path / "out")
    assert report["trials"] == 0 and report["best_bpc"] is None
    assert _size(report["png"]) == (1600, 900)
    headings = re.findall(r"^## .*$", report["summary"].read_text(), re.MULTILINE)
    assert headings == ["## Lineage", "## Agents", "## Near misses", "## Early stopping", "## GPU busy share"]


def test_early_stopping_shows_the_time_saved_and_every_wrong_stop(tmp_path):
    """Shadow rows: a would-be stop of a run that ended far worse saves its rest; one of a run that ended within the
    baseline's noise is a wrong stop, listed; a trial stopped for real is counted."""
    start = T0
    controls = [1.30, 1.31, 1.29]
    for i, bpc in enumerate(controls):
        write_row(tmp_path, _row(f"b0-c{i}", "b0", "control", "baseline", "ok", bpc, start, start + timedelta(
            seconds=320), "0", "n", "control"))
    shadow = {"bad": (1.60, 90.0), "fine": (1.305, 240.0), "never": (1.40, None)}
    for name, (bpc, stop) in shadow.items():
        row = _row(f"{name}-r1", name, "candidate", "a", "ok", bpc, start, start + timedelta(seconds=330), "0", "n",
                   f"idea {name}")
        write_row(tmp_path, {**row, "training_seconds": 300.5, "eval_seconds": 10.0, "early_stop_at": stop,
                             "curve": [2.0] * 20})
    write_row(tmp_path, {**_row("gone-r1", "gone", "candidate", "a", "stopped_early", None, start,
                                start + timedelta(seconds=100), "0", "n", "hopeless"), "early_stop_at": 90.0})
    text = write_report(tmp_path)["summary"].read_text()
    section = _section(text, "Early stopping")
    saved_hours = ((300.5 - 90 + 10) + (300.5 - 240 + 10)) / 3600
    assert "1 trial stopped early" in section and "would have stopped 2 scored trials" in section
    assert f"saving {saved_hours:.2f} GPU-hours" in section and "1 wrong stop:" in section
    wrong = _table_rows(section)
    assert [r[0] for r in wrong] == ["fine-r1"] and wrong[0][3] == "240"


def test_only_failures_and_a_promotion_without_runs(tmp_path):
    """Nothing scored yet (and a promotion whose runs are missing): both files, no crash, counts still right."""
    write_row(tmp_path, _row("a-r0", "a", "candidate", "x", "crash", None, T0, T0 + timedelta(minutes=5), "0", "n",
                             "crashes"))
    write_row(tmp_path, _row("b-r0", "b", "candidate", None, "rejected", None, None, T0 + timedelta(minutes=6), None,
                             None, "rejected at intake"))
    write_promotion(tmp_path, {"promoted_at": T0, "candidate_id": "p", "agent": "x", "old_mean": 1.3, "new_mean": 1.28,
                               "gain": 0.02, "sigma": 0.01})
    report = write_report(tmp_path)
    assert (report["trials"], report["scored"], report["failed"], report["promotions"]) == (2, 0, 2, 1)
    assert _size(report["png"]) == (1600, 900)
    text = report["summary"].read_text()
    assert "| 1 | 2025-01-01 22:00 | p | x |" in text and "not scored" in text
    assert "| n | 0 | 1 | 0.08 | 100.0% |" in text  # the rejected file never ran, so it has no GPU


def test_module_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "scheduler.report", str(tmp_path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r" / "progress.png").exists() and (tmp_path / "r" / "summary.md").exists()


def test_timeline_has_a_lane_per_gpu(built):
    _, data, report = built
    assert report["timeline"].name == "timeline.png"
    with Image.open(report["timeline"]) as png:
        image = np.asarray(png.convert("RGB"))
    gpus = {(r["node"], r["gpu_id"]) for r in data["rows"] if r["started_at"] is not None}
    assert len(gpus) == 6  # 4 GPUs of n1, n2/9 and the near miss on n3/0
    assert image.shape[1] == 1600 and image.shape[0] == round(100 * (1.6 + 0.45 * len(gpus)))
    assert image.std() > 20
