"""What is happening now: the snapshot `status` prints and the live view `status --watch` redraws.

    python -m scheduler status            # once
    python -m scheduler status --watch    # redrawn in place every 2 s until Ctrl-C

Everything comes from files under results/ (the queue, the live progress the
Tune callback writes, the selection's state, the promotion rows), so it works
from any shell while launch runs, and needs no Ray.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from typing import TextIO

from scheduler import control, queue, results
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


def baseline_scores(layout: Layout) -> dict[str, dict]:
    """The baseline's val bpc per GPU type: mean, sigma, n (empty before its first control run)."""
    rule = saved_rule(layout.selection_state)
    if rule is None:
        return {}
    return {g: {"mean": sum(s) / len(s), "sigma": rule.sigma(g), "n": len(s)}
            for g in rule.gpus() for s in [rule.baseline_scores(g)]}


def snapshot(layout: Layout) -> dict:
    """Queue, running trials (GPU, elapsed time, progress, loss), baseline, draining, last promotions."""
    running = []
    for entry in queue.running(layout):
        path = layout.live / f"{entry.trial_id}.json"
        live = json.loads(path.read_text()) if path.exists() else {}
        running.append({"trial_id": entry.trial_id, "candidate_id": entry.candidate_id, "agent": entry.agent,
                        "kind": entry.kind, "description": entry.description, "gpu": live.get("gpu"),
                        "elapsed": round(time.time() - live["started"], 1) if "started" in live else None,
                        "progress": progress_line(live) if live else "starting",
                        **{k: live.get(k) for k in ("loss", "step", "phase", "tok_s")},
                        "fraction": live.get("progress")})
    promotions = results.read_promotions(layout.results).tail(SHOWN_PROMOTIONS)
    return {"baseline": current_baseline(layout), "baseline_scores": baseline_scores(layout),
            "queued": [{"trial_id": e.trial_id, "candidate_id": e.candidate_id, "agent": e.agent, "kind": e.kind,
                        "description": e.description} for e in queue.pending(layout)],
            "running": sorted(running, key=lambda r: r["gpu"] or ""),
            "draining": control.drain_requested(layout),
            "promotions": [{"at": p.promoted_at.strftime("%H:%M"), "candidate_id": p.candidate_id, "agent": p.agent,
                            "gain": p.gain, "description": p.description} for p in promotions.itertuples()]}


def _bar(fraction: float | None) -> str:
    done = round(BAR_WIDTH * min(max(fraction or 0.0, 0.0), 1.0))
    return "[" + "#" * done + "." * (BAR_WIDTH - done) + "]"


def render(state: dict, width: int, height: int) -> list[str]:
    """The live view as at most `height` lines of at most `width` characters, so a redraw never scrolls."""
    scores = "; ".join(f"{g}: {s['mean']:.4f} ± {s['sigma']:.4f} (n={s['n']})"
                       for g, s in state["baseline_scores"].items()) or "not scored yet"
    lines = [f"baseline {state['baseline']}: {scores}",
             f"{len(state['running'])} running, {len(state['queued'])} queued"
             + (" (draining: no new trials)" if state["draining"] else "") + f"   {time.strftime('%H:%M:%S')}", ""]
    for r in state["running"]:
        loss = f"loss {r['loss']:.4f}" if r.get("loss") is not None else (r.get("phase") or "starting")
        lines.append(f"GPU {r['gpu'] or '?':>3} {_bar(r['fraction'])} {loss:<12} {r['elapsed'] or 0:5.0f}s  "
                     f"{r['trial_id']} ({r['kind']}, {r['agent'] or '-'}) {r['description']}")
    if state["queued"]:
        lines += ["", "queued:"] + [f"  {q['trial_id']} ({q['kind']}, {q['agent'] or '-'}) {q['description']}"
                                    for q in state["queued"][:SHOWN_QUEUED]]
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
