"""python -m scheduler COMMAND: the commands people and agents run.

    prepare [--from PATH]                    get enwik8 (or your corpus) into data/
    launch --gpus all                        run every candidate, one GPU each (see launch --help)
    submit FILE --agent NAME -m "what"       queue a train.py variant; prints its candidate id
    wait ID [--timeout S]                    block until it has a result and a verdict; print them
    results [--agent A] [--status S] [--verdict V] [--top N]
    status [--watch]                         the launch, queue, running trials per GPU, baseline (--watch: live)
    show ID                                  its verdict, result rows, the end of its log
    stop [--now]                             drain (or stop trials now)
    baseline [--diff]                        the current baseline, its score ± σ, its lineage
    report [--out DIR]                       progress.png, timeline.png and summary.md

Every command but prepare runs in a project folder: the one with train.py (or
--root DIR). Every command that prints data takes --json. Exit codes: 0
success; 1 the candidate failed or was rejected (wait); 2 bad input or nothing
to act on (not a project folder, no such candidate, no launch to stop, a launch
already running); 3 timed out (wait).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from scheduler import control, intake, presence, queue, results
from scheduler.layout import Layout
from scheduler.status import baseline_scores, current_baseline, progress_line, snapshot, summary_lines, watch
from scheduler.verdict import PENDING, REJECTED, VERDICTS, describe, load_state, verdict_of

OK, FAILED, BAD_INPUT, TIMEOUT = 0, 1, 2, 3
ROW_COLUMNS = ["trial_id", "candidate_id", "kind", "agent", "status", "verdict", "val_bpc", "training_seconds",
               "tokens", "mfu_percent", "gpu_id", "description", "reason"]
ANYWHERE = ("prepare",)  # the commands that need no train.py in the root
POLL_S = 1.0  # seconds between looks while `wait` waits


def fail(message: str, code: int = BAD_INPUT) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def print_table(rows: list[dict], columns: list[str]) -> None:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value).replace("\n", " ")[:60]

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def launch_note(layout: Layout) -> str:
    """'' while a launch runs in the root and starts trials, else why a queued trial does not start."""
    if presence.read(layout)["state"] != presence.RUNNING:
        return f"; no launch is running in {layout.root}: nothing runs until one starts (`python -m scheduler launch`)"
    if control.drain_requested(layout):
        return "; the launch is draining (a stop was requested): it starts no new trials, the next launch will"
    return ""


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def cmd_prepare(args, layout: Layout) -> int:
    from scheduler.prepare import PrepareError, prepare

    try:
        meta = prepare(layout.data, source=args.source, force=args.force)
    except PrepareError as error:
        return fail(str(error))
    print(json.dumps(meta, indent=2) if args.json else f"data ready in {layout.data} ({meta.get('corpus')}, "
          f"{meta.get('size', 0):,} bytes)")
    return OK


def cmd_launch(args, layout: Layout) -> int:
    from scheduler.launch import LaunchError, LaunchOptions, launch
    from scheduler.prepare import PrepareError
    from scheduler.promotion import RuleConfig

    rule = {"policy": args.promotion, "min_delta": args.min_delta, "confirmations": args.confirmations,
            "control_every": args.control_every, "min_baseline_runs": args.min_baseline_runs,
            "prior_sigma": args.prior_sigma}
    try:
        RuleConfig(**rule)  # a bad setting is said here, before Ray starts
    except ValueError as error:
        return fail(f"promotion rule: {error}")
    opts = LaunchOptions(root=layout.root, data_dir=layout.data, gpus=args.gpus, budget=args.budget,
                         address=args.address, exit_when_idle=args.exit_when_idle, pretend_gpus=args.pretend_gpus,
                         device=args.device, dashboard=not args.no_dashboard, dashboard_host=args.dashboard_host,
                         startup_allowance=args.startup_allowance, sandbox=args.sandbox, rule=rule,
                         git_commit=args.git_commit, early_stop=args.early_stop, compile_cache=args.compile_cache)
    try:
        return launch(opts)
    except (LaunchError, PrepareError) as error:
        return fail(str(error))


def cmd_submit(args, layout: Layout) -> int:
    parent = args.parent or current_baseline(layout)
    try:
        candidate_id = intake.submit(layout, Path(args.file), args.agent, args.message, parent)
    except intake.SubmitError as error:
        return fail(str(error))
    print(json.dumps({"candidate_id": candidate_id, "parent": parent}) if args.json else candidate_id)
    return OK


def _rows_of(layout: Layout, candidate_id: str) -> list[dict]:
    return [row for row in results.read_rows(layout.results) if row["candidate_id"] == candidate_id]


def _result_line(row: dict, verdict: dict) -> str:
    """'ID: ok, val_bpc 0.7612; rejected by the selection: mean ... needed: does not screen'."""
    if verdict["by"] == "intake":
        return f"{row['candidate_id']}: {describe(verdict)}"
    outcome = (f"ok, val_bpc {row['val_bpc']:.4f}" if row["status"] == "ok"
               else f"{row['status']} ({row['reason']})")
    return f"{row['candidate_id']}: {outcome}; {describe(verdict)}"


def cmd_wait(args, layout: Layout) -> int:
    deadline = time.monotonic() + args.timeout if args.timeout else math.inf
    last_note = ""
    while True:
        # queue and folders before rows: a row is written before its entry leaves the queue, so a candidate
        # found in neither place here has its row by the time the rows are read
        entries = queue.pending(layout) + queue.running(layout)
        retrying = any(e.candidate_id == args.id for e in entries)
        known = retrying or _submitted(layout, args.id)
        rows = [r for r in _rows_of(layout, args.id) if r["kind"] == "candidate"]
        if rows and not (rows[-1]["status"] == "interrupted" and retrying):
            row = rows[-1]
            verdict = verdict_of(layout, load_state(layout), args.id, rows)
            # scored while the baseline had no score: its control run, queued first, brings the verdict
            if not (verdict["verdict"] == PENDING and any(e.kind == "control" for e in entries)):
                print(json.dumps({**row, "verdict": verdict}) if args.json else _result_line(row, verdict))
                return OK if row["status"] == "ok" and verdict["verdict"] != REJECTED else FAILED
            note = (f"scored {row['val_bpc']:.4f}; judged once the baseline's control run has scored it"
                    + launch_note(layout))
        elif not rows and not known:
            return fail(f"no candidate {args.id} in {layout.root}: `python -m scheduler results --agent NAME` "
                        f"lists your candidates' ids")
        else:
            live = sorted(layout.live.glob(f"{args.id}-*.json")) if layout.live.is_dir() else []
            note = "queued" + launch_note(layout) if not live else progress_line(json.loads(live[0].read_text()))
        if note != last_note and not args.json:
            print(f"{args.id}: {note}", file=sys.stderr)
            last_note = note
        if time.monotonic() > deadline:
            return fail(f"no result for {args.id} within {args.timeout:.0f} s; it is {note}. Run the same wait "
                        f"again to keep waiting", TIMEOUT)
        time.sleep(POLL_S)


def _submitted(layout: Layout, candidate_id: str) -> bool:
    """Is the candidate's file in candidates/, or being claimed or rejected by intake (its row not yet written)?"""
    return ((layout.candidates / f"{candidate_id}.py").exists() or (layout.rejected / f".claim-{candidate_id}").exists()
            or any(layout.rejected.glob(f"{candidate_id}-*")))


