"""What is happening now: the snapshot `status` prints and the live view `status --watch` redraws.

    python -m scheduler status            # once
    python -m scheduler status --watch    # redrawn in place every 2 s until Ctrl-C

Everything comes from files under results/ (the launch's heartbeat, the queue,
the files waiting in candidates/, the live progress the Tune callback writes, the
selection's state, the lineage), so it works from any shell, and needs no Ray.
It says whether a launch is running; when none is, nothing is shown as running:
trials a dead launch left behind are shown as interrupted.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

from scheduler import control, intake, presence, queue, results
from scheduler.layout import Layout, baseline_id, sha256_bytes
from scheduler.selection import saved_rule

BAR_WIDTH = 20        # characters of a trial's progress bar
SHOWN_QUEUED = 8      # queue entries listed by the live view (the count covers all)
SHOWN_PROMOTIONS = 3  # the most recent promotions listed by the live view
# Terminal control: the live view uses the alternate screen (it leaves the shell's scrollback alone),
# moves the cursor home and overwrites each line (clearing its rest) instead of clearing the screen, which
# is what makes a redraw flicker.
ENTER, LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
HOME, CLEAR_LINE_END, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"


def current_baseline(layout: Layout) -> str:
    """The baseline id the selection actor holds, else that of train.py as it is."""
    state = json.loads(layout.selection_state.read_text()) if layout.selection_state.exists() else {}
    if state.get("baseline_sha"):
        return baseline_id(state["baseline_sha"])
    return baseline_id(sha256_bytes(layout.baseline.read_bytes())) if layout.baseline.exists() else baseline_id(None)


def progress_line(live: dict) -> str:
    """One line about a running trial from its live progress file."""
    if "step" not in live:
        return live.get("phase", "starting")
    return (f"{live.get('phase', 'train')} step {live['step']} loss {live.get('loss', float('nan')):.4f} "
            f"{100 * live.get('progress', 0):.0f}% {live.get('tok_s', 0):,} tok/s")


def baseline_scores(state_path: Path) -> dict[str, dict]:
    """The baseline's val bpc per GPU type (mean, sigma, n), as the selection actor last saved them in
    results/selection.json; empty before its first control run. `baseline`, `status` and `report` all show
    these figures."""
    rule = saved_rule(state_path)
    if rule is None:
        return {}
    return {g: {"mean": sum(s) / len(s), "sigma": rule.sigma(g), "n": len(s)}
            for g in rule.gpus() for s in [rule.baseline_scores(g)]}


def headline_score(scores: dict[str, dict]) -> tuple[str, dict] | None:
    """The one baseline figure a title has room for: that of the GPU type with the most scores."""
    return max(scores.items(), key=lambda item: item[1]["n"], default=None)


def scores_text(scores: dict[str, dict]) -> str:
    return "; ".join(f"val bpc {s['mean']:.4f} ± {s['sigma']:.4f} (n={s['n']}, {g})"
                     for g, s in scores.items()) or "not scored yet"


def launch_text(launch: dict) -> str:
    """One line on the root's launch, from presence.read(): running or not, and what to do when not."""
    state = launch["state"]
    if state == presence.RUNNING:
        gpus = f", {launch['gpus']} {'pretend ' if launch.get('pretend') else ''}GPU(s)" if "gpus" in launch else ""
        return (f"launch running ({presence.holder_text(launch)}{gpus}; heartbeat {launch['beat_age']:.0f} s ago)")
    if state == presence.STOPPED:
        return (f"no launch running: the last one stopped at {presence.when(launch['stopped'])}; start one with "
                f"`python -m scheduler launch`")
    if state == presence.GONE:
        return (f"no launch running: the last one ({presence.holder_text(launch)}) died without stopping (killed?); "
                f"start one with `python -m scheduler launch`: it runs its interrupted trials again")
    return "no launch has run here yet: start one with `python -m scheduler launch`"


