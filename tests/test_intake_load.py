"""Intake under load and damaged results: every file exactly once, nothing lost, damaged files named."""

from __future__ import annotations

import multiprocessing
import re
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest

from scheduler import intake, queue, results
from scheduler.layout import Layout

from agent import submit_many
from conftest import make_root, scheduler, wait_for

SOURCE = "def build_model():\n    return None\n# {agent} {i}\n"
AGENTS, EACH = 8, 25
DISTINCT = 4  # sources that pass intake in the load test; every other copy of them is a duplicate
# Passes intake and needs no torch: its trial is a process that fails at once, so a run costs almost nothing.
QUICK = 'import sys\n\n\ndef build_model():\n    return None\n\n\nif __name__ == "__main__":\n    sys.exit("{what}: not trained")\n'
TOKEN = Path.home() / ".ray" / "auth_token"


def agent_args(root: Path, sources_of) -> list[tuple]:
    """submit_many's arguments for each of AGENTS processes: agent `a` submits `sources_of(a)`."""
    return [(str(root), f"agent{a}", sources_of(a)) for a in range(AGENTS)]


def test_eight_agents_submitting_while_intake_scans(tmp_path):
    layout = Layout.at(tmp_path)
    layout.make()
    with multiprocessing.get_context("spawn").Pool(AGENTS) as pool:
        pending = pool.starmap_async(submit_many, agent_args(tmp_path, lambda a: [SOURCE.format(agent=a, i=i)
                                                                              for i in range(EACH)]))
        while not pending.ready():
            intake.scan(layout, "base-x")  # scanning while files arrive
        submitted = [i for ids in pending.get() for i in ids]
    intake.scan(layout, "base-x")
    queued = [e.candidate_id for e in queue.pending(layout)]
    assert len(submitted) == 200 and len(set(submitted)) == 200
    assert sorted(queued) == sorted(submitted)  # each exactly once, none rejected, none lost
    assert not intake.waiting(layout)


def test_two_submissions_that_draw_the_same_id_both_arrive(tmp_path, monkeypatch):
    """Ids are the second plus 24 random bits: two agents submitting in the same second can draw the same one
    (it happened once in the 200-file load test below). The second submission must draw again, not overwrite."""
    layout = Layout.at(tmp_path)
    layout.make()
    drawn = iter(["20261201-120000-aaaaaa", "20261201-120000-aaaaaa", "20261201-120000-bbbbbb"])
    monkeypatch.setattr(intake, "new_candidate_id", lambda: next(drawn))
    sources = []
    for i in range(2):
        sources.append(tmp_path / f"mine{i}.py")
        sources[-1].write_text(SOURCE.format(agent="a", i=i))
    ids = [intake.submit(layout, source, "agent-a", f"idea {i}", parent="") for i, source in enumerate(sources)]
    assert ids == ["20261201-120000-aaaaaa", "20261201-120000-bbbbbb"]
    intake.scan(layout, "base-x")
    queued = {e.candidate_id: e.description for e in queue.pending(layout)}
    assert queued == {ids[0]: "idea 0", ids[1]: "idea 1"}


def test_odd_files_each_get_a_rejected_row_and_nothing_else_is_touched(tmp_path):
    """What launch's searcher runs on every scan, given files no agent should send."""
    layout = Layout.at(tmp_path)
    layout.make()
    outside = tmp_path / "elsewhere.py"
    outside.write_text(SOURCE.format(agent="outside", i=0))
    (layout.candidates / "binary.py").write_bytes(b"\0" * 64 + b"def build_model():\n    return None\n")
    (layout.candidates / "latin1.py").write_bytes(b"# caf\xe9\ndef build_model():\n    return None\n")
    (layout.candidates / "link.py").symlink_to(outside)
    (layout.candidates / "two\nlines.py").write_text(SOURCE.format(agent="newline", i=0))
    (layout.candidates / "folder.py").mkdir()
    (layout.candidates / "coroutine.py").write_text("async def build_model():\n    return None\n")
    handled = intake.scan(layout, "base-x")
    rows = results.read_trials(layout.results)
    assert sorted(rows["trial_id"]) == sorted(handled) and set(rows["status"]) == {"rejected"}
    reasons = sorted(rows["reason"])
    assert reasons == ["'binary.py' contains NUL bytes: binary, not Python source",
                       "'coroutine.py' no module-level build_model() function: the model it returns is what the "
                       "harness hands over",
                       "'folder.py' is a folder, not a file",
                       "'latin1.py' not UTF-8 text (byte 5); a train.py variant is Python source",
                       "'link.py' is a symbolic link; submit the file itself",
                       "'two\\nlines.py' unsafe file name 'two\\nlines.py': use letters, digits, '.', '_' and '-'"]
    assert not list(layout.candidates.iterdir()) and not queue.pending(layout)
    assert outside.read_text() == SOURCE.format(agent="outside", i=0)  # the link is kept, not what it points to
    assert len(list(layout.rejected.iterdir())) == 6


def load_sources(agent: int) -> list[str]:
    """An agent's 25 files: every fifth does not parse, the others are copies of the DISTINCT quick sources."""
    return [f"def broken_{agent}_{i}(:\n" if i % 5 == 4 else QUICK.format(what=f"variant {i % DISTINCT}")
            for i in range(EACH)]