def with_verdicts(layout: Layout, rows: list[dict]) -> list[dict]:
    """Each row with its candidate's verdict (`verdict`; None for the baseline's control runs)."""
    by_candidate: dict[str, list[dict]] = {}
    for row in rows:
        by_candidate.setdefault(row["candidate_id"], []).append(row)
    state = load_state(layout)
    verdicts = {cid: verdict_of(layout, state, cid, own) for cid, own in by_candidate.items()}
    return [{**row, "verdict": verdicts[row["candidate_id"]]} for row in rows]


def cmd_results(args, layout: Layout) -> int:
    rows = [r for r in results.read_rows(layout.results)
            if (not args.agent or r["agent"] == args.agent) and (not args.status or r["status"] == args.status)]
    rows = with_verdicts(layout, rows)
    if args.verdict:
        rows = [r for r in rows if r["verdict"] and r["verdict"]["verdict"] == args.verdict]
    if args.top:
        rows = sorted((r for r in rows if r["val_bpc"] is not None), key=lambda r: r["val_bpc"])[: args.top]
    if args.json:
        print(json.dumps(rows))
    else:
        print_table([{**r, "verdict": r["verdict"] and r["verdict"]["verdict"]} for r in rows], ROW_COLUMNS)
    return OK


def cmd_status(args, layout: Layout) -> int:
    if args.watch:
        watch(layout, args.interval)
        return OK
    state = snapshot(layout)
    if args.json:
        print(json.dumps(state))
        return OK
    print("\n".join(summary_lines(state)))
    for r in state["running"]:
        print(f"  running {r['trial_id']} on GPU {r['gpu'] or '?'} ({r['kind']}, {r['agent'] or '-'}) "
              f"{r['elapsed'] or 0:.0f}s: {r['progress']} | {r['description']}")
    for t in state["interrupted"]:
        print(f"  interrupted {t['trial_id']} ({t['kind']}, {t['agent'] or '-'}) | {t['description']}")
    for q in state["queued"][:20]:
        if q["trial_id"] is None:
            print(f"  submitted {q['candidate_id'] or q['file']} ({q['agent'] or '-'}), not yet taken in | "
                  f"{q['description']}")
        else:
            print(f"  queued  {q['trial_id']} ({q['kind']}, {q['agent'] or '-'}) | {q['description']}")
    if len(state["queued"]) > 20:
        print(f"  ... and {len(state['queued']) - 20} more queued")
    return OK


