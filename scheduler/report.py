"""The progress picture and the morning summary, from the Parquet results.

    python -m scheduler report [--out DIR]              # results/report/progress.png and summary.md
    python -m scheduler.report RESULTS_DIR [--out DIR]  # the same, for any results folder

    from scheduler.report import write_report
    write_report(Path("results"))  # {"png": ..., "summary": ..., "trials": 500, ...}

progress.png: val bpc of every scored trial against the time it finished, one
colour per agent (confirmation runs hollow, control runs of the baseline grey
crosses), the baseline as a step line with a ±σ band, promotions as labelled
stars, and failed or rejected work as ticks in a strip under the plot.

timeline.png: one lane per GPU of each node, each trial a bar from its start to its result,
coloured by kind (first run, confirmation, control) or by how it failed; the
lane's label gives its busy share.

summary.md: ## Lineage (every promotion and hand edit of train.py), ## Agents (one row per agent),
## Near misses (the best candidates never promoted), ## Early stopping (what the rule of scheduler/earlystop.py
stopped, and in shadow mode would have stopped: the GPU time saved and its wrong stops), ## GPU busy share.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib
import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from scheduler.custody import diff_size
from scheduler.earlystop import STOPPED_EARLY, WRONG_STOP_SIGMAS
from scheduler.layout import SELECTION_STATE
from scheduler.results import STATUSES, read_lineage, read_rows, read_trials, test_scores
from scheduler.selection import saved_rule
from scheduler.status import baseline_scores, headline_score

FIGSIZE = (16, 9)  # inches; at DPI this is 1600x900 px
LANE_INCHES, TIMELINE_MARGIN_INCHES = 0.45, 1.6  # timeline.png: 16 inches wide, this tall per GPU plus margins
KIND_COLOURS = {"candidate": "tab:blue", "confirm": "tab:cyan", "control": "0.55"}
KIND_NAMES = {"candidate": "first run", "confirm": "confirmation run", "control": "control run"}
DPI = 100
LABEL_CHARS = 40  # promotion labels and table descriptions are cut to this
# Where a promotion's label may go, in points from its star, first choice first: below and left, since the
# baseline only steps down (later stars lie to the right, earlier ones higher) and few scores lie below it.
LABEL_SPOTS = tuple((dx, dy) for dy in (-24, -46, -68, -90) for dx in (-6, 6)) + ((-6, 26), (6, 26), (-6, 48), (6, 48))
STAR_PX = 12  # half the size of a star, in pixels, that labels keep clear of
NEAR_MISSES = 10
DOT_AREA = 4000  # a first run's dot is this area (pt^2) shared among the scored runs, within [16, 70]
CLIP_PERCENTILE = 95  # the y-axis ends a margin above this percentile of scores
CLIP_MARGIN = 0.3  # of the robust range (lowest score .. percentile)
FAILED = tuple(s for s in STATUSES if s != "ok")
STATUS_COLOURS = {
    "crash": "tab:red", "oom": "tab:purple", "timeout": "tab:orange", "nan": "tab:brown",
    "eval_failed": "tab:pink", "rejected": "dimgray", "interrupted": "tab:olive", "export_failed": "goldenrod",
    "refused": "darkred", "stopped_early": "teal",
}
# tab10, and tab20 for more than 8 agents, without grey (grey means control run) and olive (a status colour)
AGENT_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:cyan")
MANY_AGENT_COLOURS = tuple(c for i, c in enumerate(matplotlib.colormaps["tab20"].colors) if i not in (14, 15, 16, 17))
CONTROL_COLOUR = "0.35"
TIME_FORMAT = "%Y-%m-%d %H:%M"
NONE = "-"  # how a missing number is written in the summary
UNNAMED = "(dropped by hand)"  # the agent of a file put into candidates/ without `submit`


# ---------------------------------------------------------------------------
# Derived data shared by the picture and the summary
# ---------------------------------------------------------------------------

def _days(times: pd.Series) -> np.ndarray:
    """Timestamps as matplotlib date numbers (days), so plotting never depends on unit converters."""
    return mdates.date2num(pd.to_datetime(times, utc=True).dt.tz_localize(None).to_numpy())


def _scored(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[(trials["status"] == "ok") & trials["val_bpc"].notna()]


def _baseline_steps(trials: pd.DataFrame, lineage: pd.DataFrame, now: tuple[str, dict] | None,
                    prior_sigma: float) -> pd.DataFrame:
    """The baseline over time: one row per baseline (at, mean, sigma), oldest first; may be empty.

    A baseline's mean is what the selection judged candidates against: on one GPU type, the runs that made it
    the baseline (a promoted candidate's scored runs; none for the first baseline or a hand edit) and its own
    control runs that finished while it was the baseline. Where the rows lack them, a promotion's figures stand
    in (old_mean before the first promotion, new_mean after each). A past baseline's sigma is the one its
    promotion was decided with; the first baseline's is the spread of its scores, or `prior_sigma` with fewer
    than two. The current baseline's mean and sigma are the selection's own (`now`, from results/selection.json),
    the figures `baseline` and `status` print.
    """
    times = pd.concat([trials["started_at"], trials["finished_at"], lineage["promoted_at"]]).dropna()
    if times.empty:
        return pd.DataFrame({"at": pd.Series(dtype="datetime64[us, UTC]"), "mean": [], "sigma": []})
    promotions = lineage[lineage["kind"] == "promotion"]
    eras = [{"at": times.min(), "id": lineage["old_baseline"].iloc[0] if len(lineage) else None, "gpu": None,
             "fallback": promotions["old_mean"].iloc[0] if len(promotions) else math.nan, "sigma": math.nan,
             "winner": None}]
    for e in lineage.itertuples():
        promoted = e.kind == "promotion"
        eras.append({"at": e.promoted_at, "id": e.new_baseline, "gpu": e.gpu_name if promoted else None,
                     "fallback": e.new_mean if promoted else math.nan, "sigma": e.sigma if promoted else math.nan,
                     "winner": e.candidate_id if promoted else None})
    scored = _scored(trials)
    steps = []
    for i, era in enumerate(eras):
        end = eras[i + 1]["at"] if i + 1 < len(eras) else None
        controls = scored[(scored["kind"] == "control") & (scored["finished_at"] >= era["at"])]
        if end is not None:
            controls = controls[controls["finished_at"] < end]
        if era["id"] is not None and not pd.isna(era["id"]):
            controls = controls[controls["candidate_id"] == era["id"]]
        gpus = controls["gpu_name"].fillna(NONE)
        gpu = era["gpu"] if era["gpu"] is not None and not pd.isna(era["gpu"]) else (
            gpus.value_counts().index[0] if len(gpus) else NONE)
        runs = scored[(scored["candidate_id"] == era["winner"]) & (scored["finished_at"] <= era["at"])]
        scores = pd.concat([runs.loc[runs["gpu_name"].fillna(NONE) == gpu, "val_bpc"],
                            controls.loc[gpus == gpu, "val_bpc"]])
        mean = scores.mean() if len(scores) else era["fallback"]
        sigma = era["sigma"] if not pd.isna(era["sigma"]) else (scores.std() if len(scores) > 1 else prior_sigma)
        steps.append({"at": era["at"], "mean": mean, "sigma": sigma})
    if now is not None:  # the current baseline as the selection holds it
        steps[-1].update(mean=now[1]["mean"], sigma=now[1]["sigma"])
    return pd.DataFrame(steps)


def _selection_now(results: Path) -> tuple[tuple[str, dict] | None, float]:
    """(the current baseline's (GPU type, {mean, sigma, n}) as `baseline` and `status` give it, or None before
    its first score; the selection's pooled sigma for that GPU type, its prior without one, nan without a
    selection state)."""
    rule = saved_rule(results / SELECTION_STATE)
    if rule is None:
        return None, math.nan
    now = headline_score(baseline_scores(results / SELECTION_STATE))
    return now, now[1]["sigma"] if now else rule.config.prior_sigma


def _baseline_at(steps: pd.DataFrame, times: pd.Series, column: str = "mean") -> np.ndarray:
    """The baseline mean (or its `column`: sigma) in force at each time (nan where there is none)."""
    if steps.empty:
        return np.full(len(times), math.nan)
    index = np.searchsorted(_days(steps["at"]), _days(times), side="right") - 1
    return steps[column].to_numpy()[np.clip(index, 0, None)]


def _name(value: object) -> str:
    return NONE if value is None or pd.isna(value) else str(value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _short(text: object, limit: int = LABEL_CHARS) -> str:
    text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------
# progress.png
# ---------------------------------------------------------------------------

def _clock_ticks(ax: Axes) -> None:
    """Clock times on every tick of the time axis (a concise formatter writes bare seconds, which read like
    minutes); the date too when the axis spans an hour or more."""
    ax.xaxis.set_major_locator(mdates.AutoDateLocator())
    span = ax.get_xlim()[1] - ax.get_xlim()[0]  # in days
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if span < 1 / 24 else "%m-%d %H:%M"))


def _robust_ylim(values: np.ndarray, steps: pd.DataFrame) -> tuple[float, float]:
    """A y-range that shows the bulk of the scores and the baseline band, not one crash-like 8.0."""
    band = (steps["mean"] - steps["sigma"].fillna(0)).tolist() + (steps["mean"] + steps["sigma"].fillna(0)).tolist()
    band = [b for b in band if not math.isnan(b)]
    low = min([values.min(), *band])
    top = max([np.percentile(values, CLIP_PERCENTILE), *band])
    span = max(top - low, 0.01)
    return low - 0.05 * span, min(values.max(), top + CLIP_MARGIN * span) + 0.05 * span


def _plot_progress(trials: pd.DataFrame, promotions: pd.DataFrame, steps: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if trials.empty:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no trials yet", ha="center", va="center", fontsize=28, color="0.4", transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title(f"0 trials, {_plural(len(promotions), 'promotion')}", fontsize=15)
        fig.savefig(path, dpi=DPI)
        return

    ax, strip = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [11, 2]})
    scored = _scored(trials)
    # control runs are drawn grey whoever ran them, so only agents with candidates of their own get a colour
    agents = sorted(trials.loc[trials["kind"] != "control", "agent"].fillna(NONE).unique())
    palette = AGENT_COLOURS if len(agents) <= len(AGENT_COLOURS) else MANY_AGENT_COLOURS
    colour = {a: palette[i % len(palette)] for i, a in enumerate(agents)}

    if scored.empty:
        ax.text(0.5, 0.5, "no scored trials yet", ha="center", va="center", fontsize=22, color="0.4",
                transform=ax.transAxes)
        ax.set_yticks([])
    else:
        bottom, top = _robust_ylim(scored["val_bpc"].to_numpy(), steps)
        ax.set_ylim(bottom, top)
        x, y = _days(scored["finished_at"]), scored["val_bpc"].to_numpy()
        kind, agent = scored["kind"].to_numpy(), scored["agent"].fillna(NONE).to_numpy()
        # small translucent dots keep hundreds of points readable; a handful get bigger ones
        dot = float(np.clip(DOT_AREA / len(scored), 16, 70))
        for a in agents:
            m = (kind != "confirm") & (kind != "control") & (agent == a) & (y <= top)
            ax.scatter(x[m], y[m], s=dot, color=colour[a], alpha=0.55, linewidths=0, zorder=2)
            m = (kind == "confirm") & (agent == a) & (y <= top)
            ax.scatter(x[m], y[m], s=2 * dot, facecolors="none", edgecolors=colour[a], linewidths=1.2, alpha=0.8,
                       zorder=2)
        m = (kind == "control") & (y <= top)
        ax.scatter(x[m], y[m], s=2 * dot, marker="x", color=CONTROL_COLOUR, linewidths=1.2, alpha=0.7, zorder=2)
        _label_best_unpromoted(ax, scored, promotions, steps)
        clipped = y > top
        if clipped.any():  # off-scale scores stay visible as markers on the top edge
            ax.scatter(x[clipped], np.full(clipped.sum(), top), marker="^", s=36, color="black", clip_on=False,
                       zorder=3)
            ax.text(0.995, 0.985, f"▲ {_plural(clipped.sum(), 'score')} above {top:.3f} (max {y.max():.2f})",
                    ha="right", va="top", transform=ax.transAxes, fontsize=10)

    times = _days(pd.concat([trials["submitted_at"], trials["started_at"], trials["finished_at"],
                             promotions["promoted_at"]]).dropna())
    if not steps.empty:  # steps exist only where some time is known
        sx = np.append(_days(steps["at"]), times.max())
        mean = np.append(steps["mean"], steps["mean"].iloc[-1])
        sigma = np.append(steps["sigma"], steps["sigma"].iloc[-1])
        ax.step(sx, mean, where="post", color="black", linewidth=2, zorder=4)
        ax.fill_between(sx, mean - sigma, mean + sigma, step="post", color="black", alpha=0.12, linewidth=0, zorder=1)

    ax.scatter(_days(promotions["promoted_at"]), promotions["new_mean"], marker="*", s=420, zorder=8,
               color=[colour.get(a or NONE, "gold") for a in promotions["agent"]], edgecolors="black", linewidths=1.2)

    # failed work: one row of ticks per status, so a burst of crashes is seen at once
    failed = trials[trials["status"] != "ok"]
    present = [s for s in FAILED if (failed["status"] == s).any()]
    for row, status in enumerate(present):
        rows = failed[failed["status"] == status]
        when = rows["finished_at"].fillna(rows["started_at"]).fillna(rows["submitted_at"]).dropna()
        strip.scatter(_days(when), np.full(len(when), row), marker="|", s=90, linewidths=1.4,
                      color=STATUS_COLOURS[status])
    strip.set_yticks(range(len(present)), [f"{s} ({(failed['status'] == s).sum()})" for s in present], fontsize=9)
    strip.set_ylim(-0.7, max(len(present), 1) - 0.3)
    strip.invert_yaxis()
    if not present:
        strip.text(0.5, 0.5, "no failed or rejected trials", ha="center", va="center", transform=strip.transAxes)
    strip.grid(axis="x", alpha=0.3)
    strip.set_xlabel("finished at (UTC)", fontsize=11)

    _clock_ticks(strip)
    ax.grid(alpha=0.3)
    ax.set_ylabel("validation bits per character (lower is better)", fontsize=11)

    counts = trials["agent"].fillna(NONE).value_counts()
    kinds = scored["kind"].value_counts()
    first_runs = len(scored) - kinds.get("confirm", 0) - kinds.get("control", 0)
    agent_handles = [Line2D([], [], marker="o", linestyle="", color=colour[a]) for a in agents]
    kind_handles = [
        Line2D([], [], marker="o", linestyle="", color="0.3", alpha=0.6),
        Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="0.3"),
        Line2D([], [], marker="x", linestyle="", color=CONTROL_COLOUR),
        Line2D([], [], marker="*", linestyle="", markersize=15, color="0.7", markeredgecolor="black"),
        (Line2D([], [], color="black", linewidth=2), Patch(color="black", alpha=0.12)),
    ]
    kind_labels = [f"first run ({first_runs})", f"confirmation run ({kinds.get('confirm', 0)})",
                   f"control run of the baseline ({kinds.get('control', 0)})", f"promotion ({len(promotions)})",
                   "baseline mean ± σ"]
    ax.add_artist(ax.legend(agent_handles, [f"{a} ({counts[a]})" for a in agents], title="agent (trials)",
                            loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=10, title_fontsize=10))
    ax.legend(kind_handles, kind_labels, loc="lower left", bbox_to_anchor=(1.005, 0), fontsize=10)

    best = f", best val bpc {scored['val_bpc'].min():.4f}" if len(scored) else ""
    # the selection's figure, as `baseline` and `status` give it; none while the baseline is unscored
    now = f", baseline now {steps['mean'].iloc[-1]:.4f}" if len(steps) and not pd.isna(steps["mean"].iloc[-1]) else ""
    ax.set_title(f"{_plural(len(trials), 'trial')} ({len(scored)} scored, {len(failed)} failed or rejected), "
                 f"{_plural(len(promotions), 'promotion')}{best}{now}", fontsize=15)
    unlabelled = len(promotions) - _label_promotions(fig, ax, promotions)
    if unlabelled:
        ax.text(0.005, 0.012, f"{unlabelled} of {len(promotions)} promotions unlabelled for lack of room: "
                "see ## Lineage in summary.md", transform=ax.transAxes, fontsize=9.5, color="0.3")
    fig.savefig(path, dpi=DPI)


def _label_best_unpromoted(ax: Axes, scored: pd.DataFrame, promotions: pd.DataFrame, steps: pd.DataFrame) -> None:
    """Name the best run of a candidate never promoted, when it beats the baseline: the first idea to retry."""
    runs = scored[(scored["kind"] != "control") & ~scored["candidate_id"].isin(promotions["candidate_id"])]
    if runs.empty or steps.empty:
        return
    best = runs.loc[runs["val_bpc"].idxmin()]
    if best["val_bpc"] >= steps["mean"].iloc[-1]:
        return
    ax.annotate(f"best not promoted: {_short(best['description'])} ({best['val_bpc']:.4f})",
                (_days(pd.Series([best["finished_at"]]))[0], best["val_bpc"]), xytext=(-8, 8),
                textcoords="offset points", ha="right", va="bottom", fontsize=10, color="0.2", zorder=9)


def _label_promotions(fig: Figure, ax: Axes, promotions: pd.DataFrame) -> int:
    """Label stars with their descriptions, biggest gain first, each at the first of LABEL_SPOTS where it stays
    inside the plot and covers no star and no other label; a star without room stays unlabelled. Returns labels."""
    if promotions.empty:
        return 0
    fig.canvas.draw()  # settle the layout, then freeze it, so that boxes measured now are where they will be drawn
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    plot = ax.get_window_extent()
    xy = np.column_stack([_days(promotions["promoted_at"]), promotions["new_mean"]])
    stars = ax.transData.transform(xy)
    taken = [Bbox.from_bounds(x - STAR_PX, y - STAR_PX, 2 * STAR_PX, 2 * STAR_PX) for x, y in stars]
    drawn = 0
    for i in promotions["gain"].fillna(0).sort_values(ascending=False, kind="stable").index:
        p = promotions.loc[i]
        for dx, dy in LABEL_SPOTS:
            label = ax.annotate(_short(p["description"]) or p["candidate_id"], tuple(xy[i]), xytext=(dx, dy),
                                textcoords="offset points", ha="right" if dx < 0 else "left", va="center",
                                fontsize=9.5, zorder=7, bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "0.6",
                                                              "alpha": 0.85},
                                arrowprops={"arrowstyle": "-", "color": "0.4", "linewidth": 0.8})
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer).padded(4)  # the text alone, not its connecting line
            fits = plot.x0 <= box.x0 and box.x1 <= plot.x1 and plot.y0 <= box.y0 and box.y1 <= plot.y1
            if fits and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                drawn += 1
                break
            label.remove()
    return drawn


# ---------------------------------------------------------------------------
# summary.md
# ---------------------------------------------------------------------------

def _num(value: object, digits: int = 4, sign: bool = False) -> str:
    if value is None or pd.isna(value):
        return NONE
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _when(value: object) -> str:
    return NONE if value is None or pd.isna(value) else pd.Timestamp(value).strftime(TIME_FORMAT)


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _lineage(lineage: pd.DataFrame, tests: dict[str, float]) -> str:
    """One row per change of the baseline: promotions with their figures, hand edits without (no decision made
    them); the test split's figures come from each baseline's first control run."""
    if lineage.empty:
        return "No promotions yet."

    def cells(p) -> list[str]:
        new, old = tests.get(p.new_baseline), tests.get(p.old_baseline)
        test = "not scored" if new is None else _num(new)
        if p.kind == "hand_edit":
            changed = " (+{} -{} lines)".format(*diff_size(p.diff)) if isinstance(p.diff, str) else ""
            return ["hand edit", NONE, f"edited by hand: {p.old_baseline} -> {p.new_baseline}{changed}", NONE, NONE,
                    test, NONE, NONE, NONE]
        test_gain = "not scored" if new is None else "old not scored" if old is None else _num(old - new, sign=True)
        return [_name(p.candidate_id), _name(p.agent), _short(p.description), _num(p.gain, sign=True),
                _num(p.new_mean), test, test_gain,
                f"{_num(p.n_candidate, 0)} vs {_num(p.n_baseline, 0)}", _num(p.sigma)]

    rows = [[i + 1, _when(p.promoted_at), *cells(p)] for i, p in enumerate(lineage.itertuples())]
    headers = ["#", "time (UTC)", "candidate", "agent", "message", "gain (val)", "val bpc", "test bpc",
               "gain (test)", "n (cand vs base)", "σ"]
    return _table(headers, rows)


def _agents(trials: pd.DataFrame, promotions: pd.DataFrame, steps: pd.DataFrame) -> str:
    if trials.empty:
        return "No trials yet."
    trials = trials.assign(agent=trials["agent"].fillna(NONE))
    scored = _scored(trials)
    scored = scored[scored["kind"] != "control"]
    gain = pd.Series(_baseline_at(steps, scored["finished_at"]) - scored["val_bpc"].to_numpy(), index=scored.index)
    promoted = promotions["agent"].fillna(NONE).value_counts()
    rows = []
    for agent, own in trials.groupby("agent", sort=True):
        status = own["status"].value_counts()
        best = gain[scored["agent"] == agent].max()
        rows.append([agent, len(own), status.get("ok", 0), *(status.get(s, 0) for s in FAILED),
                     promoted.get(agent, 0), _num(own["total_seconds"].sum() / 3600, 2), _num(best, sign=True)])
    table = _table(["agent", "trials", "ok", *FAILED, "promotions", "GPU-hours", "best gain"], rows)
    return table + ("\n\nbest gain: the largest (baseline mean in force when the run finished − its val bpc) over "
                    "the agent's scored first and confirmation runs; the baseline is the step line of progress.png; "
                    "positive means it beat the baseline.")


def _near_misses(trials: pd.DataFrame, promotions: pd.DataFrame) -> str:
    scored = _scored(trials)
    runs = scored[(scored["kind"] != "control") & ~scored["candidate_id"].isin(promotions["candidate_id"])]
    if runs.empty:
        return "No scored candidates that were not promoted."
    by = runs.groupby("candidate_id", sort=False)
    best = (by.agg(agent=("agent", "first"), description=("description", "first"), val_bpc=("val_bpc", "mean"),
                   runs=("val_bpc", "size"))
            .sort_values("val_bpc", kind="stable").head(NEAR_MISSES))
    rows = [[i + 1, c, _name(r.agent), _short(r.description), _num(r.val_bpc), r.runs]
            for i, (c, r) in enumerate(best.iterrows())]
    headers = ["#", "candidate", "agent", "description", "val bpc", "runs"]
    return (f"The best {_plural(len(best), 'candidate')} never promoted, by mean val bpc over their scored runs "
            "(control runs excluded).\n\n" + _table(headers, rows))


def early_stopping(trials: pd.DataFrame, steps: pd.DataFrame) -> dict:
    """What the early-stop rule did and would have done: {"stopped": trials it stopped (launch --early-stop on),
    "would_stop": scored trials it would have stopped (shadow), "saved_seconds": the GPU time those would-be stops
    would have saved (training after the stop, and the evaluation), "gpu_seconds": all trials' GPU time,
    "wrong": the would-be stops of runs that ended within WRONG_STOP_SIGMAS σ of the baseline in force, or better,
    as a frame}."""
    stopped = trials[trials["status"] == STOPPED_EARLY]
    shadow = trials[(trials["status"] == "ok") & trials["early_stop_at"].notna() & trials["val_bpc"].notna()]
    saved = ((shadow["training_seconds"] - shadow["early_stop_at"]).clip(lower=0) + shadow["eval_seconds"].fillna(0))
    mean = _baseline_at(steps, shadow["finished_at"])
    sigma = _baseline_at(steps, shadow["finished_at"], "sigma")
    worse = (shadow["val_bpc"].to_numpy() - mean) / sigma
    wrong = shadow.assign(baseline_mean=mean, sigmas=worse)[~(worse > WRONG_STOP_SIGMAS)]
    return {"stopped": len(stopped), "would_stop": len(shadow), "saved_seconds": float(saved.sum()),
            "gpu_seconds": float(trials["total_seconds"].sum()), "wrong": wrong}


def _early_stopping(trials: pd.DataFrame, steps: pd.DataFrame) -> str:
    found = early_stopping(trials, steps)
    if not found["stopped"] and not found["would_stop"]:
        return "The early-stop rule stopped nothing and, in shadow mode, would have stopped nothing."
    share = 100 * found["saved_seconds"] / found["gpu_seconds"] if found["gpu_seconds"] else math.nan
    text = (f"{_plural(found['stopped'], 'trial')} stopped early (`launch --early-stop on`). In shadow mode the "
            f"rule would have stopped {_plural(found['would_stop'], 'scored trial')}, saving "
            f"{_num(found['saved_seconds'] / 3600, 2)} GPU-hours ({_num(share, 1)}% of all trials' GPU time), with "
            f"{_plural(len(found['wrong']), 'wrong stop')}: runs that ended within {WRONG_STOP_SIGMAS:.0f} σ of "
            f"the baseline in force, or better.")
    if found["wrong"].empty:
        return text
    rows = [[w.trial_id, _name(w.agent), _short(w.description), _num(w.early_stop_at, 0), _num(w.val_bpc),
             _num(w.baseline_mean), _num(w.sigmas, 1, sign=True)] for w in found["wrong"].itertuples()]
    return text + "\n\n" + _table(["trial", "agent", "description", "stop at (s)", "val bpc", "baseline",
                                    "σ worse"], rows)


def _ran(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials that ran (start and result known), with node and GPU filled in, oldest first."""
    ran = trials.dropna(subset=["started_at", "finished_at"])
    ran = ran[ran["finished_at"] >= ran["started_at"]]
    return ran.assign(node=ran["node"].fillna(NONE), gpu_id=ran["gpu_id"].fillna(NONE)).sort_values("started_at")


def _per_gpu(ran: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame, float]]:
    """(node, gpu, its trials, busy seconds) for each GPU that ran trials, in order."""
    return [(node, gpu, own, union_seconds(own[["started_at", "finished_at"]]))
            for (node, gpu), own in ran.groupby(["node", "gpu_id"], sort=True)]