def snapshot(layout: Layout) -> dict:
    """The launch (alive or not), queue, running trials (GPU, elapsed time, progress, loss), baseline, draining,
    last promotions. Queue entries a dead launch left marked running are `interrupted`, not running: the next
    launch runs them again. Files submitted but not yet taken in count as queued (`submitted`)."""
    launch = presence.read(layout)
    alive = launch["state"] == presence.RUNNING
    running, interrupted = [], []
    for entry in queue.running(layout):
        path = layout.live_file(entry.trial_id)
        live = json.loads(path.read_text()) if alive and path.exists() else {}
        trial = {"trial_id": entry.trial_id, "candidate_id": entry.candidate_id, "agent": entry.agent,
                 "kind": entry.kind, "description": entry.description}
        if not alive:
            interrupted.append(trial)
            continue
        running.append({**trial, "gpu": live.get("gpu"),
                        "elapsed": round(time.time() - live["started"], 1) if "started" in live else None,
                        "progress": progress_line(live) if live else "starting",
                        **{k: live.get(k) for k in ("loss", "step", "phase", "tok_s")},
                        "fraction": live.get("progress")})
    promotions = [p for p in results.lineage_rows(layout.results) if p["kind"] == "promotion"][-SHOWN_PROMOTIONS:]
    queued = [{"trial_id": e.trial_id, "candidate_id": e.candidate_id, "agent": e.agent, "kind": e.kind,
               "description": e.description} for e in queue.pending(layout)]
    submitted = [{"trial_id": None, "candidate_id": w["candidate_id"], "agent": w["agent"], "kind": "candidate",
                  "description": w["description"], "file": w["file"]} for w in intake.submitted(layout)]
    return {"launch": launch, "baseline": current_baseline(layout),
            "baseline_scores": baseline_scores(layout.selection_state),
            "queued": queued + submitted, "submitted": len(submitted),
            "running": sorted(running, key=lambda r: r["gpu"] or ""), "interrupted": interrupted,
            "draining": alive and control.drain_requested(layout),
            "promotions": [{"at": p["promoted_at"][11:16], "candidate_id": p["candidate_id"], "agent": p["agent"],
                            "gain": p["gain"], "description": p["description"]} for p in promotions]}


def queued_line(q: dict) -> str:
    if q["trial_id"] is None:
        return f"{q['candidate_id'] or q['file']} (submitted, not yet taken in; {q['agent'] or '-'}) {q['description']}"
    return f"{q['trial_id']} ({q['kind']}, {q['agent'] or '-'}) {q['description']}"


def summary_lines(state: dict) -> list[str]:
    """The head of `status` and of the live view: the launch, the baseline and its score, the counts."""
    queued = len(state["queued"])
    counts = (f"{queued} queued"
              + (f" ({state['submitted']} submitted, not yet taken in)" if state["submitted"] else "")
              + f", {len(state['running'])} running"
              + (" (draining: no new trials start)" if state["draining"] else ""))
    if state["interrupted"]:
        counts += f", {len(state['interrupted'])} interrupted (run again when a launch starts)"
    return [launch_text(state["launch"]), f"baseline {state['baseline']}: {scores_text(state['baseline_scores'])}",
            counts]


def _bar(fraction: float | None) -> str:
    done = round(BAR_WIDTH * min(max(fraction or 0.0, 0.0), 1.0))
    return "[" + "#" * done + "." * (BAR_WIDTH - done) + "]"


def render(state: dict, width: int, height: int) -> list[str]:
    """The live view as at most `height` lines of at most `width` characters, so a redraw never scrolls."""
    head = summary_lines(state)
    lines = [*head[:-1], head[-1] + f"   {time.strftime('%H:%M:%S')}", ""]
    for r in state["running"]:
        loss = f"loss {r['loss']:.4f}" if r.get("loss") is not None else (r.get("phase") or "starting")
        lines.append(f"GPU {r['gpu'] or '?':>3} {_bar(r['fraction'])} {loss:<12} {r['elapsed'] or 0:5.0f}s  "
                     f"{r['trial_id']} ({r['kind']}, {r['agent'] or '-'}) {r['description']}")
    lines += [f"  interrupted {t['trial_id']} ({t['kind']}, {t['agent'] or '-'}) {t['description']}"
              for t in state["interrupted"]]
    if state["queued"]:
        lines += ["", "queued:"] + [f"  {queued_line(q)}" for q in state["queued"][:SHOWN_QUEUED]]
        if len(state["queued"]) > SHOWN_QUEUED:
            lines.append(f"  ... and {len(state['queued']) - SHOWN_QUEUED} more")
    if state["promotions"]:
        lines += ["", "last promotions:"] + [f"  {p['at']} {p['candidate_id']} ({p['agent']}) gain {p['gain']:.4f}: "
                                             f"{p['description']}" for p in state["promotions"]]
    lines = [line.replace("\n", " ")[:width] for line in lines]
    if len(lines) > height:
        lines = lines[: height - 1] + [f"... {len(lines) - height + 1} more lines: make the terminal taller"[:width]]
    return lines


def watch(layout: Layout, interval: float = 2.0, out: TextIO = sys.stdout, frames: int | None = None) -> None:
    """Redraw the view in place until Ctrl-C (or `frames` redraws): one write per frame, no clearing."""
    out.write(ENTER)
    try:
        drawn = 0
        while frames is None or drawn < frames:
            size = shutil.get_terminal_size()
            lines = render(snapshot(layout), size.columns, size.lines)
            out.write(HOME + "".join(line + CLEAR_LINE_END + "\r\n" for line in lines[:-1])
                      + lines[-1] + CLEAR_LINE_END + CLEAR_BELOW)
            out.flush()
            drawn += 1
            if frames is None or drawn < frames:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        out.write(LEAVE)
        out.flush()
