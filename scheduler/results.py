"""Trial results in Parquet: one file per finished trial, one fixed schema.

    import pandas as pd
    pd.read_parquet("results/trials")          # works while trials are still running

    from scheduler import results
    results.read_rows(Path("results"))         # the same rows as plain dicts, without pandas or pyarrow

Every file dropped into candidates/ ends up as exactly one row (rejected files
too), and every run of a candidate (first run, confirmation, control run of the
baseline) is one row. Column types never depend on the data: missing values
are nulls of the column's type.

Each row, and each lineage row, is written twice: its Parquet file, which is the
record, then the same values as JSON under results/index/ (timestamps as ISO text,
NaN as null). The commands agents call all the time (`results`, `wait`, `status`)
read the JSON: importing pyarrow and pandas and opening 200 Parquet files cost them
1-2 s each, the JSON costs milliseconds. A row without its JSON (written before the
index existed, or the JSON write failed) is read from its Parquet file, so the index
can be deleted at any time; `build_index` (run by launch when it starts) writes what
is missing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler.atomic import atomic_path, atomic_write

if TYPE_CHECKING:  # imported only where a file is written or a frame is read: `submit` and `status` never pay for them
    import pandas as pd
    import pyarrow as pa

INDEX = "index"  # results/index/<trials|promotions>/<name>.json: each row again as JSON, for the fast readers

STATUSES = ("ok", "crash", "oom", "timeout", "nan", "export_failed", "eval_failed", "refused", "rejected",
            "interrupted", "stopped_early")
KINDS = ("candidate", "confirm", "control")  # first run, extra seeds of a candidate, rerun of the baseline

TIME = "timestamp"  # microseconds, UTC
_TRIAL_COLUMNS = [
    ("trial_id", "string"),           # one run; <candidate_id>-r<n>
    ("candidate_id", "string"),
    ("kind", "string"),               # one of KINDS
    ("agent", "string"),
    ("parent", "string"),             # the baseline the candidate was derived from
    ("baseline", "string"),           # the baseline current when it ran (what it is judged against)
    ("stale", "bool"),                # parent is an older baseline
    ("description", "string"),
    ("source_sha256", "string"),
    ("duplicate_of", "string"),       # for a rejected duplicate: the candidate it repeats
    ("status", "string"),             # one of STATUSES
    ("reason", "string"),             # one line: why it failed or was rejected
    ("error_tail", "string"),         # last lines of its output when it failed
    ("val_bpc", "float64"),
    ("test_bpc", "float64"),          # only a baseline's first control run scores the test split
    ("train_bpc", "float64"),         # the evaluation's score on windows of the train split: the curve's anchor
    ("training_seconds", "float64"),
    ("total_seconds", "float64"),     # trial start to result, evaluation included
    ("eval_seconds", "float64"),
    ("tokens", "int64"),
    ("steps", "int64"),
    ("parameters", "int64"),
    ("peak_memory_mb", "float64"),
    ("mfu_percent", "float64"),
    ("tokens_per_second", "float64"),
    ("precision", "string"),
    ("gpu_name", "string"),
    ("gpu_id", "string"),             # CUDA_VISIBLE_DEVICES the trial ran with
    ("node", "string"),
    ("seed", "int64"),
    ("sandbox", "string"),            # what the candidate ran in: bwrap, or none (launch --sandbox none)
    ("startup_seconds", "float64"),   # trial start to the first progress line, on the trial's own clock
    ("startup_work_seconds", "float64"),  # device work before the first progress line (scheduler/startup.py)
    ("curve", "list_float64"),        # mean training loss in each 5% of the budget (scheduler/earlystop.py)
    ("heldout_curve", "list_float64"),  # loss on the train split's held-out end, once in each 5% (scheduler/harness.py)
    ("early_stop_at", "float64"),     # counted seconds at which the early-stop rule stopped it, or would have
    ("submitted_at", TIME),
    ("started_at", TIME),
    ("finished_at", TIME),
]
COLUMNS = [name for name, _ in _TRIAL_COLUMNS]
# The columns a trial's row takes from its configuration (the queue entry and the launch's settings)
CONFIG_COLUMNS = ("trial_id", "candidate_id", "kind", "agent", "parent", "baseline", "description", "source_sha256",
                  "seed", "sandbox")


def now() -> datetime:
    return datetime.now(timezone.utc)


def from_unix(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def trials_dir(results: Path) -> Path:
    return results / "trials"


_ARROW_TYPES = {"string": "string", "bool": "bool_", "float64": "float64", "int64": "int64"}
LIST_FLOAT64 = "list_float64"  # a list of floats, nulls allowed: a trial's curve


@cache
def _arrow_schema(columns: tuple[tuple[str, str], ...]) -> pa.Schema:
    import pyarrow as pa

    def arrow_type(name: str) -> pa.DataType:
        if name == LIST_FLOAT64:
            return pa.list_(pa.float64())
        return pa.timestamp("us", tz="UTC") if name == TIME else getattr(pa, _ARROW_TYPES[name])()

    return pa.schema([(column, arrow_type(kind)) for column, kind in columns])


def __getattr__(name: str):
    """SCHEMA and PROMOTION_SCHEMA, the pyarrow schemas, built on first use (pyarrow costs 0.15 s to import)."""
    if name == "SCHEMA":
        return _arrow_schema(tuple(_TRIAL_COLUMNS))
    if name == "PROMOTION_SCHEMA":
        return _arrow_schema(tuple(_PROMOTION_COLUMNS))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _jsonable(value: object) -> object:
    """A Parquet value as JSON: timestamps as ISO text with microseconds (so that text order is time order),
    NaN as null."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat(timespec="microseconds")
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _index_path(folder: Path, name: str) -> Path:
    return folder.parent / INDEX / folder.name / f"{name}.json"


