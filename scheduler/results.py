"""Trial results in Parquet: one file per finished trial, one fixed schema.

    import pandas as pd
    pd.read_parquet("results/trials")          # works while trials are still running

Every file dropped into candidates/ ends up as exactly one row (rejected files
too), and every run of a candidate (first run, confirmation, control run of the
baseline) is one row. Column types never depend on the data: missing values
are nulls of the column's type.
"""

from __future__ import annotations

import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # pyarrow's to_pandas() imports pandas when a frame is read; `submit` never spends 0.7 s on it
    import pandas as pd

STATUSES = ("ok", "crash", "oom", "timeout", "nan", "export_failed", "eval_failed", "refused", "rejected",
            "interrupted")
KINDS = ("candidate", "confirm", "control")  # first run, extra seeds of a candidate, rerun of the baseline

_TIME = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    ("trial_id", pa.string()),        # one run; <candidate_id>-r<n>
    ("candidate_id", pa.string()),
    ("kind", pa.string()),            # one of KINDS
    ("agent", pa.string()),
    ("parent", pa.string()),          # the baseline the candidate was derived from
    ("baseline", pa.string()),        # the baseline current when it ran (what it is judged against)
    ("stale", pa.bool_()),            # parent is an older baseline
    ("description", pa.string()),
    ("source_sha256", pa.string()),
    ("duplicate_of", pa.string()),    # for a rejected duplicate: the candidate it repeats
    ("status", pa.string()),          # one of STATUSES
    ("reason", pa.string()),          # one line: why it failed or was rejected
    ("error_tail", pa.string()),      # last lines of its output when it failed
    ("val_bpc", pa.float64()),
    ("test_bpc", pa.float64()),       # only a baseline's first control run scores the test split
    ("training_seconds", pa.float64()),
    ("total_seconds", pa.float64()),  # trial start to result, evaluation included
    ("eval_seconds", pa.float64()),
    ("tokens", pa.int64()),
    ("steps", pa.int64()),
    ("parameters", pa.int64()),
    ("peak_memory_mb", pa.float64()),
    ("mfu_percent", pa.float64()),
    ("tokens_per_second", pa.float64()),
    ("precision", pa.string()),
    ("gpu_name", pa.string()),
    ("gpu_id", pa.string()),          # CUDA_VISIBLE_DEVICES the trial ran with
    ("node", pa.string()),
    ("seed", pa.int64()),
    ("sandbox", pa.string()),         # what the candidate ran in: bwrap, or none (launch --sandbox none)
    ("startup_seconds", pa.float64()),  # trial start to the first progress line, on the trial's own clock
    ("submitted_at", _TIME),
    ("started_at", _TIME),
    ("finished_at", _TIME),
])
COLUMNS = SCHEMA.names
# The columns a trial's row takes from its configuration (the queue entry and the launch's settings)
CONFIG_COLUMNS = ("trial_id", "candidate_id", "kind", "agent", "parent", "baseline", "description", "source_sha256",
                  "seed", "sandbox")


def now() -> datetime:
    return datetime.now(timezone.utc)


