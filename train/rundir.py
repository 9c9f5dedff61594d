"""One run per run directory, and no trainer that outlives its launcher.

`RunDirLock`: rank 0 holds an exclusive flock on OUTPUT_DIR/.lock for the run's life; the file names the holder
(pid, host, start time). The kernel drops the lock when the holder dies, kill -9 included, so it never goes
stale. (flock works across hosts on NFSv4 and Lustre with flock enabled; elsewhere it guards one host.)

`LauncherWatch`: when the trainer was started by the `deepspeed` launcher, the launcher processes above it are
watched; if one of them exits (killed by SIGTERM, which the single-node launcher does not pass on), the trainer
signals itself with SIGTERM, i.e. saves a checkpoint and exits 75 like any stopped run.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import threading
import time
from typing import Optional

LOCK_NAME = ".lock"


class RunDirBusy(Exception):
    """Another live run holds the directory; the message is one line naming it."""


class RunDirLock:
    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(f"{os.path.dirname(self.path)}: in use by another run ({holder}); wait for it to end "
                             "or stop it, or use another --output_dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


def _proc_stat(pid: int) -> Optional[tuple[int, str]]:
    """(parent pid, start time) of a live process, from /proc; None when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else (int(fields[1]), fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _is_launcher(pid: int) -> bool:
    """The `deepspeed` runner script or the per-node `python -m deepspeed.launcher.launch` it starts."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return False
    return "deepspeed.launcher.launch" in argv or any(os.path.basename(a) == "deepspeed" for a in argv[:2])


def launcher_ancestors(pid: Optional[int] = None) -> list[tuple[int, str]]:
    """(pid, start time) of the `deepspeed` launcher processes above `pid` (the runner and launch.py)."""
    out, cur, seen = [], _proc_stat(pid or os.getpid()), 0
    while cur is not None and cur[0] > 1 and seen < 16:
        parent = cur[0]
        stat = _proc_stat(parent)
        if stat is None:
            break
        if _is_launcher(parent):
            out.append((parent, stat[1]))
        cur, seen = stat, seen + 1
    return out


class LauncherWatch:
    """A daemon thread that sends SIGTERM to this process once a watched launcher process has exited."""

    def __init__(self, interval: float = 2.0):
        self.watched = launcher_ancestors()
        self.interval = interval
        self.fired: Optional[int] = None

    def start(self) -> "LauncherWatch":
        if self.watched:
            threading.Thread(target=self._run, name="launcher-watch", daemon=True).start()
        return self

    def _run(self) -> None:
        while self.fired is None:
            time.sleep(self.interval)
            for pid, start in self.watched:
                stat = _proc_stat(pid)
                if stat is None or stat[1] != start:   # gone (or its pid reused by another process)
                    self.fired = pid
                    print(f"launcher process {pid} has exited; stopping (saving a checkpoint first)", flush=True)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