def _write_one(folder: Path, name: str, record: dict, columns: list[tuple[str, str]]) -> Path:
    """One record as its own Parquet file, then as JSON in the index; each atomically (temporary file, fsync,
    rename), the Parquet file first: a reader that finds no JSON reads the Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _arrow_schema(tuple(columns))
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{column: record.get(column) for column in schema.names}], schema=schema)
    path = folder / f"{name}.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    index = _index_path(folder, name)
    index.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(index, json.dumps({k: _jsonable(v) for k, v in table.to_pylist()[0].items()}))
    return path


def _read_all(folder: Path, columns: list[tuple[str, str]], order_by: str) -> pd.DataFrame:
    """Every file of a folder as one frame; a damaged file is skipped with a warning that names it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _arrow_schema(tuple(columns))
    tables = []
    for path in sorted(folder.glob("*.parquet")):
        try:
            tables.append(pq.read_table(path, schema=schema))
        except Exception as error:  # truncated or foreign file: keep going, say which
            warnings.warn(f"skipping damaged result file {path}: {error}", stacklevel=3)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table.to_pandas().sort_values(order_by, kind="stable").reset_index(drop=True)


def _index_missing(folder: Path, columns: list[tuple[str, str]]) -> int:
    """Write the JSON of every record of `folder` that has none; returns how many. A damaged file is skipped
    (the readers warn about it)."""
    import pyarrow.parquet as pq

    written = 0
    for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else ():
        index = _index_path(folder, path.stem)
        if index.exists():
            continue
        try:
            [record] = pq.read_table(path, schema=_arrow_schema(tuple(columns))).to_pylist()
        except Exception:  # noqa: BLE001 - truncated or foreign: read_rows names it when it skips it
            continue
        index.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(index, json.dumps({k: _jsonable(v) for k, v in record.items()}))
        written += 1
    return written


def build_index(results: Path) -> int:
    """Index the rows and lineage rows written before results/index/ existed (launch does this when it starts,
    so that an older results folder is read fast too); returns how many were indexed."""
    return (_index_missing(trials_dir(results), _TRIAL_COLUMNS)
            + _index_missing(promotions_dir(results), _PROMOTION_COLUMNS))


def _read_records(folder: Path, columns: list[tuple[str, str]], order_by: str) -> list[dict]:
    """Every record of a folder as a plain dict, from the index where it has the record, else from the Parquet
    file; oldest first by `order_by`, as `_read_all` orders them. A damaged Parquet file without JSON is skipped
    with a warning that names it."""
    try:
        names = sorted(n[: -len(".parquet")] for n in os.listdir(folder)
                       if n.endswith(".parquet") and not n.startswith("."))
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        try:
            records.append(json.loads(_index_path(folder, name).read_bytes()))
            continue
        except (OSError, ValueError):  # not indexed (an older folder, or the JSON write failed): read the record
            pass
        import pyarrow.parquet as pq

        path = folder / f"{name}.parquet"
        try:
            table = pq.read_table(path, schema=_arrow_schema(tuple(columns)))
        except Exception as error:  # truncated or foreign file: keep going, say which
            warnings.warn(f"skipping damaged result file {path}: {error}", stacklevel=3)
            continue
        records += [{k: _jsonable(v) for k, v in record.items()} for record in table.to_pylist()]
    records.sort(key=lambda record: (record.get(order_by) is None, record.get(order_by) or ""))
    return records


