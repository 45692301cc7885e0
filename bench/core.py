"""Benchmark the experiment core on one GPU: the default train.py against variants, same harness.

    python bench/core.py                                  # default and the original script's configuration, 300 s each
    python bench/core.py --budget 60 --only default --rescore   # also score the same weights twice
    python bench/core.py --budget 30 --variant "wide: MODEL_DIM=1024 MODEL_HEADS=8" --variant "wide-fp8: fp8 MODEL_DIM=1024 MODEL_HEADS=8"
    python bench/core.py --only '' --variant "mine:" --base candidates/mine.py   # an edited copy of train.py

Each run is `python <variant>.py` exactly as a user runs train.py: it trains for
the budget through the harness, hands the model over, and is scored in a fresh process on the
whole validation split. Every run starts with an empty compile cache (cold), as
a trial on a fresh machine would. Prints one markdown table; `--json FILE` also
writes the rows. Needs the data prepared (python -m scheduler prepare).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scheduler.constants import override  # noqa: E402
from scheduler.protocol import DEFAULT_BUDGET, RESULT_FILE, STATS_FILE, evaluation_command  # noqa: E402

# The single-GPU script this project started from (TimS-ml/autoresearch-x-transformers), in our harness.
ORIGINAL_MODEL = ("MODEL_DIM=512 MODEL_DEPTH=6 MODEL_HEADS=8 DROPOUT=0.0 SHIFT_TOKENS=0 VALUE_RESIDUAL=False "
                  "LEARNING_RATE=1e-4 MUON_LEARNING_RATE=1e-4 WEIGHT_DECAY=0.0 GRAD_CLIP=0.5 "
                  "WARMUP_RATIO=0.05 WARMDOWN_RATIO=0.3")
BUILTIN = {
    "default": "",
    "original": f"{ORIGINAL_MODEL} BATCH_SIZE=4 GRADIENT_ACCUMULATE_EVERY=4",
    # the same optimizer steps (the mean gradient of 16 windows of 1024 bytes) as one micro-batch: the
    # original's 4x4 split only saved memory, and this model needs about 1 GB either way
    "original-one-batch": f"{ORIGINAL_MODEL} BATCH_SIZE=16 GRADIENT_ACCUMULATE_EVERY=1",
}


def parse_variant(text: str) -> tuple[str, dict]:
    """'name: [fp8|fp16] K=V ...' -> (name, constants); fp8 and fp16 set train.py's USE_FP8 / USE_FP16."""
    name, _, spec = text.partition(":")
    constants = {}
    for word in spec.split():
        if word in ("fp8", "fp16"):
            constants[f"USE_{word.upper()}"] = True
        else:
            key, _, value = word.partition("=")
            constants[key] = ast.literal_eval(value)
    return name.strip(), constants


def run_one(name: str, constants: dict, budget: float, data_dir: Path, seed: int, log_dir: Path | None,
            rescore: bool = False, base: Path = ROOT / "train.py") -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    script = work / "train.py"
    script.write_text(override(base.read_text(), **constants))
    env = {**os.environ,
           "SCHEDULER_BUDGET": str(budget), "SCHEDULER_SEED": str(seed),
           "SCHEDULER_TRAIN_DATA": str(data_dir / "train.bin"), "SCHEDULER_OUT": str(work / "out"),
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"),  # cold compile, like a fresh trial
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("SCHEDULER_TRIAL", None)
    started = time.time()
    log = (log_dir or work) / f"{name}.log"
    with open(log, "w") as out:  # streamed, so a run that hangs still leaves its output
        code = subprocess.run([sys.executable, str(script)], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.time() - started
    result_file = work / "out" / RESULT_FILE
    if code != 0 or not result_file.exists():
        tail = log.read_text().strip().splitlines()[-15:]
        print(f"[{name}] failed (exit {code}):\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"name": name, "status": "failed"}
    result = {**json.loads((work / "out" / STATS_FILE).read_text()), **json.loads(result_file.read_text())}
    result.update(name=name, status="ok", wall_seconds=round(wall, 1), wall_minus_budget=round(wall - budget, 1))
    if rescore:  # the same weights, scored again by a fresh evaluation process: must agree to 1e-6
        rescored = work / "rescore.json"
        with open(log, "a") as out:
            subprocess.run(evaluation_command(work / "out", rescored, data_dir, "cuda"), cwd=work, env=env,
                           stdout=out, stderr=subprocess.STDOUT)
        again = json.loads(rescored.read_text())["val_bpc"]
        result["rescore_difference"] = abs(again - result["val_bpc"])
    print(f"[{name}] " + json.dumps(result), file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--only", default=",".join(BUILTIN), help="built-in runs to include (comma-separated; '' for none)")
    parser.add_argument("--variant", action="append", default=[], help="'name: [fp8|fp16] K=V ...' (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here, after each run")
    parser.add_argument("--logs", type=Path, help="keep each run's output here as NAME.log")
    parser.add_argument("--rescore", action="store_true", help="score each run's weights a second time")
    parser.add_argument("--base", type=Path, default=ROOT / "train.py",
                        help="the script every run starts from, its constants overridden by the variant (default: train.py)")
    args = parser.parse_args()
    if not args.base.is_file():
        parser.error(f"--base {args.base}: no such file")

    runs = [parse_variant(f"{n}: {BUILTIN[n]}") for n in filter(None, args.only.split(","))]
    runs += [parse_variant(v) for v in args.variant]
    rows = []
    for name, constants in runs:
        rows.append(run_one(name, constants, args.budget, args.data_dir, args.seed, args.logs, args.rescore, args.base))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))

    print(f"\nbudget {args.budget:.0f} s, seed {args.seed}, data {args.data_dir}, base {args.base}\n")
    print("| run | val bpc | tokens/s | MFU % | peak MB | params M | precision | wall - budget s | export check + export s "
          "| eval s (scoring s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['name']} | failed | | | | | | | | |")
            continue
        print(f"| {r['name']} | {r['val_bpc']:.4f} | {r['tokens_per_second']:,} | {r['mfu_percent']} | {r['peak_vram_mb']:.0f} "
              f"| {r['num_params'] / 1e6:.1f} | {r['precision']} | {r['wall_minus_budget']} "
              f"| {r['check_seconds']} + {r['export_seconds']} | {r['eval_seconds']} ({r['score_seconds']}) |")
    for r in rows:
        if "rescore_difference" in r:
            print(f"\n{r['name']}: the same weights scored twice differ by {r['rescore_difference']:.2e} bpc")


if __name__ == "__main__":
    main()
