"""The Tune callbacks that record what trials do: live progress (ShowLive), the Parquet row and the selection's
verdict (RecordResults).

ShowLive
on_trial_start,
on_trial_result    writes results/live/<trial>.json (what `status` and `wait` show)

RecordResults
on_trial_complete  sends the row to the selection actor (which may queue reruns
                   or promote), then writes the row and clears the queue entry
on_trial_error     the trial's worker died or the trainable raised: what is
                   left of its candidate is killed, it gets an `interrupted`
                   row, and it is queued again once (see `interrupted`); a
                   trial whose function never began is queued again as it was
                   (see `_never_began`)

A row that cannot be written (disk full, say) is kept and retried at the next
event; it is never dropped silently.
"""

from __future__ import annotations

import json
import time

from ray.tune import Callback

from scheduler import queue, results
from scheduler.atomic import atomic_write
from scheduler.console import say
from scheduler.layout import Layout
from scheduler.selection import ACTOR_NAME

WORKER_DIED = "The actor died unexpectedly"  # how Ray's error starts when the process running a trial is gone
NODE_LOST = "The actor is temporarily unavailable"  # ... and when it cannot be reached: its node died or was cut off
RETRY_SUFFIX = "-a2"                         # trial id of the one retry of an interrupted trial
NEVER_BEGAN_TRIES = 8  # times a trial whose function never began is queued again as it was: a lost node leaves
                       # Tune up to its GPUs' worth of cached actors that are dead, and each fails one trial's start


def error_text(trial) -> str:
    """One line on why Tune gave up on a trial: its worker died, or the last line of what the trainable raised."""
    try:
        with open(trial.error_file) as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, TypeError, AttributeError):
        return "the Ray worker running it failed (Tune kept no error text)"
    if any(line.startswith(WORKER_DIED) for line in lines):
        return "the Ray worker process running it died (killed, out of memory, or crashed)"
    if any(NODE_LOST in line for line in lines):
        return "the Ray worker running it could not be reached: its node died, or the network to it failed"
    return f"the Ray worker running it failed: {lines[-1][:300]}" if lines else "the Ray worker running it failed"


def write_live(layout: Layout, trial_id: str, data: dict) -> None:
    layout.live.mkdir(parents=True, exist_ok=True)
    # rewritten at every progress report, and only shown: not worth a flush to the disk each time
    atomic_write(layout.live_file(trial_id), json.dumps(data), fsync=False)


def where_it_ran(layout: Layout, trial_id: str) -> dict:
    """Where and since when a trial ran, as its live file says (the node it reported, its GPU, its start):
    an interrupted trial's row and its bar in the timeline name the node that was lost."""
    try:
        live = json.loads(layout.live_file(trial_id).read_text())
    except (OSError, ValueError):
        return {}
    where = {"node": live.get("node"), "gpu_id": live.get("gpu"), "started_at": results.from_unix(live.get("started"))}
    return {key: value for key, value in where.items() if value is not None}


class ShowLive(Callback):
    """A running trial's live file: who it is, its phase, its latest progress (RecordResults removes it)."""

    def __init__(self, root: str, data_dir: str) -> None:
        self.root, self.data_dir = root, data_dir

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        c = trial.config
        write_live(Layout.at(self.root, self.data_dir), c["trial_id"],
                   {"trial_id": c["trial_id"], "candidate_id": c["candidate_id"], "kind": c["kind"],
                    "agent": c["agent"], "phase": "starting", "started": time.time()})
        say(f"start {c['trial_id']} ({c['kind']}, agent {c['agent'] or '-'})")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("phase") in ("starting", "train", "eval"):
            layout = Layout.at(self.root, self.data_dir)
            path = layout.live_file(trial.config["trial_id"])
            live = json.loads(path.read_text()) if path.exists() else {}
            keep = ("step", "loss", "tok_s", "mfu", "progress", "training_seconds", "phase", "elapsed", "gpu",
                    "node")
            live.update({k: result[k] for k in keep if k in result})
            write_live(layout, trial.config["trial_id"], live)