def cmd_show(args, layout: Layout) -> int:
    rows = _rows_of(layout, args.id)
    queued = [vars(e) for e in queue.pending(layout) + queue.running(layout) if e.candidate_id == args.id]
    if not rows and not queued and not _submitted(layout, args.id):
        return fail(f"no candidate {args.id} in {layout.root}: `python -m scheduler results --agent NAME` lists "
                    f"your candidates' ids")
    verdict = verdict_of(layout, load_state(layout), args.id, rows)
    logs = {}
    for row in rows:
        log = layout.runs / row["trial_id"] / "log.txt"
        if log.exists():
            logs[row["trial_id"]] = log.read_text(errors="replace").splitlines()[-args.lines:]
    if args.json:
        print(json.dumps({"verdict": verdict, "rows": rows, "queued": queued, "log_tail": logs}))
        return OK
    if verdict is not None:
        print(f"{args.id}: {describe(verdict)}")
    for row in rows:
        shown = {**row, **{key: " ".join("-" if v is None else f"{v:.4f}" for v in row[key])  # one line each, not
                           for key in ("curve", "heldout_curve") if row.get(key)}}      # one per number (--json: lists)
        print(json.dumps(shown, indent=2))
    for q in queued:
        print(f"queued or running: {q['trial_id']} ({q['kind']})")
    for trial_id, lines in logs.items():
        print(f"--- last lines of {trial_id}'s log ---")
        print("\n".join(lines))
    return OK


def cmd_stop(args, layout: Layout) -> int:
    launch = presence.read(layout)
    if launch["state"] != presence.RUNNING:
        return fail(f"no launch is running in {layout.root}, so there is nothing to stop "
                    f"(`python -m scheduler status` says what is there)")
    control.request(layout, control.STOP_NOW if args.now else control.DRAIN)
    print(f"stop requested; the launch ({presence.holder_text(launch)}) "
          + ("stops its running trials now" if args.now else "lets its running trials finish and starts no new ones"))
    return OK


def _test_text(p: dict) -> str:
    """What the test split says of one change of the baseline, never "not scored" under a score."""
    if p["test_bpc"] is None:
        return "the new baseline not scored on test yet"
    if p["test_gain"] is None:
        return f"test {p['test_bpc']:.4f} (no gain on test: {p['old_baseline']} has no test score)"
    return f"{p['test_gain']:.4f} on test"