def _plot_timeline(trials: pd.DataFrame, path: Path) -> None:
    """One lane per GPU: did each GPU run one trial at a time, and were they all busy at once?"""
    ran = _ran(trials)
    lanes = _per_gpu(ran)
    fig = Figure(figsize=(FIGSIZE[0], TIMELINE_MARGIN_INCHES + LANE_INCHES * max(len(lanes), 1)), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if not lanes:
        ax.text(0.5, 0.5, "no trials ran yet", ha="center", va="center", fontsize=20, color="0.4",
                transform=ax.transAxes)
        ax.set_axis_off()
        fig.savefig(path, dpi=DPI)
        return
    wall = (ran["finished_at"].max() - ran["started_at"].min()).total_seconds()
    labels = []
    for lane, (node, gpu, own, busy) in enumerate(lanes):
        start, end = _days(own["started_at"]), _days(own["finished_at"])
        colours = [KIND_COLOURS.get(k, "tab:blue") if st == "ok" else STATUS_COLOURS.get(st, "black")
                   for k, st in zip(own["kind"], own["status"])]
        ax.broken_barh(list(zip(start, end - start)), (lane - 0.38, 0.76), facecolors=colours,
                       edgecolors="white", linewidth=0.6)
        share = 100 * busy / wall if wall > 0 else math.nan
        labels.append(f"{node} / GPU {gpu}  ({_num(share, 1)}% busy)")
    ax.set_yticks(range(len(lanes)), labels, fontsize=10)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    _clock_ticks(ax)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("time (UTC)", fontsize=11)
    shown = [(KIND_NAMES[k], c) for k, c in KIND_COLOURS.items()]
    shown += [(s, c) for s, c in STATUS_COLOURS.items() if (ran["status"] == s).any()]
    ax.legend([Patch(color=c) for _, c in shown], [name for name, _ in shown], loc="upper left",
              bbox_to_anchor=(1.005, 1), fontsize=9)
    nodes = ran["node"].nunique()  # on a cluster: each lane is a GPU of a node, named host/Ray node id
    ax.set_title(f"{_plural(len(ran), 'trial')} on {_plural(len(lanes), 'GPU')}"
                 f"{f' of {nodes} nodes' if nodes > 1 else ''}, "
                 f"{_when(ran['started_at'].min())} to {_when(ran['finished_at'].max())} UTC", fontsize=13)
    fig.savefig(path, dpi=DPI)


def union_seconds(intervals: pd.DataFrame) -> float:
    """Length of the union of [started_at, finished_at] intervals: overlapping runs count once."""
    total, end = 0.0, None
    for start, finish in intervals.sort_values("started_at").itertuples(index=False):
        if end is None or start > end:
            total, end = total + (finish - start).total_seconds(), finish
        elif finish > end:
            total, end = total + (finish - end).total_seconds(), finish
    return total


def _gpu_share(trials: pd.DataFrame) -> str:
    ran = _ran(trials)
    if ran.empty:
        return "No trials ran yet."
    first, last = ran["started_at"].min(), ran["finished_at"].max()
    wall = (last - first).total_seconds()
    rows = []
    for node, gpu, own, busy in _per_gpu(ran):
        share = 100 * busy / wall if wall > 0 else math.nan
        rows.append([node, gpu, len(own), _num(busy / 3600, 2), f"{_num(share, 1)}%"])
    return (f"Busy = the union of a GPU's [started_at, finished_at] intervals; wall = {_when(first)} to {_when(last)} "
            f"UTC ({_num(wall / 3600, 2)} h), the first start to the last finish over all GPUs.\n\n"
            + _table(["node", "gpu", "trials", "busy h", "share"], rows))


def _summary(trials: pd.DataFrame, promotions: pd.DataFrame, lineage: pd.DataFrame, steps: pd.DataFrame,
             tests: dict[str, float]) -> str:
    scored = _scored(trials)
    head = f"{_plural(len(trials), 'trial')} ({len(scored)} scored), {_plural(len(promotions), 'promotion')}"
    if len(scored):
        best = scored.loc[scored["val_bpc"].idxmin()]
        head += f", best val bpc {_num(best['val_bpc'])} ({_name(best['candidate_id'])}, {_name(best['agent'])})"
    if len(steps) and not pd.isna(steps["mean"].iloc[-1]):
        head += f", baseline now {_num(steps['mean'].iloc[-1])}"
    sections = [
        "# Research report", head + ".",
        "## Lineage", _lineage(lineage, tests),
        "## Agents", _agents(trials, promotions, steps),
        "## Near misses", _near_misses(trials, promotions),
        "## Early stopping", _early_stopping(trials, steps),
        "## GPU busy share", _gpu_share(trials),
    ]
    return "\n\n".join(sections) + "\n"


# ---------------------------------------------------------------------------

def write_report(results: Path, out: Path | None = None) -> dict:
    """Write progress.png and summary.md from `results` into `out` (default results/report).

    Returns {"png", "timeline", "summary": paths, "trials", "scored", "failed", "promotions": counts, "best_bpc": float or None}.
    """
    results = Path(results)
    out = Path(out) if out is not None else results / "report"
    out.mkdir(parents=True, exist_ok=True)
    trials, lineage = read_trials(results), read_lineage(results)
    promotions = lineage[lineage["kind"] == "promotion"].reset_index(drop=True)
    trials["agent"] = trials["agent"].fillna("").replace("", UNNAMED)  # files dropped by hand have no agent
    steps = _baseline_steps(trials, lineage, *_selection_now(results))
    png, timeline, summary = out / "progress.png", out / "timeline.png", out / "summary.md"
    _plot_progress(trials, promotions, steps, png)
    _plot_timeline(trials, timeline)
    summary.write_text(_summary(trials, promotions, lineage, steps, test_scores(read_rows(results))),
                       encoding="utf-8")
    scored = _scored(trials)
    return {
        "png": png, "timeline": timeline, "summary": summary, "trials": len(trials), "scored": len(scored),
        "failed": int((trials["status"] != "ok").sum()), "promotions": len(promotions),
        "best_bpc": float(scored["val_bpc"].min()) if len(scored) else None,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m scheduler.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="?", default=Path("results"),
                        help="results folder (default: results)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS/report)")
    args = parser.parse_args()
    report = write_report(args.results, args.out)
    print(f"wrote {report['png']}, {report['timeline']} and {report['summary']}: "
          f"{_plural(report['trials'], 'trial')}, {_plural(report['promotions'], 'promotion')}")