class RecordResults(Callback):
    def __init__(self, root: str, data_dir: str) -> None:
        self.root, self.data_dir = root, data_dir
        self.unwritten: list[dict] = []
        self.never_began: dict[str, int] = {}  # trial id -> times it was queued again without having begun

    def _layout(self) -> Layout:
        return Layout.at(self.root, self.data_dir)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        # Only the trial's own last report carries a row (its progress reports pass on the harness's numbers only)
        if trial.last_result.get("phase") != "done" or "result_row" not in trial.last_result:  # stopped (stop --now)
            self.interrupted(trial.config, "stopped by the user before it finished")
            return
        row = json.loads(trial.last_result["result_row"])
        for key in ("started_at", "finished_at", "submitted_at"):
            row[key] = results.from_unix(row.get(key))
        row["submitted_at"] = results.from_unix(trial.config.get("submitted_at"))
        self._finish(row)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        if "phase" not in trial.last_result and self._never_began(trial.config, error_text(trial)):
            return
        self.interrupted(trial.config, error_text(trial))

    def _never_began(self, config: dict, reason: str) -> bool:
        """A trial that failed before its function reported anything (every report has a phase, the first one
        as it begins) ran nothing of its candidate: Tune handed it a worker that was gone, kept for reuse from
        a trial on a node since lost. It is queued again as it was, ahead of new candidates, with no row; after
        NEVER_BEGAN_TRIES times it is handled as interrupted. False when it is not queued again."""
        trial_id = config["trial_id"]
        tries = self.never_began.get(trial_id, 0)
        if tries >= NEVER_BEGAN_TRIES:
            return False
        self.never_began[trial_id] = tries + 1
        layout = self._layout()
        queue.finish(layout, trial_id)
        queue.push(layout, queue.Entry(**{k: config[k] for k in queue.Entry.__dataclass_fields__ if k in config}),
                   priority=queue.URGENT)
        layout.live_file(trial_id).unlink(missing_ok=True)
        say(f"{trial_id} did not begin ({reason}): queued again")
        return True

    def interrupted(self, config: dict, reason: str) -> None:
        """A trial that ended without a result (its worker died, `stop --now`, or a launch killed under it).

        What is left of its candidate on this node is killed (a dead worker cannot
        kill its process group). It gets an `interrupted` row, and a first attempt
        is queued again once, ahead of new candidates; that retry is what the
        selection actor judges. A retry interrupted too is the candidate's failed
        run and is judged as one. `config` is the trial's config or its queue entry.
        """
        from scheduler.trial import kill_marked

        layout = self._layout()
        kill_marked(str(layout.runs / config["trial_id"]))
        row = {key: config.get(key) for key in results.CONFIG_COLUMNS}
        row.update(status="interrupted", reason=reason,
                   submitted_at=results.from_unix(config.get("submitted_at")), finished_at=results.now())
        row.update(where_it_ran(layout, config["trial_id"]))
        retry = config.get("attempt", 1) == 1
        self._finish(row, judge=not retry)
        if retry:
            entry = queue.Entry(**{k: config[k] for k in queue.Entry.__dataclass_fields__ if k in config})
            entry.trial_id, entry.attempt = f"{config['trial_id']}{RETRY_SUFFIX}", 2
            queue.push(layout, entry, priority=queue.URGENT)
            say(f"{config['trial_id']} interrupted: queued again once as {entry.trial_id}")

    def _finish(self, row: dict, judge: bool = True) -> None:
        """Send the row to the selection actor (unless `judge` is False), write it, clear the trial's entries."""
        import ray

        layout = self._layout()
        row["stale"] = (row["kind"] != "control" and bool(row.get("parent")) and bool(row.get("baseline"))
                        and row["parent"] != row["baseline"])
        decision = (ray.get(ray.get_actor(ACTOR_NAME).record.remote(row)) if judge
                    else {"decision": "not judged: its retry will be"})
        self.unwritten.append(row)
        self._write_rows(layout)
        queue.finish(layout, row["trial_id"])
        layout.live_file(row["trial_id"]).unlink(missing_ok=True)
        score = f"{row['val_bpc']:.4f} bpc" if row.get("val_bpc") is not None else row.get("reason", "")
        # the verdict, in the words `wait` and `results` use (pending, confirming, rejected, promoted)
        outcome = decision.get("verdict") or decision.get("decision")
        say(f"done  {row['trial_id']}: {row['status']} {score} -> {outcome}")

    def on_experiment_end(self, trials, **info) -> None:
        self._write_rows(self._layout())
        for row in self.unwritten:  # the disk still refuses: print the rows, so they are not lost
            say(f"UNWRITTEN RESULT {json.dumps(row, default=str)}")

    def _write_rows(self, layout: Layout) -> None:
        for row in list(self.unwritten):
            try:
                results.write_row(layout.results, row)
                self.unwritten.remove(row)
            except OSError as error:
                say(f"could not write the result of {row['trial_id']} ({error}); kept in memory, retrying")