def cmd_baseline(args, layout: Layout) -> int:
    from scheduler.custody import diff_size

    lineage = results.lineage_rows(layout.results)
    tests = results.test_scores(results.read_rows(layout.results))
    for p in lineage:
        p["test_bpc"] = tests.get(p["new_baseline"])
        old_test = tests.get(p["old_baseline"])
        p["test_gain"] = None if p["test_bpc"] is None or old_test is None else old_test - p["test_bpc"]
    baseline = current_baseline(layout)
    info = {"baseline": baseline, "file": str(layout.baseline), "scores": baseline_scores(layout.selection_state),
            "test_bpc": tests.get(baseline), "lineage": lineage}
    if args.json:
        print(json.dumps(info))
        return OK
    print(f"baseline {info['baseline']} ({info['file']})")
    for gpu, s in info["scores"].items():
        print(f"  {gpu}: val bpc {s['mean']:.4f} ± {s['sigma']:.4f} (n={s['n']})")
    if not info["scores"]:
        print("  not scored yet")
    if info["test_bpc"] is not None:
        print(f"  test split: {info['test_bpc']:.4f} bpc")
    for p in lineage:
        changed = "" if p["diff"] is None else " (+{} -{} lines)".format(*diff_size(p["diff"]))
        if p["kind"] == "hand_edit":  # no decision, so no figures: its own control runs score it
            print(f"  {p['promoted_at'][:19]} hand edit of train.py: {p['old_baseline']} -> {p['new_baseline']}"
                  f"{changed}")
        else:
            print(f"  {p['promoted_at'][:19]} {p['candidate_id']} ({p['agent']}): {p['description']} "
                  f"gain {p['gain']:.4f} on val, {_test_text(p)} (n={p['n_candidate']}, σ {p['sigma']:.4f})"
                  f"{changed}")
        if args.diff and p["diff"]:
            print("\n".join("      " + line for line in p["diff"].splitlines()))
    return OK


