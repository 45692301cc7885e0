"""The Ray Tune Searcher that hands queued candidates to Tune as trials.

Tune asks `suggest()` several times a second. Each time (at most every
SCAN_EVERY seconds) it lets intake claim new files from candidates/, then takes
the next queue entry and returns its trial config, which carries the
candidate's source so that any node can run it (or, when its archived copy no
longer matches its sha256 name, why it is refused), and for a candidate's first
run the baseline's control curves its early stopping is judged against
(scheduler/earlystop.py). None means "ask again later";
FINISHED ends the experiment once the running trials are done: on a drain
request (`stop`, first Ctrl-C), or with --exit-when-idle when nothing is queued,
running or waiting in candidates/.

Tune pickles its searcher, so this class holds only plain values; the
selection actor is looked up by name when needed.
"""

from __future__ import annotations

import time

from ray.tune import Stopper
from ray.tune.search import Searcher

from scheduler import control, intake, queue, results
from scheduler.console import say
from scheduler.custody import SourceRefused, read_archived, source_path
from scheduler.earlystop import references
from scheduler.layout import Layout

SCAN_EVERY = 0.5  # seconds between looks at candidates/


class QueueSearcher(Searcher):
    def __init__(self, root: str, data_dir: str, settings: dict, exit_when_idle: bool) -> None:
        super().__init__()
        self.root, self.data_dir = root, data_dir
        self.settings = settings          # budget, device, omp_threads, startup_allowance, eval_timeout, early_stop
        self.exit_when_idle = exit_when_idle
        self._last_scan = 0.0
        # (baseline sha, budget, rows' version) -> (the baseline's reference curves, source sha -> GPU types it
        # scored ok on)
        self._facts: tuple[tuple, dict, dict[str, set[str]]] = ((), {}, {})

    def _layout(self) -> Layout:
        return Layout.at(self.root, self.data_dir)

    def suggest(self, trial_id: str) -> dict | None:
        layout = self._layout()
        if control.drain_requested(layout):
            return Searcher.FINISHED
        baseline = None
        if time.monotonic() - self._last_scan >= SCAN_EVERY and intake.waiting(layout):
            self._last_scan = time.monotonic()
            baseline = self._baseline()
            intake.scan(layout, baseline["baseline"])
        entry = queue.take(layout)
        if entry is None:
            if self.exit_when_idle and not queue.running(layout) and not intake.waiting(layout):
                return Searcher.FINISHED
            return None  # idle polls (several a second) cost a folder listing, no call to the actor
        baseline = baseline or self._baseline()  # one call to the actor per suggestion
        return self._config(layout, entry, baseline["baseline"], baseline["sha"], baseline.get("refuted", False))

    def _baseline(self) -> dict:
        """The selection's baseline: its id (`baseline`) and the sha256 of its source (`sha`)."""
        import ray

        from scheduler.selection import ACTOR_NAME

        info = ray.get(ray.get_actor(ACTOR_NAME).sync_baseline.remote())
        for note in info["notes"]:
            say(note)
        return info

    def _config(self, layout: Layout, entry: queue.Entry, baseline: str, baseline_sha: str | None = None,
                refuted: bool = False) -> dict:
        """The trial's config: the queue entry, the settings, and the source it runs, read from the archive and
        checked against its sha256 name. A source that fails the check is not handed over: the config carries
        `refused` (the reason, which names the file) instead of `source`, and the trial must not run anything
        but report a row with status `refused` and that reason. For a candidate's first run, when early stopping
        is on (shadow or on) and `baseline_sha` is known, the curves it is judged against (`reference_curves`);
        none in mode `on` once an audited run `refuted` them (scheduler/selection.py). For a control run or
        rerun, the GPU types its source has a row `ok` on (`exported_on`: the trial lets its harness skip the early
        export check there)."""
        config = {**vars(entry), **self.settings, "baseline": baseline, "baseline_sha256": baseline_sha,
                  "data_dir": str(layout.data), "runs_dir": str(layout.runs)}
        mode = self.settings.get("early_stop", "off")
        if entry.kind != "candidate":
            # a control run or rerun of a source already handed over on this GPU type: its early export check would
            # only repeat (a candidate's first run never is: intake turns away any source it has seen)
            config["exported_on"] = sorted(self._from_rows(layout, baseline_sha)[1].get(entry.source_sha256, ()))
        elif mode != "off" and baseline_sha and not (refuted and mode == "on"):
            # per GPU type: the trial learns its GPU's name only on its node. Only runs of the baseline's own source
            # (by its full sha256): no other candidate's curve is ever what a candidate is judged against
            config["reference_curves"] = self._from_rows(layout, baseline_sha)[0]
        try:
            config["source"] = read_archived(source_path(layout, entry.kind, entry.source_sha256)).decode("utf-8")
        except SourceRefused as refused:
            config["refused"] = str(refused)
        return config

    def _from_rows(self, layout: Layout, baseline_sha: str | None) -> tuple[dict, dict[str, set[str]]]:
        """The baseline's runs' curves per GPU type, and the GPU types each source scored `ok` on, read from the
        rows again only when a row has been written since: once a trial in a busy launch (0.6 s at 10,000 rows)."""
        key = (baseline_sha, self.settings["budget"], results.rows_version(layout.results))
        if self._facts[0] != key:
            rows = results.read_rows(layout.results)
            curves = references(rows, baseline_sha, self.settings["budget"]) if baseline_sha else {}
            scored: dict[str, set[str]] = {}
            for row in rows:
                if row.get("status") == "ok" and row.get("source_sha256"):
                    scored.setdefault(row["source_sha256"], set()).add(row.get("gpu_name") or "unknown")
            self._facts = (key, curves, scored)
        return self._facts[1], self._facts[2]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # the result callback records the trial and clears its queue entry

    # The queue on disk is the searcher's state: Tune's experiment checkpoints need nothing more.
    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass


class StopNow(Stopper):
    """Tune asks this after every result: stop everything once `stop --now` (or a second Ctrl-C) asked."""

    def __init__(self, root: str, data_dir: str) -> None:
        self.root, self.data_dir = root, data_dir

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return (Layout.at(self.root, self.data_dir).control / control.STOP_NOW).exists()
