"""One writer per run directory: ``<run dir>/.lock``.

The lock file is created atomically (``O_CREAT | O_EXCL``) and holds its holder: host, pid,
the process's start time (so a reused pid is not mistaken for the holder), when it was taken
and a random token. While held, a daemon thread touches it every ``HEARTBEAT_S`` seconds.
A lock is stale when
  - its host is this host and its process is gone (dead pid, or a pid now owned by a process
    that started at another time), or
  - its host is another one and it has not been touched for ``stale_s`` seconds (that host's
    heartbeat stopped: the holder died or the file system lost contact).
A stale lock is taken over with a warning. A live one makes the second process wait up to
``wait_s`` seconds (a message every minute), then refuse with ``RunDirLocked`` naming the
holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from prunelab.errors import ConfigError

log = logging.getLogger(__name__)
HEARTBEAT_S = 30.0


class RunDirLocked(ConfigError):
    """Another live process writes this run directory."""


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # field 22, counted after the command name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {when}"


class RunLock:
    def __init__(self, root: Path, wait_s: float = 0.0, stale_s: float = 900.0) -> None:
        self.path = Path(root) / ".lock"
        self.wait_s = float(wait_s)
        self.stale_s = float(stale_s)
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------ holder info
    def _me(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _proc_start(os.getpid()),
            "started": time.time(),
            "token": self.token,
        }

    def _read(self) -> tuple[dict | None, float | None]:
        """(holder, seconds since the last heartbeat) of the current lock file; (None, None) when
        there is none; ({}, age) for a file not yet (or badly) written."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(text), age
        except ValueError:
            return {}, age

    def stale_reason(self, holder: dict, age: float) -> str | None:
        """Why ``holder``'s lock is stale, or None while it may still be writing."""
        if not holder:  # empty or torn: a writer dies between create and write only rarely
            return f"an unreadable lock file untouched for {age:.0f} s" if age > 60 else None
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            if not _alive(pid):
                return f"process {pid} on this host has ended"
            start = holder.get("pid_start")
            if start is not None and _proc_start(pid) not in (None, start):
                return f"pid {pid} now belongs to another process"
            return None
        if age > self.stale_s:
            return (
                f"its host stopped refreshing it {age:.0f} s ago (limit rundir.lock_stale_s={self.stale_s:g})"
            )
        return None

    # ------------------------------------------------------------ acquire / release
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._me()) + "\n")
        return True

    def _break(self, holder: dict) -> None:
        """Remove the stale lock of ``holder`` — and nothing else: it is renamed away first and
        put back if, in the meantime, another process had replaced it with a live one."""
        aside = self.path.with_name(f".lock.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another waiter broke it first
        try:
            moved = json.loads(aside.read_text())
        except ValueError:
            moved = {}
        if moved.get("token") != holder.get("token"):  # not the one judged stale: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def acquire(self) -> RunLock:
        deadline = time.monotonic() + self.wait_s
        next_note = 0.0
        while True:
            if self._create():
                break
            holder, age = self._read()
            if holder is None:
                continue  # released between our attempt and the read: try again at once
            why = self.stale_reason(holder, age)
            if why is not None:
                log.warning(
                    "run directory %s: taking over a stale lock (%s): %s",
                    self.path.parent,
                    describe(holder),
                    why,
                )
                self._break(holder)
                continue
            if time.monotonic() >= deadline:
                raise RunDirLocked(
                    f"run directory {self.path.parent} is being written by another prunelab process "
                    f"({describe(holder)}); wait for it to finish, or let this command wait: rundir.lock_wait_s=<seconds>"
                    + (f" (waited {self.wait_s:g} s)" if self.wait_s else "")
                    + f". A lock left by a crash on another host counts as stale after rundir.lock_stale_s="
                    f"{self.stale_s:g} s; remove {self.path} by hand only if that process is surely gone"
                )
            if time.monotonic() >= next_note:
                log.warning(
                    "run directory %s is being written by %s; waiting (at most %.0f s more)",
                    self.path.parent,
                    describe(holder),
                    deadline - time.monotonic(),
                )
                next_note = time.monotonic() + 60
            time.sleep(min(0.2, max(0.02, deadline - time.monotonic())))
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="prunelab-lock", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        holder, _ = self._read()
        if holder and holder.get("token") == self.token:  # never remove a lock that is not ours
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
