"""Is a launch running in this root? The lock a launch holds for its lifetime, and the heartbeat it writes.

    presence = Presence.claim(layout)   # launch: LaunchBusy (naming the holder's pid and start) if one runs here
    ...                                 # what must happen before readers see this launch (stale stop requests go)
    presence.announce()                 # the heartbeat: written now, then every BEAT_S seconds by a thread
    presence.release()                  # at exit: marks the heartbeat stopped, frees the lock

    read(layout)                        # status, wait, stop: {"state": "running" | "stopped" | "gone" | "never", ...}

results/launch.lock   filelock's lock, held from before Ray starts until launch exits. The kernel frees it
                      when the process ends, however it ends, so the lock of a killed launch is taken over
                      by the next one, which says so.
results/launch.json   the holder: pid, host, the process's start time (tells it from a later process with the
                      same pid), when it started, its last heartbeat, and `stopped` once it exited cleanly.

Readers never touch the lock (taking it for a moment could turn a launch starting at that moment away); they
judge the heartbeat: on this host the holder's process must exist, elsewhere the heartbeat must be fresh.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from scheduler.atomic import atomic_write
from scheduler.layout import Layout

LOCK_FILE, HEARTBEAT_FILE = "launch.lock", "launch.json"  # under results/
BEAT_S = 2.0      # seconds between heartbeats
STALE_S = 30.0    # a heartbeat older than this, from a launch on another host, counts as a launch that died
RUNNING, STOPPED, GONE, NEVER = "running", "stopped", "gone", "never"  # what read() says of a root's launch


class LaunchBusy(Exception):
    """Another launch holds this root; the message names it and says what to do."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux); None where /proc cannot say."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _process_alive(pid: int, ticks: int | None) -> bool:
    """Is process `pid` alive and the same one that wrote the heartbeat (not a later process with its pid)?"""
    now = _start_ticks(pid)
    if now is not None:
        return ticks is None or now == ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def when(unix: float) -> str:
    """A time as people read it in messages: local date and clock time."""
    return datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S")


def read(layout: Layout) -> dict:
    """What is known of the launch in this root: `state` is running, stopped (it exited cleanly), gone (it died
    without stopping: killed, or its machine went down) or never (no launch has run here); with the heartbeat's
    fields (pid, host, started, beat) and `beat_age` in seconds."""
    path = layout.results / HEARTBEAT_FILE
    try:
        beat = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or being replaced this instant (the write is atomic: absent, not torn)
        return {"state": NEVER} if not path.exists() else {"state": GONE, "reason": "unreadable heartbeat"}
    beat["beat_age"] = round(time.time() - beat.get("beat", 0), 1)
    if beat.get("stopped"):
        state = STOPPED
    elif beat.get("host") == socket.gethostname():
        state = RUNNING if _process_alive(beat["pid"], beat.get("ticks")) else GONE
    else:
        state = RUNNING if beat["beat_age"] < STALE_S else GONE
    return {**beat, "state": state}


def holder_text(beat: dict) -> str:
    """'pid 123 on host h, started 2026-01-01 12:00:00' from a heartbeat."""
    if "pid" not in beat:
        return "a launch whose details are not written yet"
    return f"pid {beat['pid']} on host {beat.get('host', '?')}, started {when(beat['started'])}"


@dataclass
class Presence:
    """A launch's hold on its root: the lock and the heartbeat thread (see the module docstring)."""
    layout: Layout
    lock: object
    beat: dict
    took_over: dict | None = None  # the heartbeat of a launch that died holding this root, if one did
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _writing: threading.Lock = field(default_factory=threading.Lock)  # the heartbeat thread and update() both write

    @classmethod
    def claim(cls, layout: Layout) -> "Presence":
        """Take the root's lock; LaunchBusy when another launch holds it. Readers see this launch once it
        announces itself (`announce`)."""
        from filelock import FileLock, Timeout

        layout.results.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(layout.results / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise LaunchBusy(
                f"another launch is running in {layout.root} ({holder_text(read(layout))}). One launch per folder: "
                f"stop that one first (`python -m scheduler stop`, or Ctrl-C in its terminal), or start this one "
                f"in another folder with --root") from None
        before = read(layout)
        pid = os.getpid()
        return cls(layout, lock, {"pid": pid, "ticks": _start_ticks(pid), "host": socket.gethostname(),
                                  "started": time.time(), "beat": time.time()},
                   took_over=before if before["state"] in (RUNNING, GONE) else None)

    def announce(self) -> None:
        """Write the heartbeat, and rewrite it every BEAT_S seconds until `release`."""
        self._write()
        self._thread = threading.Thread(target=self._beat, name="launch-heartbeat", daemon=True)
        self._thread.start()

    def _write(self, **fields) -> None:
        with self._writing:
            self.beat.update(fields, beat=time.time())
            # rewritten every BEAT_S: one lost in a crash costs nothing, and the process check says the rest
            atomic_write(self.layout.results / HEARTBEAT_FILE, json.dumps(self.beat), fsync=False)

    def update(self, **fields) -> None:
        """Add what readers should know of this launch (its GPUs, budget) to the heartbeat, now."""
        self._write(**fields)

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self._write()
            except OSError:  # a full disk: the process check still tells readers this launch is alive
                pass

    def release(self) -> None:
        """Stop the heartbeat, mark this launch stopped (if it announced itself), free the lock."""
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join()
                self._write(stopped=time.time())
        finally:
            self.lock.release()