def dashboard_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(f"{url}/api/version",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.slow
def test_eight_agents_submitting_while_launch_runs(tmp_path, corpus, background_launch):
    """8 processes submit 25 files each as fast as they can while launch runs: 200 rows, each exactly once,
    and no file's content runs twice.

    Shaped to stay cheap on a 2-core CI box, where a real trial (Python, torch, training, evaluation) costs
    about 20 s: the 200 files are 160 copies of 4 sources that pass intake but need no torch (their trials
    fail at once) and 40 files that do not parse. So 4 trials run, and the other 196 files get rejected rows,
    156 of them naming the run of the same content (`duplicate_of`). The baseline is such a source too (its
    control runs fail; the selection stops rerunning it after two). Launch runs without --exit-when-idle,
    which could end it between two submissions, and is drained with `stop` once every file has its row.

    The same launch also runs as a careless user might: umask 000 (nothing it writes may be world-writable)
    and the dashboard on (it must answer only with Ray's token).
    """
    root = make_root(tmp_path, corpus)
    (root / "train.py").write_text(QUICK.format(what="baseline"))
    layout = Layout.at(root)
    launch = background_launch(root, "--pretend-gpus", "2", "--device", "cpu", "--budget", "2", umask=0)
    wait_for(lambda: len(results.read_trials(layout.results)), 120,
             "launch to run the baseline")

    url = "http://" + re.search(r"dashboard: http://(\S+)", launch.stderr()).group(1)
    assert url.startswith("http://127.0.0.1:") and "cat ~/.ray/auth_token" in launch.stderr()
    assert dashboard_status(url, None) == 401
    assert dashboard_status(url, TOKEN.read_text().strip()) == 200

    with multiprocessing.get_context("spawn").Pool(AGENTS) as pool:
        submitted = [i for ids in pool.starmap(submit_many, agent_args(root, load_sources)) for i in ids]

    def every_file_recorded() -> bool:  # a rejected file's row is named by its id, a run's by its trial id
        return all(results.has_row(layout.results, cid) or results.has_row(layout.results, f"{cid}-r1")
                   for cid in submitted)

    wait_for(every_file_recorded, 180, "a row for every file")
    assert scheduler(root, "stop").returncode == 0
    assert launch.wait(120) == 0, launch.stderr()[-3000:]

    rows = results.read_trials(layout.results)
    first = rows[rows["kind"] == "candidate"]
    assert len(submitted) == len(set(submitted)) == AGENTS * EACH
    assert sorted(first["candidate_id"]) == sorted(submitted)  # each file exactly one row
    ran = first[first["status"] != "rejected"]
    assert len(ran) == DISTINCT and ran["source_sha256"].is_unique and set(ran["status"]) == {"crash"}
    run_of = dict(zip(ran["source_sha256"], ran["candidate_id"]))
    copies = first[first["duplicate_of"].notna()]
    assert len(copies) == AGENTS * EACH * 4 // 5 - DISTINCT
    assert all(run_of[sha] == of for sha, of in zip(copies["source_sha256"], copies["duplicate_of"]))
    assert first["reason"].str.contains("does not parse").sum() == AGENTS * EACH // 5
    runs = {folder.name for folder in layout.runs.iterdir()}
    assert runs == set(rows[rows["status"] != "rejected"]["trial_id"])  # a working folder per run, none twice
    for path in layout.results.rglob("*"):
        assert not path.stat().st_mode & 0o002, path


def test_a_damaged_result_file_is_skipped_and_named(tmp_path):
    results.write_row(tmp_path, {"trial_id": "good", "status": "ok", "val_bpc": 1.0, "finished_at": results.now()})
    (tmp_path / "trials" / "truncated.parquet").write_bytes(
        (tmp_path / "trials" / "good.parquet").read_bytes()[:100])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = results.read_trials(tmp_path)
    assert list(frame["trial_id"]) == ["good"]
    assert any("truncated.parquet" in str(w.message) for w in caught)


def test_a_failed_result_write_is_kept_and_retried(tmp_path, monkeypatch):
    from scheduler import record

    callback = record.RecordResults(str(tmp_path), str(tmp_path / "data"))
    layout = Layout.at(tmp_path)
    row = {"trial_id": "t1", "status": "ok", "val_bpc": 1.0}
    real_write = results.write_row

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results, "write_row", full_disk)
    callback.unwritten.append(row)
    callback._write_rows(layout)
    assert callback.unwritten == [row] and not results.has_row(tmp_path / "results", "t1")
    monkeypatch.setattr(results, "write_row", real_write)
    callback._write_rows(layout)
    assert callback.unwritten == [] and results.has_row(tmp_path / "results", "t1")


@pytest.mark.parametrize("refused", ["reject", "queue"])
def test_a_refused_intake_write_leaves_the_file_for_the_next_scan(tmp_path, monkeypatch, refused):
    """Disk full while intake records a rejection or queues a candidate: the file and its metadata go back
    into candidates/, nothing is half-recorded, and the next scan takes it in under the same id."""
    layout = Layout.at(tmp_path)
    layout.make()
    source = tmp_path / "mine.py"
    source.write_text("def nothing():\n    pass\n" if refused == "reject" else SOURCE.format(agent="a", i=0))
    cid = intake.submit(layout, source, "agent-a", "an idea", parent="")
    target = (results, "write_row") if refused == "reject" else (queue, "push")
    real = getattr(*target)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(*target, full_disk)
    assert intake.scan(layout, "base-x") == []
    assert intake.waiting(layout) and not list(layout.rejected.iterdir())
    assert not queue.pending(layout) and not results.read_trials(layout.results).shape[0]
    monkeypatch.setattr(*target, real)
    assert intake.scan(layout, "base-x") == [cid]
    if refused == "reject":
        [row] = results.read_trials(layout.results).to_dict(orient="records")
        assert (row["candidate_id"], row["status"], row["agent"]) == (cid, "rejected", "agent-a")
    else:
        [entry] = queue.pending(layout)
        assert (entry.candidate_id, entry.agent, entry.description) == (cid, "agent-a", "an idea")
