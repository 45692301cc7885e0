"""Hostile and broken candidates in one launch: every one gets its row with a clear reason, nothing escapes."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from scheduler import results
from scheduler.trial import LOG_HEAD_BYTES

from test_scheduler import corpus, make_root, scheduler, variant, with_main  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.slow

SLEEPER = "98765"  # a child that outlives its candidate runs `sleep 98765`
TRAIN = "main()"


def test_hostile_candidates(tmp_path, corpus):  # noqa: F811
    root = make_root(tmp_path, corpus)
    cases = {
        "build_raises": variant().replace('    """LongTensor[B, T] -> logits[B, T, 256]. The evaluation calls this too."""',
                                          '    """Raises."""\n    raise ValueError("no model today")'),
        "loop_before": with_main("while True:\n    pass"),
        "loop_inside": with_main("import torch\nfrom scheduler import harness\nrun = harness.Run()\n"
                                 "while True:\n    run.step(torch.tensor(1.0), tokens=1)"),
        "ignores_sigterm": with_main("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                     "while True:\n    time.sleep(0.1)"),
        "leaves_children": with_main(f"import subprocess\nsubprocess.Popen(['sleep', '{SLEEPER}'], start_new_session=True)\n"
                                     f"subprocess.Popen(['sleep', '{SLEEPER}'])\n{TRAIN}"),
        "floods_output": with_main(f"import sys\nfor i in range(300_000):\n    print('flood', i)\n{TRAIN}"),
        "wrong_shape": with_main("import torch\nfrom scheduler import harness\nrun = harness.Run()\n"
                                 "model = torch.nn.Embedding(256, 10)\nrun.finish(model)").replace(
                                     "def build_model() -> torch.nn.Module:",
                                     "def build_model() -> torch.nn.Module:\n    return torch.nn.Embedding(256, 10)\n\n\n"
                                     "def unused_build_model() -> torch.nn.Module:"),
        "prints_env": with_main(f"import json, os\nprint('ENV', json.dumps(dict(os.environ)))\n{TRAIN}"),
    }
    ids = {}
    for name, text in cases.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        ids[scheduler(root, "submit", str(path), "--agent", "hostile", "-m", name).stdout.strip()] = name
    (root / "candidates" / "huge.py").write_bytes(b"# " + b"x" * 50_000_000 + b"\ndef build_model(): pass\n")
    (root / "candidates" / "a..b.py").write_text(variant(GRAD_CLIP=0.5))
    same = tmp_path / "same.py"
    same.write_text(variant(GRAD_CLIP=0.7))
    threads = [threading.Thread(target=scheduler, args=(root, "submit", str(same), "--agent", "twenty", "-m", "same"))
               for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    done = scheduler(root, "launch", "--pretend-gpus", "3", "--device", "cpu", "--budget", "2", "--no-dashboard",
                     "--exit-when-idle", "--promotion", "greedy", "--startup-allowance", "20")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = results.read_trials(root / "results")
    first = rows[rows["kind"] == "candidate"]
    status = {ids[c]: s for c, s in zip(first["candidate_id"], first["status"]) if c in ids}
    reason = {ids[c]: r for c, r in zip(first["candidate_id"], first["reason"]) if c in ids}
    assert status["build_raises"] == "crash" and "no model today" in reason["build_raises"]
    assert status["loop_before"] == status["loop_inside"] == status["ignores_sigterm"] == "timeout"
    assert status["leaves_children"] == "ok"
    assert subprocess.run(["pgrep", "-f", f"sleep {SLEEPER}"], capture_output=True).stdout == b""
    assert status["floods_output"] == "ok"
    flood_log = next((root / "results" / "runs").glob("*/log.txt"), None)
    logs = {p.parent.name: p.stat().st_size for p in (root / "results" / "runs").glob("*/log.txt")}
    assert flood_log is not None and max(logs.values()) < LOG_HEAD_BYTES + 100_000
    assert status["wrong_shape"] == "eval_failed" and "expected logits" in reason["wrong_shape"]
    assert status["prints_env"] == "ok"
    env_trial = next(c for c in ids if ids[c] == "prints_env")
    env_line = next(l for l in (root / "results" / "runs" / f"{env_trial}-r1" / "log.txt").read_text().splitlines()
                    if l.startswith("ENV "))
    assert "val.bin" not in env_line and "test.bin" not in env_line and "train.bin" in env_line

    rejected = " ".join(first[first["status"] == "rejected"]["reason"])
    assert "over the size limit" in rejected and "unsafe file name 'a..b.py'" in rejected
    twenty = first[first["agent"] == "twenty"]
    assert len(twenty) == 20 and (twenty["status"] == "ok").sum() == 1
    assert (twenty["status"] == "rejected").sum() == 19 and twenty["duplicate_of"].notna().sum() == 19
    assert first["candidate_id"].is_unique
    # Nothing the scheduler wrote is world-writable.
    for path in (root / "results").rglob("*"):
        assert not path.stat().st_mode & 0o002, path