def cmd_report(args, layout: Layout) -> int:
    from scheduler.report import write_report

    made = write_report(layout.results, Path(args.out) if args.out else None)
    print(json.dumps(made, default=str) if args.json else f"wrote {made['png']}, {made['timeline']} and {made['summary']}")
    return OK


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from scheduler.compilecache import MODES as COMPILE_CACHE_MODES
    from scheduler.earlystop import EARLY_STOP_MODES
    from scheduler.launch import LaunchOptions  # the launch's and the rule's defaults are the options' defaults
    from scheduler.promotion import POLICIES, RuleConfig

    parser = argparse.ArgumentParser(prog="python -m scheduler", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--root", default=".", help="folder with train.py, candidates/, results/ (default: here)")
    parser.add_argument("--data", default=None, help="data folder (default: ROOT/data)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help_text: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = command("prepare", cmd_prepare, "download and check enwik8, or split a local corpus, into the data folder")
    p.add_argument("--from", dest="source", help="a local enwik8, enwik8.zip, enwik8.gz, any byte file, or a URL")
    p.add_argument("--force", action="store_true", help="prepare again even if data is there")

    p = command("launch", cmd_launch, "run every candidate as a Ray Tune trial, one GPU each", json_flag=False)
    p.add_argument("--gpus", default="all", help="all, a count (2) or indices (0,2)")
    p.add_argument("--budget", type=float, default=LaunchOptions.budget, help="training seconds per trial")
    p.add_argument("--address", help="join a Ray cluster (e.g. auto)")
    p.add_argument("--exit-when-idle", action="store_true", help="end when nothing is queued or running")
    p.add_argument("--pretend-gpus", type=int, default=0, help="N pretend GPUs on the CPU (with --device cpu)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--no-dashboard", action="store_true")
    p.add_argument("--dashboard-host", default="127.0.0.1", help="listen address of the dashboard")
    p.add_argument("--startup-allowance", type=float, default=LaunchOptions.startup_allowance,
                   help="seconds from a trial's start to its first progress line before it is killed")
    p.add_argument("--sandbox", default=LaunchOptions.sandbox, choices=("auto", "bwrap", "none"),
                   help="auto (default): bubblewrap, and refuse to start where no sandbox can be made; "
                        "none: run candidates unsandboxed, at your own risk")
    p.add_argument("--early-stop", default=LaunchOptions.early_stop, choices=EARLY_STOP_MODES,
                   help="stop a candidate's first run whose loss curve runs far above the baseline's control runs' "
                        "(on), only record in its row when it would have been stopped (shadow), or neither (off)")
    p.add_argument("--compile-cache", default=LaunchOptions.compile_cache, choices=COMPILE_CACHE_MODES,
                   help="private (default): every sandboxed trial compiles from scratch; own: it starts from a copy "
                        "of the compile cache the first ok run of its own source left on this node (reruns, control "
                        "runs; what that run wrote there, trained weights too, then reaches them); seeded: a "
                        "candidate's first run starts from its baseline's too (the baseline's compiler output then "
                        "runs in candidates' training)")
    p.add_argument("--promotion", default=RuleConfig.policy, choices=POLICIES,
                   help="noise-aware: confirm with reruns; greedy: promote any first score below the "
                        "baseline's best score (the original one-run rule)")
    p.add_argument("--min-delta", type=float, default=RuleConfig.min_delta,
                   help="bpc a candidate must gain beyond the noise")
    p.add_argument("--confirmations", type=int, default=RuleConfig.confirmations,
                   help="reruns of a candidate that screens well")
    p.add_argument("--control-every", type=int, default=RuleConfig.control_every,
                   help="a control run of the baseline every N trials")
    p.add_argument("--min-baseline-runs", type=int, default=RuleConfig.min_baseline_runs,
                   help="control runs until the baseline has this many scores")
    p.add_argument("--prior-sigma", type=float, default=RuleConfig.prior_sigma,
                   help="run-to-run noise in bpc assumed until reruns measure it")
    p.add_argument("--git-commit", action="store_true", help="commit train.py on each promotion")

    p = command("submit", cmd_submit, "queue a train.py variant", json_flag=True)
    p.add_argument("file")
    p.add_argument("--agent", required=True, help="your unique agent name")
    p.add_argument("-m", "--message", required=True, help="what changed, in one line")
    p.add_argument("--parent", help="the baseline id it was derived from (default: the current baseline)")

    p = command("wait", cmd_wait, "block until a candidate has a result and the selection's verdict; exit 0 "
                                  "scored and not rejected, 1 failed or rejected, 2 no such candidate, 3 timeout")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, default=0, help="seconds (default: no limit)")

    p = command("results", cmd_results, "table of trials, each with its candidate's verdict")
    p.add_argument("--agent")
    p.add_argument("--status", choices=results.STATUSES, help="the trial's status")
    p.add_argument("--verdict", choices=VERDICTS, help="the selection's verdict on its candidate")
    p.add_argument("--top", type=int, help="the N best scored trials")

    p = command("status", cmd_status, "whether a launch runs, queue, running trials, baseline")
    p.add_argument("--watch", action="store_true", help="redraw in place until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (--watch)")
    p = command("show", cmd_show, "one candidate: its verdict, rows, queue entries, the end of its log")
    p.add_argument("id")
    p.add_argument("--lines", type=int, default=20)
    p = command("stop", cmd_stop, "drain: finish running trials and start no new ones", json_flag=False)
    p.add_argument("--now", action="store_true", help="stop running trials too")
    p = command("baseline", cmd_baseline, "the current baseline, its score and lineage (promotions and hand edits)")
    p.add_argument("--diff", action="store_true", help="print the diff of each change of the baseline too")
    p = command("report", cmd_report, "write progress.png, timeline.png and summary.md")
    p.add_argument("--out", help="folder (default: results/report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout.at(args.root, args.data)
    if args.command not in ANYWHERE and not layout.baseline.is_file():
        # nothing is read or created outside a project folder: a stray candidates/ or results/ helps nobody
        return fail(f"no train.py in {layout.root}: not a project folder. cd into the folder that holds train.py, "
                    f"or name it: python -m scheduler --root DIR {args.command} ...")
    try:
        return args.func(args, layout)
    except BrokenPipeError:  # `results | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush fails silently
        return OK
