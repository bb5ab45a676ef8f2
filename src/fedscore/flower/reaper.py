"""No orphans: every process a `LocalFlowerCluster` starts dies with the program that started it.

Three layers, because no one of them covers every way our process can end (issue 16, item 5):

1. A marker in the environment: every process the launcher starts gets
   FEDSCORE_LAUNCH_ID=<id>, and Flower's own children inherit it (the SuperExecs, the
   `flwr-serverapp` / `flwr-clientapp` processes they start, `flwr-simulation` and Ray's
   processes), whatever session or process group they put themselves in. `marked(id)` finds
   them all in /proc; `reap(id)` stops them (SIGTERM, a grace period, SIGKILL).
2. A parent-death signal (Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)`) on the SuperLink, the
   SuperNodes and `flwr run`: the kernel kills them the moment our process dies, even by
   SIGKILL. It does not reach their children; Flower's SuperExecs and apps watch their own
   parent's PID (`--parent-pid`, 0.2 s polls) and stop when it is gone, but Ray's processes
   and a SuperExec busy starting an app may not.
3. A watchdog: a small detached process (this file run as a script, stdlib only, so it starts
   fast) that holds the read end of a pipe whose write end only our process holds. When our
   process ends, however it ends, the pipe reaches end-of-file and the watchdog reaps every
   process with the marker, then exits. On a clean stop we close the pipe ourselves after
   stopping everything, and the watchdog finds nothing left.

Linux only for layers 1-3 (/proc, prctl); elsewhere `supported()` is False and the launcher
falls back to signalling the process groups it created on a clean stop (a SIGKILL of the CLI
then leaves Flower's processes running, as on any platform without these mechanisms).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

LAUNCH_ENV = "FEDSCORE_LAUNCH_ID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def supported() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self/environ").exists()


def new_launch_id() -> str:
    return uuid.uuid4().hex


def marked(launch_id: str, name: str = LAUNCH_ENV) -> set[int]:
    """PIDs of this user's processes whose environment holds name=launch_id (by default
    FEDSCORE_LAUNCH_ID; /proc/<pid>/environ is readable for one's own processes only). A
    process's environ is the one it was started with: exactly what we gave it."""
    needle = f"{name}={launch_id}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            found.add(int(entry))
    return found


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _living(pids: set[int]) -> set[int]:
    """The PIDs that still run: zombies (dead, not yet reaped by their parent) do not."""
    alive = set()
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            alive.add(pid)
    return alive


def reap(launch_id: str, grace: float = 3.0, timeout: float = 20.0) -> int:
    """Stop every process marked with launch_id: SIGTERM, up to `grace` seconds to exit, then
    SIGKILL; rescans until none is left (a dying SuperExec may still start an app) or
    `timeout` passes. Returns how many distinct processes were signalled."""
    hit: set[int] = set()
    end = time.monotonic() + timeout
    pids = _living(marked(launch_id))
    if pids:
        hit |= pids
        _signal_all(pids, signal.SIGTERM)
        stop_waiting = time.monotonic() + grace
        while time.monotonic() < stop_waiting and _living(pids):
            time.sleep(0.1)
    while (pids := _living(marked(launch_id))) and time.monotonic() < end:
        hit |= pids
        _signal_all(pids, signal.SIGKILL)
        time.sleep(0.1)
    return len(hit)


def _libc_prctl():
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


def die_with_parent():
    """A `preexec_fn` for Popen: the child gets SIGKILL when the thread that started it dies
    (Linux PR_SET_PDEATHSIG; the libc function is looked up now, before the fork). Call it
    from the main thread: the signal follows the *thread*, and a worker thread that starts a
    process and returns would kill it. None where prctl does not exist."""
    prctl = _libc_prctl() if supported() else None
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nothing would signal us
            os._exit(1)

    return preexec


class Watchdog:
    """The detached reaper of launch_id's processes (layer 3 above): started before any
    Flower process, `close()`d after a clean stop."""

    def __init__(self, launch_id: str):
        self.launch_id = launch_id
        env = {k: v for k, v in os.environ.items() if k != LAUNCH_ENV}  # not a target itself
        # own session: a Ctrl-C in the terminal (SIGINT to our process group) or a hang-up
        # does not reach it; stdin is its end of the pipe, and close_fds keeps the write end
        # out of every other child, so only our process's exit closes it. -I: isolated mode,
        # this file's folder (which holds a `run.py`) is not put on the module path
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).resolve()), launch_id],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True, close_fds=True)

    def close(self, timeout: float = 30.0) -> None:
        """End-of-file for the watchdog: it reaps what is left (nothing, after a clean stop)
        and exits."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)


def watch(launch_id: str) -> None:
    """The watchdog's loop: wait for end-of-file on stdin (our parent's end of the pipe is
    closed: it exited or called close()) or for a new parent PID (the parent died and we were
    re-parented), then reap."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()
    stdin = sys.stdin.buffer.raw
    while os.getppid() == parent:
        ready, _, _ = select.select([stdin], [], [], 1.0)
        if ready and not os.read(stdin.fileno(), 4096):
            break
    reap(launch_id)


if __name__ == "__main__":
    watch(sys.argv[1])