def from_unix(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def trials_dir(results: Path) -> Path:
    return results / "trials"


def _write_one(folder: Path, name: str, record: dict, schema: pa.Schema) -> Path:
    """One record as its own Parquet file, atomically: temporary file, fsync, rename."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{column: record.get(column) for column in schema.names}], schema=schema)
    path = folder / f"{name}.parquet"
    tmp = folder / f".{name}.parquet.tmp"
    with open(tmp, "wb") as out:
        pq.write_table(table, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return path


def _read_all(folder: Path, schema: pa.Schema, order_by: str) -> pd.DataFrame:
    """Every file of a folder as one frame; a damaged file is skipped with a warning that names it."""
    tables = []
    for path in sorted(folder.glob("*.parquet")):
        try:
            tables.append(pq.read_table(path, schema=schema))
        except Exception as error:  # truncated or foreign file: keep going, say which
            warnings.warn(f"skipping damaged result file {path}: {error}", stacklevel=3)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table.to_pandas().sort_values(order_by, kind="stable").reset_index(drop=True)


def write_row(results: Path, row: dict) -> Path:
    """Write one trial's row; unknown keys and statuses are errors."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not result columns: {sorted(unknown)}")
    if row.get("status") not in STATUSES:
        raise ValueError(f"status {row.get('status')!r} is not one of {STATUSES}")
    return _write_one(trials_dir(results), row["trial_id"], row, SCHEMA)


def has_row(results: Path, trial_id: str) -> bool:
    return (trials_dir(results) / f"{trial_id}.parquet").exists()


def read_trials(results: Path) -> pd.DataFrame:
    """All rows, oldest first. A damaged file is skipped with a warning that names it."""
    return _read_all(trials_dir(results), SCHEMA, "finished_at")


# ---------------------------------------------------------------------------
# The lineage: one row each time the baseline changes, by a promotion or by a hand edit
# ---------------------------------------------------------------------------

LINEAGE_KINDS = ("promotion", "hand_edit")  # the selection actor promoted a candidate; train.py was edited by hand

PROMOTION_SCHEMA = pa.schema([
    ("promoted_at", _TIME),           # when the baseline changed (a hand edit: when it was noticed)
    ("kind", pa.string()),            # one of LINEAGE_KINDS; null in files written before hand edits were recorded
    ("candidate_id", pa.string()),    # null for a hand edit
    ("agent", pa.string()),
    ("description", pa.string()),
    ("old_baseline", pa.string()),
    ("new_baseline", pa.string()),
    ("gpu_name", pa.string()),
    ("old_mean", pa.float64()),       # val bpc of the old baseline on that GPU type
    ("new_mean", pa.float64()),       # val bpc of the candidate (mean over its runs)
    ("gain", pa.float64()),           # old_mean - new_mean
    ("n_candidate", pa.int64()),
    ("n_baseline", pa.int64()),
    ("sigma", pa.float64()),          # pooled run-to-run σ used by the test
    ("threshold", pa.float64()),      # gain that was needed
    ("reason", pa.string()),
    ("diff", pa.string()),            # unified diff from the old baseline to the new, cut at custody.MAX_DIFF_CHARS
])


def test_scores(trials: pd.DataFrame) -> dict[str, float]:
    """Each baseline's score on the test split (from its first control run that scored it), by baseline id."""
    scored = trials[(trials["kind"] == "control") & trials["test_bpc"].notna()]
    return scored.groupby("candidate_id", sort=False)["test_bpc"].first().to_dict()


def promotions_dir(results: Path) -> Path:
    return results / "promotions"


def write_promotion(results: Path, event: dict) -> Path:
    """Write one lineage entry (a promotion unless its `kind` says otherwise)."""
    event = {"kind": "promotion", **event}
    if event["kind"] not in LINEAGE_KINDS:
        raise ValueError(f"lineage kind {event['kind']!r} is not one of {LINEAGE_KINDS}")
    stamp = event["promoted_at"].strftime("%Y%m%dT%H%M%S%f")
    name = event.get("candidate_id") or f"{event['kind']}-{event['new_baseline']}"
    return _write_one(promotions_dir(results), f"{stamp}-{name}", event, PROMOTION_SCHEMA)


def read_lineage(results: Path) -> pd.DataFrame:
    """Every change of the baseline, oldest first: promotions and hand edits (`kind`). Files written before the
    columns `kind` and `diff` existed read as promotions without a diff."""
    lineage = _read_all(promotions_dir(results), PROMOTION_SCHEMA, "promoted_at")
    lineage["kind"] = lineage["kind"].fillna("promotion")
    return lineage


def read_promotions(results: Path) -> pd.DataFrame:
    """The promotions alone (the lineage without hand edits): what the selection actor decided."""
    lineage = read_lineage(results)
    return lineage[lineage["kind"] == "promotion"].reset_index(drop=True)