def write_row(results: Path, row: dict) -> Path:
    """Write one trial's row; unknown keys and statuses are errors."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not result columns: {sorted(unknown)}")
    if row.get("status") not in STATUSES:
        raise ValueError(f"status {row.get('status')!r} is not one of {STATUSES}")
    return _write_one(trials_dir(results), row["trial_id"], row, _TRIAL_COLUMNS)


def has_row(results: Path, trial_id: str) -> bool:
    return (trials_dir(results) / f"{trial_id}.parquet").exists()


def rows_version(results: Path) -> int:
    """Changes whenever a row is written (the trials folder's modification time, in ns; 0 before the first): a
    reader that keeps what it made of the rows knows when to read them again."""
    try:
        return trials_dir(results).stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def read_trials(results: Path) -> pd.DataFrame:
    """All rows, oldest first. A damaged file is skipped with a warning that names it."""
    return _read_all(trials_dir(results), _TRIAL_COLUMNS, "finished_at")


def read_rows(results: Path) -> list[dict]:
    """All rows as plain dicts (timestamps as ISO text, missing values None), oldest first, without pandas."""
    return _read_records(trials_dir(results), _TRIAL_COLUMNS, "finished_at")


# ---------------------------------------------------------------------------
# The lineage: one row each time the baseline changes, by a promotion or by a hand edit
# ---------------------------------------------------------------------------

LINEAGE_KINDS = ("promotion", "hand_edit")  # the selection actor promoted a candidate; train.py was edited by hand

_PROMOTION_COLUMNS = [
    ("promoted_at", TIME),            # when the baseline changed (a hand edit: when it was noticed)
    ("kind", "string"),               # one of LINEAGE_KINDS; null in files written before hand edits were recorded
    ("candidate_id", "string"),       # null for a hand edit
    ("agent", "string"),
    ("description", "string"),
    ("old_baseline", "string"),
    ("new_baseline", "string"),
    ("gpu_name", "string"),
    ("old_mean", "float64"),          # val bpc of the old baseline on that GPU type
    ("new_mean", "float64"),          # val bpc of the candidate (mean over its runs)
    ("gain", "float64"),              # old_mean - new_mean
    ("n_candidate", "int64"),
    ("n_baseline", "int64"),
    ("sigma", "float64"),             # pooled run-to-run σ used by the test
    ("threshold", "float64"),         # gain that was needed
    ("reason", "string"),
    ("diff", "string"),               # unified diff from the old baseline to the new, cut at custody.MAX_DIFF_CHARS
]


def test_scores(rows: list[dict]) -> dict[str, float]:
    """Each baseline's score on the test split (from its first control run that scored it), by baseline id;
    `rows` as read_rows gives them."""
    scores: dict[str, float] = {}
    for row in rows:
        if row["kind"] == "control" and row.get("test_bpc") is not None:
            scores.setdefault(row["candidate_id"], row["test_bpc"])
    return scores


def promotions_dir(results: Path) -> Path:
    return results / "promotions"


def write_promotion(results: Path, event: dict) -> Path:
    """Write one lineage entry (a promotion unless its `kind` says otherwise)."""
    event = {"kind": "promotion", **event}
    if event["kind"] not in LINEAGE_KINDS:
        raise ValueError(f"lineage kind {event['kind']!r} is not one of {LINEAGE_KINDS}")
    stamp = event["promoted_at"].strftime("%Y%m%dT%H%M%S%f")
    name = event.get("candidate_id") or f"{event['kind']}-{event['new_baseline']}"
    return _write_one(promotions_dir(results), f"{stamp}-{name}", event, _PROMOTION_COLUMNS)


def read_lineage(results: Path) -> pd.DataFrame:
    """Every change of the baseline, oldest first: promotions and hand edits (`kind`). Files written before the
    columns `kind` and `diff` existed read as promotions without a diff."""
    lineage = _read_all(promotions_dir(results), _PROMOTION_COLUMNS, "promoted_at")
    lineage["kind"] = lineage["kind"].fillna("promotion")
    return lineage


def read_promotions(results: Path) -> pd.DataFrame:
    """The promotions alone (the lineage without hand edits): what the selection actor decided."""
    lineage = read_lineage(results)
    return lineage[lineage["kind"] == "promotion"].reset_index(drop=True)


def lineage_rows(results: Path) -> list[dict]:
    """read_lineage as plain dicts (timestamps as ISO text), without pandas."""
    lineage = _read_records(promotions_dir(results), _PROMOTION_COLUMNS, "promoted_at")
    for entry in lineage:
        entry["kind"] = entry.get("kind") or "promotion"
    return lineage
