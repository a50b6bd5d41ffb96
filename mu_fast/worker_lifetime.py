"""Worker processes that end with the process that started them, and leave Ctrl-C to it.

A worker process (the sweep's ``processes`` and ``gpus`` executors, the demo's pool) holds a model, on a GPU with
``gpus``. If its driver is killed (SIGKILL, the OOM killer, a crash), nothing stops the worker: it waits on its task
queue forever, reparented to init, holding its memory. ``die_with_parent(parent_pid)``, the first thing a worker
runs, asks Linux to SIGKILL it when its parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks that its parent is
still ``parent_pid``: a driver killed while the worker was still starting (a spawned interpreter first imports the
driver's main module, seconds) sends no signal to a worker that had not asked for one yet, so that worker exits
there. Where prctl does not exist (macOS), a daemon thread polls the parent id instead. The multiprocessing resource
tracker needs nothing more: it exits when the last process holding its pipe (the driver and its workers) is gone.

Linux sends the parent-death signal when the thread that started the worker ends, not the whole process: the
executors start, replace and stop their workers in one call on one thread, which outlives them.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group, workers included, and each worker would
print its own KeyboardInterrupt traceback. Workers started inside ``sigint_ignored()`` inherit SIGINT ignored from
their first instruction (a Python started with SIGINT ignored keeps it ignored), so only the driver sees the
KeyboardInterrupt, and it ends its workers itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Make this process die when ``parent_pid`` (the process that started it) dies; exit at once if it already has."""
    if not _parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="mu_fast-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the signal was armed: nobody is left to collect this worker's results


def _parent_death_signal(signum: int) -> bool:
    """Linux only: deliver ``signum`` to this process when its parent dies. False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def _watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(1)


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT is ignored in this process while the block runs: processes started inside inherit that. Only on the
    main thread (where Python handles signals); elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
