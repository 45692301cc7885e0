"""Launch: start (or join) Ray, then run every queued candidate as a Ray Tune trial on one GPU each.

    python -m scheduler launch --gpus all                    # every GPU of this machine
    python -m scheduler launch --pretend-gpus 3 --device cpu # the same flow on the CPU (tests, laptops)
    python -m scheduler launch --address auto                # join a running Ray cluster

Ctrl-C once: drain (running trials finish, no new ones start). Twice: stop now.
On exit no trial process is left running.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from scheduler import control, prepare, queue, results
from scheduler.compilecache import DEFAULT_MODE as COMPILE_CACHE_DEFAULT, MODES as COMPILE_CACHE_MODES
from scheduler.console import say
from scheduler.earlystop import DEFAULT_MODE
from scheduler.layout import Layout
from scheduler.presence import LaunchBusy, Presence, holder_text
from scheduler.protocol import DEFAULT_BUDGET

DASHBOARD_PORT = 8265
LOCAL_HOST = "127.0.0.1"
UMASK = 0o022  # at least: nothing launch, its Ray or its trials write is writable by other users
RAY_ATTEMPTS = 2  # Ray's start-up is tried again once: on a loaded machine it can time out
T = TypeVar("T")


class LaunchError(Exception):
    """Launch cannot start; the message says why and what to do."""


@dataclass
class LaunchOptions:
    root: Path = Path(".")
    data_dir: Path | None = None
    gpus: str = "all"                # all | N | 0,2
    budget: float = DEFAULT_BUDGET
    address: str | None = None
    exit_when_idle: bool = False
    pretend_gpus: int = 0
    device: str = "cuda"
    dashboard: bool = True
    dashboard_host: str = LOCAL_HOST
    startup_allowance: float = 120.0  # seconds from a trial's start to its first progress line (imports, compile)
    sandbox: str = "auto"            # auto | bwrap | none (scheduler/sandbox.py)
    eval_timeout: float = 600.0
    early_stop: str = DEFAULT_MODE   # off | shadow | on (scheduler/earlystop.py)
    compile_cache: str = COMPILE_CACHE_DEFAULT  # own | seeded | private (scheduler/compilecache.py)
    rule: dict = field(default_factory=dict)
    git_commit: bool = False


def count_gpus() -> int:
    """GPUs on this machine, from nvidia-smi (the driver process never initialises CUDA)."""
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def choose_gpus(spec: str, available: int) -> list[int]:
    """--gpus all | N | 0,2 -> the GPU indices to use."""
    if spec == "all":
        chosen = list(range(available))
    elif spec.isdigit():
        if int(spec) > available:
            raise LaunchError(f"--gpus {spec}: this machine has {available} GPU(s)")
        chosen = list(range(int(spec)))
    else:
        try:
            chosen = sorted({int(part) for part in spec.split(",")})
        except ValueError:
            raise LaunchError(f"--gpus {spec!r}: give all, a count (2) or indices (0,2)") from None
        missing = [i for i in chosen if i >= available]
        if missing:
            raise LaunchError(f"--gpus {spec}: no GPU {missing[0]} here ({available} GPU(s): 0..{available - 1})")
    if not chosen:
        raise LaunchError("no GPU found on this machine (nvidia-smi lists none). To run the same flow on the CPU, use:"
                          " python -m scheduler launch --pretend-gpus 2 --device cpu")
    return chosen


def recover_interrupted(layout: Layout, recorder) -> None:
    """Trials a dead launch was running: handled like any interrupted trial (`RecordResults.interrupted`):
    whatever of them still runs is killed, one `interrupted` row each, and queued again once."""
    for entry in queue.running(layout):
        recorder.interrupted(vars(entry), "launch stopped while this trial ran")


def dashboard_lines(host: str, url: str) -> list[str]:
    """What launch says about the dashboard: where it is, how to get the token it asks for, and a warning
    when it listens beyond this machine."""
    lines = [f"dashboard: http://{url} — it asks for Ray's token: cat ~/.ray/auth_token "
             f"(send it as 'Authorization: Bearer <token>')"]
    if host != LOCAL_HOST:
        lines.append(f"warning: the dashboard listens on {host}, reachable from other machines; "
                     f"prefer the default and an SSH tunnel: ssh -L {DASHBOARD_PORT}:{LOCAL_HOST}:{DASHBOARD_PORT} HOST")
    return lines


def _signal_handlers(layout: Layout) -> None:
    """First Ctrl-C drains, the second stops now (Tune's own handler can hang when idle)."""
    def handle(signum, frame):
        if control.drain_requested(layout):
            control.request(layout, control.STOP_NOW)
            say("stopping now (trials are killed)")
        else:
            control.request(layout, control.DRAIN)
            say("draining: running trials finish, no new ones start; Ctrl-C again to stop now")

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def start_ray(init: Callable[[], T], attempts: int = RAY_ATTEMPTS) -> T:
    """init() (a ray.init call), tried again once when it fails: Ray's start-up can time out on a loaded machine
    ("The current node timed out during startup"). LaunchError after the last failure, saying what failed."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            return init()
        except Exception as error:  # noqa: BLE001 - Ray raises many kinds; each is reported in one line
            ray.shutdown()  # what a half-started Ray left behind, before the next try
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            if attempt < attempts:
                say(f"Ray did not start ({type(error).__name__}: {first_line}); trying once more")
                continue
            raise LaunchError(
                f"Ray did not start, {attempts} times ({type(error).__name__}: {first_line}). On a busy machine "
                f"its start-up times out: wait for the load to drop and launch again. Ray's own logs are in "
                f"/tmp/ray/session_latest/logs/. With --address, check that the cluster runs (`ray status`)") from None
    raise AssertionError("unreachable")


def launch(opts: LaunchOptions) -> int:
    os.umask(os.umask(UMASK) | UMASK)  # inherited by Ray's processes and the trials they start
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's own per-trial logs (result.json, progress.csv, TensorBoard) repeat the trial's config, train.py's
    # source included, at every progress report: 3 MB for a 300 s trial, read by nothing (the rows are ours)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # without them, Tune's closing summary finds no result.json and warns with a line for every trial of the launch
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    layout = Layout.at(opts.root, opts.data_dir)
    if not layout.baseline.exists():
        raise LaunchError(f"no train.py in {layout.root}: run launch in the project folder or pass --root")
    if opts.device not in ("cuda", "cpu"):
        raise LaunchError(f"--device {opts.device!r}: use cuda or cpu")
    if opts.pretend_gpus and opts.device != "cpu":
        raise LaunchError("--pretend-gpus runs trials on the CPU: add --device cpu")
    if opts.compile_cache not in COMPILE_CACHE_MODES:
        raise LaunchError(f"--compile-cache {opts.compile_cache!r}: use one of {', '.join(COMPILE_CACHE_MODES)}")

    local_gpus = None if opts.address or opts.pretend_gpus else choose_gpus(opts.gpus, count_gpus())
    from scheduler.sandbox import SandboxError, resolve

    try:
        sandbox = resolve(opts.sandbox)
    except SandboxError as error:
        raise LaunchError(str(error)) from None
    try:
        presence = Presence.claim(layout)  # before anything acts on the root: one launch per root
    except LaunchBusy as busy:
        raise LaunchError(str(busy)) from None
    try:
        # stop requests made to an earlier launch go before `stop` can see this one: those made from now on count
        control.clear(layout)
        presence.announce()
        return _run(opts, layout, local_gpus, sandbox, presence)
    finally:
        presence.release()


def _run(opts: LaunchOptions, layout: Layout, local_gpus: list[int] | None, sandbox: str, presence: Presence) -> int:
    """launch() once it holds the root: data, Ray, the selection actor, then Tune until the queue is done."""
    if presence.took_over:
        say(f"the last launch here ({holder_text(presence.took_over)}) ended without stopping (killed?): this "
            f"launch takes its place, and the trials it was running are run again")
    if sandbox == "none":
        say("warning: --sandbox none: candidates run with your rights and can read the validation split, rewrite "
            "results/ and train.py, and reach the network; every row records sandbox=none")
    if opts.compile_cache != "private":
        say(f"--compile-cache {opts.compile_cache}: a source's reruns and control runs start from what its first ok "
            f"run left in its compile cache on their node (trained weights too: they may train on past the budget)"
            + (", and a candidate's first run from its baseline's (the baseline's compiler output runs in its "
               "training)" if opts.compile_cache == "seeded" else "") + ": docs/reliability.md"
            if sandbox != "none" else f"--compile-cache {opts.compile_cache} does nothing with --sandbox none: "
            "unsandboxed trials already share your user's compile cache")
    if not prepare.is_prepared(layout.data):
        say(f"no data in {layout.data}: downloading and checking enwik8 (once)")
        prepare.prepare(layout.data)

    import ray
    from ray import tune

    ray_init = {"include_dashboard": opts.dashboard, "dashboard_host": opts.dashboard_host,
                "log_to_driver": False, "configure_logging": False}
    if opts.address:
        context = start_ray(lambda: ray.init(address=opts.address, log_to_driver=False))
        n_gpus = int(ray.cluster_resources().get("GPU", 0))
        if n_gpus == 0:
            ray.shutdown()
            raise LaunchError(f"the Ray cluster at {opts.address} has no GPUs: `ray status` lists its nodes; a node "
                              f"that did not join says why where `ray start` ran (with token authentication, every "
                              f"node needs RAY_AUTH_MODE=token and the head's token)")
        nodes = sum(node["Alive"] for node in ray.nodes())
        say(f"Ray cluster at {opts.address}: {nodes} node(s), {n_gpus} GPU(s), at most {n_gpus} trials at once "
            f"(fixed now: a node that joins later adds no more, one that is lost leaves trials waiting for a GPU)")
    elif opts.pretend_gpus:
        n_gpus = opts.pretend_gpus
        context = start_ray(lambda: ray.init(num_gpus=n_gpus, **ray_init))
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, local_gpus))
        n_gpus = len(local_gpus)
        context = start_ray(lambda: ray.init(num_gpus=n_gpus, **ray_init))

    try:
        layout.make()
        results.build_index(layout.results)  # rows of an older results folder, for the commands' fast reads

        from scheduler.record import RecordResults, ShowLive
        from scheduler.search import QueueSearcher, StopNow
        from scheduler.selection import selection_actor
        from scheduler.trial import run_trial, ship_data

        selection = selection_actor(str(layout.root), opts.rule, opts.git_commit)
        recorder = RecordResults(str(layout.root), str(layout.data))
        recover_interrupted(layout, recorder)  # after the actor exists: a retry interrupted again is judged
        info = ray.get(selection.sync_baseline.remote())
        for note in info["notes"]:
            say(note)
        say(f"{n_gpus} GPU(s){' (pretend, on the CPU)' if opts.pretend_gpus else ''}, budget {opts.budget:.0f} s, "
            f"sandbox {sandbox}, early stop {opts.early_stop}, baseline {info['baseline']}, root {layout.root}")
        presence.update(gpus=n_gpus, pretend=bool(opts.pretend_gpus), budget=opts.budget)
        if opts.dashboard:
            # the port Ray really took (it moves on when 8265 is in use)
            url = context.dashboard_url or f"{opts.dashboard_host}:{DASHBOARD_PORT}"
            for line in dashboard_lines(opts.dashboard_host, url):
                say(line)
        data_sha256 = json.loads((layout.data / prepare.META_FILE).read_text())["sha256"]
        settings = {"budget": opts.budget, "device": opts.device, "startup_allowance": opts.startup_allowance,
                    "eval_timeout": opts.eval_timeout, "data_sha256": data_sha256, "sandbox": sandbox,
                    "root": str(layout.root), "early_stop": opts.early_stop, "compile_cache": opts.compile_cache,
                    "omp_threads": max(1, (os.cpu_count() or 1) // max(1, n_gpus))}
        _signal_handlers(layout)
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, shipped=ship_data(layout.data)), {"cpu": 0, "gpu": 1}),
            tune_config=tune.TuneConfig(
                search_alg=QueueSearcher(str(layout.root), str(layout.data), settings, opts.exit_when_idle),
                num_samples=-1, max_concurrent_trials=n_gpus, reuse_actors=True),
            run_config=tune.RunConfig(
                name="scheduler", storage_path=str(layout.results / "ray"), verbose=0,
                callbacks=[ShowLive(str(layout.root), str(layout.data)), recorder],
                stop=StopNow(str(layout.root), str(layout.data)),
                failure_config=tune.FailureConfig(max_failures=0)),
        )
        tuner.fit()
        say("launch finished")
        return 0
    finally:
        from scheduler.trial import kill_marked

        for entry in queue.running(layout):
            kill_marked(str(layout.runs / entry.trial_id))
        ray.shutdown()
