"""What grows with the number of GPUs: the driver-side costs per trial, measured on the CPU.

    python bench/scale.py [--quick]

At 512 GPUs and 300 s trials, launch starts and finishes 1.7 trials a second,
and each one costs, all on the head node, one after another:

- the selection actor's `record` of its row (it rewrites results/selection.json,
  which holds every candidate so far), timed with N candidates in the state;
- writing the row (a Parquet file and its JSON copy) and, for the commands,
  reading every row back (`results.read_rows`, the JSON index), with N rows;
- intake's scan of N files dropped at once into candidates/;
- queue.take with N entries queued (it lists results/queue/ on every take);
- Ray Tune starting and finishing trials: trivial function trials on 16
  pretend GPUs, reusing actors as launch does, trials a second.

Prints one markdown table; docs/design.md ("At 64 or 512 GPUs") reads it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scheduler import intake, queue, results  # noqa: E402
from scheduler.layout import Layout  # noqa: E402
from scheduler.selection import Candidate, Selection  # noqa: E402

BASELINE = ROOT / "train.py"
SOURCE = "def build_model():\n    return None\n# variant {i}\n"


def per_call(action, calls: int) -> float:
    """Seconds per call of action(i), i in range(calls)."""
    started = time.perf_counter()
    for i in range(calls):
        action(i)
    return (time.perf_counter() - started) / calls


def row(i: int, kind: str, baseline: str, bpc: float) -> dict:
    return {"trial_id": f"t{i}-r1", "candidate_id": f"t{i}", "kind": kind, "status": "ok", "val_bpc": bpc,
            "gpu_name": "gpu", "baseline": baseline, "agent": "a", "description": "d", "source_sha256": "",
            "parent": baseline, "node": "host/abcdef12", "gpu_id": "0", "started_at": results.now(),
            "finished_at": results.now()}


def selection_record(work: Path, candidates: int) -> float:
    """Seconds per `record` of a first run that is rejected, with `candidates` decided ones in the state."""
    layout = Layout.at(work)
    layout.make()
    shutil.copy(BASELINE, layout.baseline)
    selection = Selection(str(work))
    base = selection.sync_baseline()["baseline"]
    for i in range(5):
        selection.record(row(10**9 + i, "control", base, 2.0 + i / 1000) | {"candidate_id": base})
    for i in range(candidates):
        selection.state.candidates[f"old{i}"] = Candidate(scores={"gpu": [3.0]}, runs=1, done=True, agent="a",
                                                          description="an old candidate", verdict="rejected")
    return per_call(lambda i: selection.record(row(i, "candidate", base, 3.0)), 20)


def rows_written_and_read(work: Path, n: int) -> tuple[float, float]:
    write = per_call(lambda i: results.write_row(work, row(i, "candidate", "base-x", 2.0)), n)
    started = time.perf_counter()
    assert len(results.read_rows(work)) == n
    return write, time.perf_counter() - started


def intake_scan(work: Path, n: int) -> float:
    layout = Layout.at(work)
    layout.make()
    for i in range(n):
        (layout.candidates / f"v{i}.py").write_text(SOURCE.format(i=i))
    started = time.perf_counter()
    intake.scan(layout, "base-x")
    assert len(queue.pending(layout)) == n
    return time.perf_counter() - started


def queue_take(work: Path, n: int) -> float:
    layout = Layout.at(work)
    layout.make()
    for i in range(n):
        queue.push(layout, queue.Entry(trial_id=f"t{i}", candidate_id=f"t{i}", kind="candidate",
                                       source_sha256=""))
    return per_call(lambda i: queue.take(layout), 20)


def tune_rate(trials: int, gpus: int = 16) -> float:
    """Trials a second Tune starts and finishes on `gpus` pretend GPUs: function trials that report once."""
    import ray
    from ray import tune

    def trivial(config: dict) -> None:
        tune.report({"done_at": time.time()})

    ray.init(num_gpus=gpus, num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        storage = Path(tempfile.mkdtemp(prefix="tune-rate-"))
        tuner = tune.Tuner(tune.with_resources(trivial, {"cpu": 0, "gpu": 1}),
                           tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=gpus,
                                                       reuse_actors=True),
                           run_config=tune.RunConfig(storage_path=str(storage), verbose=0))
        started = time.perf_counter()
        tuner.fit()
        seconds = time.perf_counter() - started
        shutil.rmtree(storage, ignore_errors=True)
        return trials / seconds
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smaller sizes only")
    parser.add_argument("--only-tune", action="store_true", help="Ray Tune's rate only")
    args = parser.parse_args()
    sizes = (100, 1000) if args.quick else (100, 1000, 10000)
    print("| figure | measured |\n| --- | --- |", flush=True)
    show = lambda line: print(line, flush=True)  # noqa: E731  each figure as it is measured
    if args.only_tune:
        sizes = ()
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            show(f"| selection actor: record() of one row, {n} candidates in its state | "
                 f"{1000 * selection_record(Path(tmp), n):.1f} ms |")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            write, read = rows_written_and_read(Path(tmp), n)
            show(f"| a row written (Parquet + JSON), {n} rows so far | {1000 * write:.1f} ms |")
            show(f"| every row read back (read_rows), {n} rows | {1000 * read:.0f} ms |")
    for n in sizes[:2] + (3000,) if len(sizes) > 2 else sizes:  # grows faster than n (queue.push lists the
        with tempfile.TemporaryDirectory() as tmp:                  # queue): 10000 files ran past 6 minutes
            show(f"| intake: scan of {n} files dropped at once | {intake_scan(Path(tmp), n):.2f} s |")
        with tempfile.TemporaryDirectory() as tmp:
            show(f"| queue.take with {n} entries queued | {1000 * queue_take(Path(tmp), n):.1f} ms |")
    show(f"| Ray Tune: trivial trials started and finished, 16 pretend GPUs | {tune_rate(200):.1f} /s |")

if __name__ == "__main__":
    main()
